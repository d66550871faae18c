"""The original extractor's alpha bug: a rank clipped to the layer, alpha left at the rank asked.

``extract_lora_native.py`` (the original LBM LoRA scripts) asks each layer for rank 32 (16 for
convs), clips it to the layer's smallest side, but writes ``alpha`` = the rank it asked for. A
layer's delta is ``(alpha / rank) * up @ down``, so every layer with a clipped rank is scaled by
``alpha / rank`` > 1: ``conv_out`` (4 output channels) by 4 in every rank-32/16 file, and every
layer of a "full rank" (9999, stored in bf16 as 9984) file by 9984 / its smallest side (on the full
model 7.8 to 31 on the 1280- to 320-wide layers, 277 on ``conv_in``, 2,496 on ``conv_out``).

Detection (:func:`clipped_alpha`): a layer whose rank equals its smallest side and whose alpha is
above that rank. Our own files are never flagged (our writer scales the factors for the alpha it
stores); a foreign file that did the same would be, and ``validate`` tells which is right.
:func:`with_alpha_at_rank` is the fix: the same factors with alpha = rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: relative slack on "alpha > rank": bf16 stores 32 exactly but 9999 as 9984
_TOLERANCE = 1e-6


@dataclass
class ClippedAlpha:
    """Layers whose alpha exceeds their clipped rank: module -> (rank, alpha)."""

    layers: dict[str, tuple[int, float]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.layers)

    @property
    def max_scale(self) -> float:
        return max((a / r for r, a in self.layers.values()), default=1.0)

    def line(self, fix_hint: str | None = "import it with --fix-alpha to use alpha = rank") -> str:
        """One line for the CLI: how many layers, the largest scale, what to do."""
        n = len(self.layers)
        worst = max(self.layers, key=lambda m: self.layers[m][1] / self.layers[m][0])
        r, a = self.layers[worst]
        text = (f"alpha above a clipped rank on {n} layer{'s' if n != 1 else ''} (largest scale {self.max_scale:.4g}x, "
                f"e.g. {worst}: rank {r}, alpha {a:g}): the original extract_lora_native.py keeps alpha at the rank "
                "it asked for when a layer is smaller")
        return f"{text}; {fix_hint}" if fix_hint else text

    def to_dict(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "max_scale": self.max_scale,
                "modules": {m: [r, a] for m, (r, a) in self.layers.items()}}


def smallest_side(weight_shape: tuple[int, ...]) -> int:
    """The largest rank a layer can have: min(out, in * kh * kw)."""
    return min(int(weight_shape[0]), math.prod(int(d) for d in weight_shape[1:]))


def clipped_alpha(layers: Iterable[tuple[str, int, float, tuple[int, ...]]]) -> ClippedAlpha:
    """From ``(module, rank, alpha, weight shape)``: the layers at their smallest side with a
    larger alpha."""
    out = ClippedAlpha()
    for module, rank, alpha, shape in layers:
        if rank == smallest_side(shape) and alpha > rank * (1 + _TOLERANCE):
            out.layers[module] = (int(rank), float(alpha))
    return out


def clipped_alpha_of(lora: Any) -> ClippedAlpha:
    """:func:`clipped_alpha` of a :class:`~lbm_registry.lora.format.LoRAFile` that is not ours
    (files we write carry an ``lbm_registry`` entry and are never flagged)."""
    if lora.info:
        return ClippedAlpha()
    return clipped_alpha((m, la.rank, la.alpha, tuple(la.weight_shape)) for m, la in lora.layers.items())


def with_alpha_at_rank(lora: Any, modules: Mapping[str, Any]) -> Any:
    """A copy of ``lora`` whose ``modules`` have alpha = rank (factors untouched)."""
    from lbm_registry.lora.format import LoRAFile, LoRALayer

    layers = {m: (LoRALayer(m, la.down, la.up, float(la.rank)) if m in modules else la)
              for m, la in lora.layers.items()}
    return LoRAFile(layers=layers, info=dict(lora.info), raw_metadata=dict(lora.raw_metadata))
