"""lbm-registry: registry-backed LoRA tooling for LBM (Latent Bridge Matching) models.

Heavy modules (torch, diffusers, mlflow) are imported lazily so that the CLI answers fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lbm_registry.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from lbm_registry.lbm.pipeline import LBMPipeline


def load(ref: str, **kwargs: Any) -> LBMPipeline:
    """Resolve ``ref`` (e.g. ``"relight-v3@latest"``) and return a ready image pipeline.

    The workspace is ``settings=`` (a :class:`~lbm_registry.settings.WorkspaceSettings`)
    when given, else ``$LBM_REG_HOME`` (default ``./mlruns``) with ``$LBM_REG_CATALOG_URL`` and
    ``$MLFLOW_TRACKING_URI``, as for the CLI. See :func:`lbm_registry.api.run.infer.load` for the
    other keyword arguments.
    """
    from lbm_registry.api.run.infer import load as _load

    return _load(ref, **kwargs)


__all__ = ["__version__", "load"]
