"""The Python API: the one place that joins the registry and the math. The CLI calls it.

Modules: ``base`` (exact base), ``registry`` (resolve/register facade), ``lora`` (extract,
validate, layers, export), ``infer`` (load, run), ``train``, ``compare``, ``demo``.

Submodules load on first attribute access, so ``from lbm_registry import api;
api.lora.extract(...)`` works while ``import lbm_registry.api`` itself stays light (no torch).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any


def __getattr__(name: str) -> Any:
    """``api.<submodule>``: import it on first use (PEP 562)."""
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    import pkgutil

    return sorted(set(globals()) | {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")})
