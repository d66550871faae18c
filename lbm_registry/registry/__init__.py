"""Bookkeeping: workspace, catalog (SQLAlchemy), tracking (MLflow), references, blobs.

Nothing in this package imports torch.
"""
