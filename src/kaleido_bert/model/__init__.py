"""Kaleido-BERT (paper §3.5, §4.2): the encoder, the pre-training heads, the downstream models, the dual encoder."""
