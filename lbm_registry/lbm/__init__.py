"""The LBM model: config, construction, checkpoint IO, exact base, sampler, imaging, and the
thread-count helpers (``threads``) every torch floor above shares.

Above the leaves only: may import errors, fileio, ranges, safetensors_layout, units and the
like; never lora/, registry/, train/, serve/ or the API (tests/test_layers.py).
"""
