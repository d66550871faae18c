"""The ``lbm-reg`` command line: one module per command group; parse -> call ``api`` -> render.

The top floor. May import ``api`` and the leaves (errors, settings, console, units, net,
version), nothing else: no torch at import, no registry, model or server code but through the
API (tests/test_layers.py; docs/layers.md).
"""
