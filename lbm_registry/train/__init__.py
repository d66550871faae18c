"""Training: config, webdataset data, LoRA injection, objective, loop, synthetic data, and the
local multi-process launcher (which runs the training function its caller names).

May import registry/ (run tracking), lora/, lbm/ and the leaves; never serve/, the API or the CLI
(tests/test_layers.py).
"""
