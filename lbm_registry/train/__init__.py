"""Training: config, webdataset data, LoRA injection, objective, loop, synthetic data."""
