"""Model inputs (paper §3.4): alignment-guided masking, the pre-training and downstream datasets, batching."""
