"""Rank policies: how many singular components each layer keeps (pure math, no IO).

Three policies, all capped by ``max_rank`` and by each layer's smaller side:

- ``fixed``: ``rank`` for Linear layers, ``conv_rank`` for Conv2d layers. A rank at or above the
  layer's smaller side means full rank (the delta is stored exactly, up to the storage dtype).
- ``energy``: per layer, the smallest rank keeping a fraction ``F`` of ``||dW||_F^2``.
- ``budget``: ranks chosen across all layers to minimise the total squared reconstruction
  error at a given file size. Keeping singular component ``i`` of a layer removes ``s_i^2`` of
  error and costs ``(m + n)`` parameters, so components are taken greedily in decreasing order
  of ``s_i^2 / (m + n)``; within a layer that ratio only decreases, so the greedy choice is a
  prefix of each layer's spectrum, and it is optimal for this knapsack up to the last item.

With calibration statistics (``extract --calibrate``, :mod:`lbm_registry.lora.whiten`) the same
three policies run on the whitened delta ``dW L`` (``C = X X^T / n = L L^T``), whose singular
values measure OUTPUT error: ``energy`` keeps a fraction of ``||dW X||^2``, and ``budget``
allocates by output error per byte. Nothing here changes: only the spectra fed in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from lbm_registry.errors import LoRAError
from lbm_registry.units import format_size

if TYPE_CHECKING:
    import torch

DEFAULT_RANK = 32
DEFAULT_CONV_RANK = 16
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """``200MB`` -> 200_000_000, ``1.5GB``, ``512MiB`` (binary), or a plain byte count."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise LoRAError(f"invalid size {text!r}: use e.g. 200MB, 1.5GB or 512MiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise LoRAError(f"invalid size {text!r}: must be positive")
    return value


@dataclass(frozen=True)
class RankPolicy:
    """One of ``fixed`` / ``energy`` / ``budget``; build it with :meth:`from_options`."""

    kind: Literal["fixed", "energy", "budget"] = "fixed"
    rank: int = DEFAULT_RANK
    conv_rank: int = DEFAULT_CONV_RANK
    energy: float | None = None
    budget_bytes: int | None = None
    max_rank: int | None = None

    @classmethod
    def from_options(cls, rank: int | None = None, conv_rank: int | None = None, energy: float | None = None,
                     budget: str | int | None = None, max_rank: int | None = None) -> RankPolicy:
        """Validate CLI-style options into a policy (one LoRAError naming the bad option)."""
        if energy is not None and budget is not None:
            raise LoRAError("--energy and --budget are exclusive: pick one rank policy")
        if (energy is not None or budget is not None) and (rank is not None or conv_rank is not None):
            raise LoRAError("--rank/--conv-rank set fixed ranks; they cannot be combined with --energy or --budget"
                            " (use --max-rank to cap those)")
        for name, value in (("--rank", rank), ("--conv-rank", conv_rank), ("--max-rank", max_rank)):
            if value is not None and value <= 0:
                raise LoRAError(f"{name} must be a positive integer, got {value}")
        if energy is not None:
            if not (0.0 < energy <= 1.0) or math.isnan(energy):
                raise LoRAError(f"--energy must be a fraction in (0, 1], got {energy}")
            return cls(kind="energy", energy=float(energy), max_rank=max_rank)
        if budget is not None:
            return cls(kind="budget", budget_bytes=parse_size(budget), max_rank=max_rank)
        return cls(kind="fixed", rank=rank or DEFAULT_RANK, conv_rank=conv_rank or DEFAULT_CONV_RANK,
                   max_rank=max_rank)

    def limit(self, shape: tuple[int, ...]) -> int:
        """The highest rank this layer may get: its smaller side, capped by ``max_rank``."""
        from lbm_registry.lora.format import matrix_shape  # torch: options are checked without it

        m, n = matrix_shape(shape)
        return min(m, n, self.max_rank or m * n)

    def fixed_rank(self, shape: tuple[int, ...]) -> int:
        """The fixed policy's rank for a layer (``conv_rank`` for 4-d weights)."""
        r = self.conv_rank if len(shape) == 4 else self.rank
        return min(r, self.limit(shape))

    def describe(self) -> str:
        cap = f", max {self.max_rank}" if self.max_rank else ""
        if self.kind == "energy":
            return f"energy {self.energy:g}{cap}"
        if self.kind == "budget":
            return f"budget {format_size(self.budget_bytes or 0)}{cap}"
        return f"fixed {self.rank}/{self.conv_rank}{cap}"

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if self.kind != "fixed":
            d.pop("rank", None)
            d.pop("conv_rank", None)
        return d


