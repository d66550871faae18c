"""Many LoRAs in one forward pass: ``W x`` once for the batch, ``s_i * up_i(down_i(x_i))`` per LoRA.

The Punica / S-LoRA idea for an image model. Every LoRA-able layer (each Linear/Conv2d whose
weight has ndim >= 2, the 792 layers of the LBM denoiser) gets a forward hook: the layer runs
unchanged on the whole batch (``W x``, the expensive part, shared by every sample), then for
each LoRA the batch uses, its low-rank path runs on just the samples that asked for it and is
added to their rows of the output. Samples with no LoRA skip the low-rank path; a sample with
several LoRAs (stacking) is in several groups. The denoiser's weights are never modified, so no
merge, no unmerge and no copy of the base, whatever the mix of LoRAs.

Why hooks rather than wrapper modules: the module tree, its names and its state dict stay those
of the diffusers model (what ``weight_layers`` and the merge code see), and with no plan set a
hook returns at once. The batch dimension is dim 0 for every layer of the UNet (attention
projections see (B, tokens, C), convs (B, C, H, W), the time embedding (B, C)); each hook checks.

Per layer the low-rank path costs ``r (in + out)`` per token against ``in * out`` for ``W x``:
about 2.5 % for a rank-32 1280-wide projection, under 2 % for rank-16 3x3 convs.

Two ways to run it, same result within the dtype's rounding:

- **loop**: per layer, per LoRA of the batch, two small matmuls (or convs) on that LoRA's rows.
  Cheap when a batch uses one or two LoRAs; with ``G`` LoRAs it is ``792 x G x ~5`` small
  kernels per pass, which a GPU pays for in launch latency.
- **batched** (Punica / S-LoRA in plain torch): per layer, each sample's factors stacked into
  one ``(B, r, in)`` / ``(B, out, r)`` pair (zero-padded to the largest rank; a sample without
  a LoRA gets zeros), then one batched matmul for the down projection (a grouped conv for k x k
  convs) and one ``baddbmm`` that adds the up projection into the layer's output in place:
  a fixed handful of kernels per layer whatever the number of LoRAs. A sample with stacked
  LoRAs takes one such round per stacking level.

``mode="auto"`` picks per batch with :func:`batched_is_faster` (the rule measured in
``benchmarks/serve.py`` and ``benchmarks/device_check.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lbm_registry.errors import LoRAError
from lbm_registry.lora.format import LoRAFile


@dataclass
class LayerFactors:
    """One layer's low-rank pair in the serving dtype: ``delta x = scale * up(down(x))``."""

    down: torch.Tensor  # (r, in) or (r, in, k, k)
    up: torch.Tensor    # (out, r) or (out, r, 1, 1)
    scale: float        # alpha / r


@dataclass
class LoRAFactors:
    """A whole LoRA ready for the low-rank path: factors on the serving device and dtype."""

    key: str                                   # content address (sha256) of the LoRA file
    layers: dict[str, LayerFactors]
    source: LoRAFile | None = field(default=None, repr=False)  # kept to merge (see Engine)

    @property
    def nbytes(self) -> int:
        return sum(f.down.numel() * f.down.element_size() + f.up.numel() * f.up.element_size()
                   for f in self.layers.values())


def factors_from_lora(lora: LoRAFile, key: str, *, device: torch.device | str, dtype: torch.dtype,
                      keep_source: bool = False) -> LoRAFactors:
    """Copy a LoRA's factors to ``device`` in ``dtype`` (conv factors keep their 4-d shapes)."""
    layers = {name: LayerFactors(layer.down.to(device=device, dtype=dtype).contiguous(),
                                 layer.up.to(device=device, dtype=dtype).contiguous(), layer.scale)
              for name, layer in lora.layers.items()}
    return LoRAFactors(key=key, layers=layers, source=lora if keep_source else None)


@dataclass
class LoRAGroup:
    """The samples of a batch that use one LoRA, and each one's scale."""

    factors: LoRAFactors
    rows: slice | torch.Tensor        # a slice when the samples are adjacent, else an index tensor
    scales: float | torch.Tensor      # one float when all samples share it, else (n,) per sample


