"""Kept because Ray Serve configs name deployments by import path
(``lbm_registry.api.ray_serve:deployment``, as the README showed before the API was grouped by
use case). The code lives in :mod:`lbm_registry.api.serve.ray_serve`."""

from lbm_registry.api.serve.ray_serve import deployment

__all__ = ["deployment"]