def energy_rank(singular_values: torch.Tensor, total_energy: float, fraction: float) -> int | None:
    """Smallest ``r`` with ``sum(s[:r]^2) >= fraction * total``; None if ``s`` is too short to tell.

    ``total_energy`` is ``||dW||_F^2`` measured on the matrix itself, so a partial spectrum
    (the top of a randomized sketch) is enough whenever it already reaches the target.
    """
    if total_energy <= 0:
        return 0
    import torch

    cum = torch.cumsum(singular_values.double() ** 2, 0)
    target = fraction * total_energy * (1 - 1e-12)
    hit = torch.nonzero(cum >= target)
    if len(hit) == 0:
        return None
    return int(hit[0]) + 1


@dataclass
class LayerSpectrum:
    """What the budget allocation knows about one layer.

    ``values``: the top singular values found so far (descending); ``cost``: parameters per
    rank-1 component, ``m + n``; ``limit``: the highest rank allowed; ``complete``: ``values``
    holds every value up to ``limit`` (exact spectrum, or the sketch already reached the limit).
    """

    values: torch.Tensor
    cost: int
    limit: int
    complete: bool


@dataclass
class BudgetAllocation:
    ranks: dict[str, int]
    used_params: int
    saturated: list[str]   # layers that took every known value but could take more: need a deeper spectrum


def allocate_budget(spectra: Mapping[str, LayerSpectrum], budget_params: int) -> BudgetAllocation:
    """Greedy knapsack over rank-1 components, by ``s_i^2 / (m + n)``, until the budget is used.

    A component that no longer fits is skipped and smaller ones may still fill the remainder;
    since all components of a layer cost the same, a layer's choice stays a prefix of its spectrum.
    """
    import numpy as np

    names = list(spectra)
    ratio_parts, owner_parts = [], []
    costs = np.array([spectra[n].cost for n in names], dtype=np.int64)
    for i, name in enumerate(names):
        sp = spectra[name]
        vals = sp.values[: sp.limit].double().numpy()
        ratio_parts.append(vals**2 / sp.cost)
        owner_parts.append(np.full(len(vals), i, dtype=np.int64))
    ranks = np.zeros(len(names), dtype=np.int64)
    remaining = int(budget_params)
    if ratio_parts:
        ratios = np.concatenate(ratio_parts)
        owners = np.concatenate(owner_parts)
        useful = ratios > 0  # a zero singular value buys nothing
        ratios, owners = ratios[useful], owners[useful]
        order = np.argsort(-ratios, kind="stable")
        item_cost = costs[owners[order]]
        # Fast path: the longest prefix of the order that fits; then a scan of the rest for fillers.
        cum = np.cumsum(item_cost)
        head = int(np.searchsorted(cum, remaining, side="right"))
        np.add.at(ranks, owners[order[:head]], 1)
        remaining -= int(cum[head - 1]) if head else 0
        min_cost = int(costs.min())
        for j in range(head, len(order)):
            if remaining < min_cost:
                break
            c = int(item_cost[j])
            if c <= remaining:
                ranks[owners[order[j]]] += 1
                remaining -= c
    out = {name: int(ranks[i]) for i, name in enumerate(names)}
    saturated = [name for name in names
                 if not spectra[name].complete and out[name] >= min(len(spectra[name].values), spectra[name].limit)]
    return BudgetAllocation(ranks=out, used_params=int(budget_params) - remaining, saturated=saturated)


def lora_header_overhead(modules: Mapping[str, tuple[int, ...]]) -> int:
    """An upper bound on a LoRA file's bytes besides the factors: header JSON, metadata, alphas.

    Used to turn a ``--budget`` file size into a factor-byte budget.
    """
    total = 4096
    for name in modules:
        key = len("denoiser.") + len(name)
        # three header entries (~100 bytes of JSON each besides the key), the fp32 alpha, and the
        # module's entry in the lbm_registry metadata (name, rank, error).
        total += 3 * (key + 112) + 4 + len(name) + 48
    return total