@dataclass
class StackLevel:
    """One round of the batched path: at most one LoRA per sample.

    ``slots[i]`` is the index in ``BatchPlan.groups`` of sample i's LoRA at this stacking level
    (None: the sample has none here), ``scales[i]`` its scale. Level 0 holds every sample's
    first LoRA, level 1 the second LoRA of samples that stack two, and so on.
    """

    slots: list[int | None]
    scales: list[float]
    _scale_tensor: torch.Tensor | None = field(default=None, repr=False)
    _layer_scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def scale_tensor(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The per-sample scales as a (B, 1, 1) tensor, or None when every sample's is 1.
        Made once per plan (one host-to-device copy, not one per layer)."""
        if all(s == 1.0 for s in self.scales):
            return None
        t = self._scale_tensor
        if t is None or t.device != device or t.dtype != dtype:
            t = self._scale_tensor = torch.tensor(self.scales, device=device, dtype=dtype).view(-1, 1, 1)
        return t


@dataclass
class BatchPlan:
    """Which LoRA applies to which sample, for one forward pass of a batch of ``batch`` samples."""

    batch: int
    groups: list[LoRAGroup]
    levels: list[StackLevel] = field(default_factory=list)

    @property
    def distinct(self) -> int:
        """How many different LoRAs the batch uses."""
        return len(self.groups)


def plan_batch(samples: Sequence[Sequence[tuple[LoRAFactors, float]]], *,
               device: torch.device | str = "cpu") -> BatchPlan:
    """Group a batch by LoRA. ``samples[i]`` lists sample i's (LoRA, effective scale) pairs.

    Callers sort samples so those sharing a LoRA are adjacent: their group is then a slice of
    the batch (a view: no gather, no scatter). Scale-0 entries are dropped.
    """
    members: dict[str, tuple[LoRAFactors, list[int], list[float]]] = {}
    for i, loras in enumerate(samples):
        for factors, scale in loras:
            if scale == 0:
                continue
            entry = members.setdefault(factors.key, (factors, [], []))
            if entry[1] and entry[1][-1] == i:   # the same LoRA twice in one stack: add the scales
                entry[2][-1] += float(scale)
            else:
                entry[1].append(i)
                entry[2].append(float(scale))
    groups = []
    per_sample: list[list[tuple[int, float]]] = [[] for _ in samples]
    for g, (factors, idx, scales) in enumerate(members.values()):
        contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
        rows: slice | torch.Tensor = (slice(idx[0], idx[-1] + 1) if contiguous
                                      else torch.tensor(idx, dtype=torch.long, device=device))
        same = all(s == scales[0] for s in scales)
        sc: float | torch.Tensor = scales[0] if same else torch.tensor(scales, device=device)
        groups.append(LoRAGroup(factors, rows, sc))
        for i, s in zip(idx, scales, strict=True):
            per_sample[i].append((g, s))
    depth = max((len(p) for p in per_sample), default=0)
    levels = [StackLevel([p[k][0] if k < len(p) else None for p in per_sample],
                         [p[k][1] if k < len(p) else 1.0 for p in per_sample]) for k in range(depth)]
    return BatchPlan(batch=len(samples), groups=groups, levels=levels)


Mode = Literal["auto", "loop", "batched"]

BATCHED_MIN_DISTINCT: dict[str, int | None] = {"cpu": None, "cuda": 2}
"""The auto rule: the batched path when a batch uses at least this many different LoRAs (None:
never). Measured, not guessed (README, "Serving"). On CPU the two paths were within noise of
each other at every count (tiny twin, and full-size layer shapes with 8 samples: the low-rank
terms cost 5-10% of ``W x`` either way; the batched path's stacked copies and grouped 3x3 convs
cost what the loop's extra calls do), so the CPU keeps the loop, which copies nothing. On a GPU
each small kernel costs launch latency, so two groups already make more launches than the
batched path's fixed few; ``benchmarks/device_check.py`` measures 1, 2, 4 and 8 to confirm.
Other devices follow the GPU rule."""


def batched_is_faster(device: torch.device | str, distinct: int) -> bool:
    """Whether the batched path is the faster one for a batch of ``distinct`` LoRAs."""
    kind = torch.device(device).type
    threshold = BATCHED_MIN_DISTINCT.get(kind, BATCHED_MIN_DISTINCT["cuda"])
    return threshold is not None and distinct >= threshold


class MultiLoRA:
    """Hooks on a denoiser that add each sample's own LoRA(s) during :meth:`apply`.

    ``with multi.apply(plan): denoiser(x, t)`` runs one forward pass in which sample i gets
    ``W x_i + sum_j s_ij * up_j(down_j(x_i))``. Outside ``apply`` the denoiser is untouched.
    ``forward_passes`` counts denoiser calls (tests prove a mixed batch is one pass).
    ``mode``: ``loop``, ``batched`` or ``auto`` (see the module docstring); ``batched_passes``
    counts the passes that took the batched path.
    One plan at a time: the serving engine runs batches one after another.
    """

    def __init__(self, denoiser: nn.Module, mode: Mode = "auto") -> None:
        from lbm_registry.lbm.model import weight_layers

        if mode not in ("auto", "loop", "batched"):
            raise ValueError(f"unknown mixed-LoRA mode {mode!r}: use auto, loop or batched")
        self.mode: Mode = mode
        self.batched_passes = 0
        self._batched = False
        self.denoiser = denoiser
        self.layers = weight_layers(denoiser)
        self.shapes = {name: tuple(m.weight.shape) for name, m in self.layers.items()}
        self._plan: BatchPlan | None = None
        self.forward_passes = 0
        self._handles = [denoiser.register_forward_pre_hook(self._count)]
        for name, module in self.layers.items():
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                raise LoRAError(f"{name}: grouped or non-zero-padded convs are not supported by the LoRA path")
            self._handles.append(module.register_forward_hook(self._hook(name, module)))

    def _count(self, module: nn.Module, args: object) -> None:
        self.forward_passes += 1
        if self._plan is not None and self._batched:
            self.batched_passes += 1

    def uses_batched(self, plan: BatchPlan) -> bool:
        """Whether ``plan`` runs on the batched path (``mode``, or the auto rule)."""
        if self.mode != "auto":
            return self.mode == "batched"
        device = next(iter(self.layers.values())).weight.device if self.layers else torch.device("cpu")
        return batched_is_faster(device, plan.distinct)

    def check(self, lora: LoRAFile) -> None:
        """Raise LoRAError unless every layer of ``lora`` exists here with its shape."""
        from lbm_registry.lora.apply import check_lora_targets

        check_lora_targets(lora, self.shapes)

    @contextmanager
    def apply(self, plan: BatchPlan | None) -> Iterator[None]:
        """Use ``plan`` for the forward passes run inside the block."""
        if self._plan is not None:
            raise RuntimeError("MultiLoRA.apply is not re-entrant")
        self._plan = plan if plan is not None and plan.groups else None
        self._batched = self._plan is not None and self.uses_batched(self._plan)
        try:
            yield
        finally:
            self._plan = None
            self._batched = False

    def _hook(self, name: str, module: nn.Module):
        conv = isinstance(module, nn.Conv2d)

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            if plan is None:
                return None
            x = args[0]
            if x.shape[0] != plan.batch:
                raise RuntimeError(f"{name}: batch dimension {x.shape[0]} is not the plan's {plan.batch}")
            if self._batched:
                for level in plan.levels:
                    _batched_level(name, mod, conv, x, output, plan, level)
                return output
            for group in plan.groups:
                f = group.factors.layers.get(name)
                if f is None:
                    continue
                rows = group.rows
                xi = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
                if conv:
                    h = F.conv2d(F.conv2d(xi, f.down, None, mod.stride, mod.padding, mod.dilation), f.up)
                else:
                    h = F.linear(F.linear(xi, f.down), f.up)
                if isinstance(group.scales, torch.Tensor):
                    h = h * group.scales.to(h.dtype).view(-1, *([1] * (h.ndim - 1))) * f.scale
                    alpha = 1.0
                else:
                    alpha = group.scales * f.scale
                if isinstance(rows, slice):
                    output[rows].add_(h, alpha=alpha)
                else:
                    output.index_add_(0, rows, h, alpha=alpha)
            return output

        return hook

    def close(self) -> None:
        """Remove the hooks (the denoiser is as it was)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> MultiLoRA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



# -- the batched path -------------------------------------------------------------------------
def _stacked(name: str, plan: BatchPlan, level: StackLevel, like: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor] | None:
    """This layer's factors for every sample of ``level``: ``down (B, R, ...)``, ``up (B, out, R)``
    (zero rows and columns pad smaller ranks; zeros for a sample without a LoRA here) and the
    LoRAs' ``alpha / r``: one float when they share it, else a (B, 1, 1) tensor. None when no
    sample has a LoRA on this layer."""
    facs: list[LayerFactors | None] = [None if g is None else plan.groups[g].factors.layers.get(name)
                                       for g in level.slots]
    present = [f for f in facs if f is not None]
    if not present:
        return None
    first = present[0]
    rank = max(f.down.shape[0] for f in present)
    ups = [f.up.reshape(f.up.shape[0], f.up.shape[1]) for f in present]
    if len(present) == len(facs) and all(f.down.shape[0] == rank for f in present):
        down = torch.stack([f.down for f in present])          # one copy kernel each
        up = torch.stack(ups)
    else:
        down = first.down.new_zeros((len(facs), rank, *first.down.shape[1:]))
        up = first.up.new_zeros((len(facs), first.up.shape[0], rank))
        k = 0
        for i, f in enumerate(facs):
            if f is not None:
                r = f.down.shape[0]
                down[i, :r].copy_(f.down)
                up[i, :, :r].copy_(ups[k])
                k += 1
    if len({f.scale for f in present}) == 1:
        return down, up, first.scale
    per = level._layer_scales.get(name)   # LoRAs with different alpha / r: made once per plan
    if per is None:
        per = torch.tensor([0.0 if f is None else f.scale for f in facs], dtype=like.dtype,
                           device=like.device).view(-1, 1, 1)
        level._layer_scales[name] = per
    return down, up, per


def _batched_level(name: str, mod: nn.Module, conv: bool, x: torch.Tensor, output: torch.Tensor,
                   plan: BatchPlan, level: StackLevel) -> None:
    """Add one stacking level's low-rank terms to ``output`` in place: one batched down
    projection, one ``baddbmm`` for the up projection."""
    st = _stacked(name, plan, level, x)
    if st is None:
        return
    down, up, lora_scale = st
    b = x.shape[0]
    rank = down.shape[1]
    if conv:
        c, kh, kw = down.shape[2:]
        if (kh, kw) == (1, 1) and tuple(mod.stride) == (1, 1) and _no_padding(mod.padding):
            h = torch.bmm(down.view(b, rank, c), x.reshape(b, c, -1))               # (B, R, HW)
        else:   # k x k: one grouped conv, each sample its own group
            h = F.conv2d(x.reshape(1, b * c, *x.shape[2:]), down.reshape(b * rank, c, kh, kw), None,
                         mod.stride, mod.padding, mod.dilation, groups=b)
            h = h.view(b, rank, -1)
        h = _scale(h, level.scale_tensor(h.device, h.dtype), lora_scale)
        out3 = output.view(b, output.shape[1], -1) if output.is_contiguous() else None
        lhs, rhs = up, h                                                        # (B, out, R) @ (B, R, HW)
    else:
        xin = x.reshape(b, -1, x.shape[-1])
        h = torch.bmm(xin, down.transpose(1, 2))                                # (B, T, R)
        h = _scale(h, level.scale_tensor(h.device, h.dtype), lora_scale)
        out3 = output.view(b, -1, output.shape[-1]) if output.is_contiguous() else None
        lhs, rhs = h, up.transpose(1, 2)                                        # (B, T, R) @ (B, R, out)
    alpha = lora_scale if isinstance(lora_scale, float) else 1.0
    if out3 is not None:
        out3.baddbmm_(lhs, rhs, alpha=alpha)     # the add fused into the GEMM, in place
    else:
        output.add_(torch.bmm(lhs, rhs).view_as(output), alpha=alpha)


def _scale(h: torch.Tensor, per_sample: torch.Tensor | None, lora_scale: float | torch.Tensor) -> torch.Tensor:
    """Scale the rank-R activations (the small tensor) rather than the layer output."""
    if per_sample is not None:
        h = h.mul_(per_sample)
    if isinstance(lora_scale, torch.Tensor):
        h = h.mul_(lora_scale)
    return h


def _no_padding(padding: object) -> bool:
    return padding in (0, (0, 0), "valid")
