"""Bookkeeping: workspace, catalog (SQLAlchemy), tracking (MLflow) and its SQLite fast path,
references, blobs, doctor, MLflow pages and models.

May import lbm/ (config and header reading, no torch) and the leaves; never lora/, train/,
serve/ or the API. Nothing in this package imports torch (tests/test_startup.py); no two of its
modules import each other (tests/test_layers.py).
"""
