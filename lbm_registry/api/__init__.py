"""The Python API: the one place that joins the registry and the math. The CLI calls it.

Grouped by use case, each group importing only the groups below it (tests/test_layers.py):

    demo                         the whole story on the tiny twin (drives the CLI it is given)
    serve | train                serving (Server, Ray Serve, the MLflow pyfunc model) | training
    assets                       base, models (import), lora (extract/validate/layers/export),
                                 lora_import, algebra (resize/merge), calibration
    run                          infer, compare, report, probe (+ the background probe_job)
    registry                     registry access: resolve, register, show, aliases, workspace

May import every floor below the API (serve/, train/, registry/, lora/, lbm/, leaves), never
the CLI. ``pyfunc``, ``pyfunc_model``, ``ray_serve`` and ``probe_job`` at this level are paths
that stored models, Ray configs and started processes name; they only re-export.

The short names stay: ``api.lora``, ``api.infer``, ``api.compare``, ``api.train``... load the
module of that name on first attribute access (``from lbm_registry import api;
api.lora.extract(...)``, ``from lbm_registry.api import infer``), while ``import
lbm_registry.api`` itself stays light (no torch).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

#: ``api.<name>`` -> the module it loads (the names of the flat API before it was grouped).
MODULES = {
    "registry": "lbm_registry.api.registry",
    "infer": "lbm_registry.api.run.infer",
    "compare": "lbm_registry.api.run.compare",
    "report": "lbm_registry.api.run.report",
    "probe": "lbm_registry.api.run.probe",
    "base": "lbm_registry.api.assets.base",
    "models": "lbm_registry.api.assets.models",
    "lora": "lbm_registry.api.assets.lora",
    "lora_import": "lbm_registry.api.assets.lora_import",
    "algebra": "lbm_registry.api.assets.algebra",
    "calibration": "lbm_registry.api.assets.calibration",
    "train": "lbm_registry.api.train",
    "serve": "lbm_registry.api.serve",
    "demo": "lbm_registry.api.demo",
}


def __getattr__(name: str) -> Any:
    """``api.<module>``: import it on first use (PEP 562)."""
    if name in MODULES:
        return importlib.import_module(MODULES[name])
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    import pkgutil

    return sorted(set(globals()) | set(MODULES)
                  | {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")})
