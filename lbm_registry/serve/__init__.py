"""The image server: mixed-LoRA batches over one warm base (knows no registry; ``api.serve`` wires it).

``multilora`` (the per-sample low-rank path), ``cache`` (LRU of LoRA factors), ``batcher``
(micro-batching worker), ``engine`` (all of it behind ``submit``/``run``), ``metrics``
(Prometheus text), ``app`` (FastAPI). The Ray Serve deployment is ``api.serve.ray_serve`` (it
wraps the registry-backed ``api.serve.Server``).

May import lora/, lbm/ and the leaves; never registry/ (a forbidden contract), train/ or the API
(tests/test_layers.py).
"""
