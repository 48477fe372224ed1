"""Whole-pipeline workflows: the demo and the Table 4 ablation, run stage by stage."""
