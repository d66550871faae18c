"""The ranges of the numbers a caller gives to run or make a model: one set of rules.

``lbm-reg infer``, ``lbm_registry.load(ref)(img, ...)``, the MLflow pyfunc model and the server
all check ``scale``, ``steps`` and ``seed`` here, so a value one of them refuses is refused by
all of them, in the same words (the server may set a lower step limit of its own:
``max_steps``). Merge weights and synthetic image sizes are checked here too. A refusal is a
:class:`~lbm_registry.errors.RangeError` (HTTP 400, exit 2) raised before anything is loaded,
allocated or written.

Why these bounds:
- ``scale`` 0-2: a LoRA's strength; past 2 the outputs saturate (black or white images).
- ``steps`` 1-1000: the scheduler has 1000 training timesteps; more steps repeat them.
- ``seed`` 0 to 2**63 - 1: what ``torch.Generator.manual_seed`` takes without wrapping.
- merge weights -100..100 (finite): a weight multiplies the stored factors; 1e308 overflows
  them to inf.
- ``resolution`` 8-4096 px: the synthetic renderer holds a few float64 images of that side.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from lbm_registry.errors import RangeError, abbreviate

MAX_SCALE = 2.0
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
MAX_WEIGHT = 100.0
MIN_RESOLUTION, MAX_RESOLUTION = 8, 4096


def _shown(value: Any) -> str:
    return abbreviate(repr(value) if isinstance(value, str) else str(value), 40)


def _real(value: Any, what: str) -> float:
    """A finite real number (bool and text are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RangeError(f"{what} must be a number, got {_shown(value)}")
    try:
        x = float(value)
    except OverflowError:  # an int too large for a float
        raise RangeError(f"{what} {_shown(value)} is not a finite number") from None
    if not math.isfinite(x):
        raise RangeError(f"{what} must be a finite number, got {_shown(value)}")
    return x


def _integer(value: Any, what: str) -> int:
    """An integer; an integral float (1.0, as pandas gives it) counts."""
    if isinstance(value, bool):
        raise RangeError(f"{what} must be an integer, got {value}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    raise RangeError(f"{what} must be an integer, got {_shown(value)}")


def check_scale(value: Any, what: str = "scale") -> float:
    """A LoRA strength, 0.0-2.0."""
    x = _real(value, what)
    if not 0.0 <= x <= MAX_SCALE:
        raise RangeError(f"{what} {x:g} is outside 0.0-{MAX_SCALE}")
    return x


def check_steps(value: Any, what: str = "steps", limit: int = MAX_STEPS) -> int:
    """Sampling steps, 1 to ``limit`` (at most 1000; a server may allow fewer)."""
    n = _integer(value, what)
    if not 1 <= n <= min(limit, MAX_STEPS):
        extra = " (the server's limit)" if limit < MAX_STEPS else ""
        raise RangeError(f"{what} must be from 1 to {min(limit, MAX_STEPS)}{extra}, got {_shown(n)}")
    return n


def check_seed(value: Any, what: str = "seed") -> int:
    """A random seed, 0 to 2**63 - 1."""
    n = _integer(value, what)
    if not 0 <= n <= MAX_SEED:
        raise RangeError(f"{what} must be from 0 to 2**63-1, got {_shown(n)}")
    return n


def check_weight(value: Any, what: str = "weight") -> float:
    """A merge weight: finite, -100 to 100 (negative subtracts a LoRA)."""
    x = _real(value, what)
    if not -MAX_WEIGHT <= x <= MAX_WEIGHT:
        raise RangeError(f"{what} {x:g} is outside -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
    return x


def check_resolution(value: Any, what: str = "resolution") -> int:
    """An image side in pixels, 8-4096."""
    n = _integer(value, what)
    if not MIN_RESOLUTION <= n <= MAX_RESOLUTION:
        raise RangeError(f"{what} must be from {MIN_RESOLUTION} to {MAX_RESOLUTION} pixels, got {_shown(n)}")
    return n
