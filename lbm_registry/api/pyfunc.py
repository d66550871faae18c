"""Kept because stored models name it: every registered version's MLflow model carries a copy of
:mod:`lbm_registry.api.pyfunc_model`, which imports ``LBMPyfuncModel`` from this path. The code
lives in :mod:`lbm_registry.api.serve.pyfunc`; do not move or remove this module."""

from lbm_registry.api.serve.pyfunc import LBMPyfuncModel

__all__ = ["LBMPyfuncModel"]
