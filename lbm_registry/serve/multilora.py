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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

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
class BatchPlan:
    """Which LoRA applies to which sample, for one forward pass of a batch of ``batch`` samples."""

    batch: int
    groups: list[LoRAGroup]


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
    for factors, idx, scales in members.values():
        contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
        rows: slice | torch.Tensor = (slice(idx[0], idx[-1] + 1) if contiguous
                                      else torch.tensor(idx, dtype=torch.long, device=device))
        same = all(s == scales[0] for s in scales)
        sc: float | torch.Tensor = scales[0] if same else torch.tensor(scales, device=device)
        groups.append(LoRAGroup(factors, rows, sc))
    return BatchPlan(batch=len(samples), groups=groups)


class MultiLoRA:
    """Hooks on a denoiser that add each sample's own LoRA(s) during :meth:`apply`.

    ``with multi.apply(plan): denoiser(x, t)`` runs one forward pass in which sample i gets
    ``W x_i + sum_j s_ij * up_j(down_j(x_i))``. Outside ``apply`` the denoiser is untouched.
    ``forward_passes`` counts denoiser calls (tests prove a mixed batch is one pass).
    One plan at a time: the serving engine runs batches one after another.
    """

    def __init__(self, denoiser: nn.Module) -> None:
        from lbm_registry.lbm.model import weight_layers

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
        try:
            yield
        finally:
            self._plan = None

    def _hook(self, name: str, module: nn.Module):
        conv = isinstance(module, nn.Conv2d)

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            if plan is None:
                return None
            x = args[0]
            if x.shape[0] != plan.batch:
                raise RuntimeError(f"{name}: batch dimension {x.shape[0]} is not the plan's {plan.batch}")
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

