"""Evaluation (paper §4.2–4.4): the protocols, the metrics, the report."""
