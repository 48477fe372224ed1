"""Training (paper §3.6, §4.1): the one training loop, pre-training and fine-tuning."""
