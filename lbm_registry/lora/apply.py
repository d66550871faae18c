"""Merge LoRAs into a denoiser's weights (and take them out again).

Merging (``W += scale * delta``) rather than wrapping layers: inference then runs at the base
model's speed, and LBM infers in one step, so a LoRA is never swapped per step.

All merges go through :func:`add_deltas_`, one fused kernel per layer: ``W.addmm_(up, down)``
accumulates in fp32 and never materialises the delta. fp32 weights are updated in place (one
pass over W); bf16/fp16 weights are processed in row blocks of a few MB that are upcast, get
every LoRA's product added in fp32, and are rounded once back to the weight's dtype (adding a
bf16-rounded delta to bf16 weights would round twice). Why: the straightforward
``(w.float() + up @ down * s).to(w.dtype)`` writes and re-reads three full-size temporaries per
layer; on the full-size model that is ~40 GB of memory traffic and was 4x slower.

- :func:`merge_state_dict`: the same on a checkpoint's state dict (returns a new dict).
- :func:`merge_lora` / :func:`unmerge_lora`: one LoRA, in place. Unmerging adds the same
  product at ``-scale``, so it restores the weights to within one rounding of the weight's
  dtype (bit-exact restores need :class:`MergedLoRAs`).
- :class:`MergedLoRAs`: several LoRAs at their own scales under a global multiplier. It can
  always get back the original weights of the layers it touches (kept copies, or re-read from
  the base checkpoint), so :meth:`MergedLoRAs.set_scale` and :meth:`MergedLoRAs.restore` are
  bit-exact: ``set_scale(0)`` gives back the base model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from lbm_registry.errors import LoRAError
from lbm_registry.lbm.threads import SMALL_LAYER_NUMEL, single_thread_below
from lbm_registry.lora.format import LoRAFile, LoRALayer

BLOCK_BYTES = 4 << 20
"""fp32 scratch per row block for low-precision weights on CPU: fits in L2/L3 with the factors."""

OriginalsFn = Callable[[str], torch.Tensor]
"""Module name -> its original (pre-merge) weight, any dtype/device (cast on copy)."""


def _layers(denoiser: nn.Module) -> dict[str, nn.Module]:
    from lbm_registry.lbm.model import weight_layers

    return weight_layers(denoiser)


def layer_shapes(denoiser: nn.Module) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape for every LoRA-able layer of ``denoiser``."""
    return {name: tuple(m.weight.shape) for name, m in _layers(denoiser).items()}


def check_lora_targets(lora: LoRAFile, layer_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise LoRAError naming the LoRA modules that match no layer, or whose shape differs."""
    unknown = [m for m in lora.layers if m not in layer_shapes]
    wrong = [(m, lora.layers[m].weight_shape, tuple(layer_shapes[m]))
             for m in lora.layers if m in layer_shapes and tuple(lora.layers[m].weight_shape) != tuple(layer_shapes[m])]
    if not unknown and not wrong:
        return
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} module(s) match no layer of the denoiser (e.g. {', '.join(unknown[:3])})")
    if wrong:
        m, have, want = wrong[0]
        more = f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""
        parts.append(f"{len(wrong)} module(s) have the wrong shape (e.g. {m}: LoRA {have} vs layer {want}{more})")
    raise LoRAError("LoRA does not fit this model: " + "; ".join(parts))


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def add_deltas_(dst: torch.Tensor, terms: Sequence[tuple[LoRALayer, float]],
                src: torch.Tensor | None = None) -> torch.Tensor:
    """``dst = src + sum(s * (alpha/r) * up @ down)`` over ``terms``, in place; returns ``dst``.

    ``src`` defaults to ``dst`` itself (merge into the current weights); otherwise it is any
    tensor of ``dst``'s shape (e.g. the original weight in the checkpoint's dtype), cast on copy.
    Products accumulate in fp32 (fp64 for fp64 weights) and are rounded once to ``dst.dtype``.
    """
    if not dst.is_contiguous():
        tmp = dst.contiguous()
        add_deltas_(tmp, terms, src)
        return dst.copy_(tmp)
    acc = _accumulator(dst.dtype)
    m = dst.shape[0]
    d2 = dst.view(m, -1)
    s2 = None if src is None or src is dst else src.reshape(m, -1)
    factors = [(layer.up.reshape(m, layer.rank).to(dst.device, acc),
                layer.down.reshape(layer.rank, -1).to(dst.device, acc),
                float(s) * layer.scale)
               for layer, s in terms if s != 0]
    with single_thread_below(dst.numel(), SMALL_LAYER_NUMEL):
        if dst.dtype == acc:
            if s2 is not None:
                d2.copy_(s2)
            for up, down, a in factors:
                d2.addmm_(up, down, alpha=a)
            return dst
        if not factors:
            if s2 is not None:
                d2.copy_(s2)
            return dst
        n = d2.shape[1]
        rows = m if dst.device.type != "cpu" else max(1, min(m, BLOCK_BYTES // (4 * n)))
        buf = torch.empty(rows, n, dtype=acc, device=dst.device)
        source = d2 if s2 is None else s2
        for i in range(0, m, rows):
            j = min(m, i + rows)
            b = buf[: j - i]
            b.copy_(source[i:j])
            for up, down, a in factors:
                b.addmm_(up[i:j], down, alpha=a)
            d2[i:j].copy_(b)
    return dst


@torch.no_grad()
def merge_lora(denoiser: nn.Module, lora: LoRAFile, scale: float = 1.0) -> None:
    """``W += scale * delta`` for every LoRA layer, in place (checked first: all or nothing)."""
    layers = _layers(denoiser)
    check_lora_targets(lora, layer_shapes(denoiser))
    if scale == 0:
        return
    for name, layer in lora.layers.items():
        add_deltas_(layers[name].weight.data, [(layer, scale)])


def unmerge_lora(denoiser: nn.Module, lora: LoRAFile, scale: float = 1.0) -> None:
    """Undo :func:`merge_lora` with the same ``scale`` (to within the weight dtype's rounding).

    Subtracting ``scale * delta`` is adding ``-scale * delta`` (negation is exact in fp32).
    """
    merge_lora(denoiser, lora, -scale)


@torch.no_grad()
def merge_state_dict(state_dict: Mapping[str, torch.Tensor], lora: LoRAFile, scale: float = 1.0,
                     prefix: str = "denoiser.") -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with ``scale * delta`` added to ``<prefix><module>.weight``.

    For baking a LoRA into a checkpoint without building a model. Untouched tensors are shared,
    not copied. Raises LoRAError if a LoRA module has no matching weight of the right shape.
    """
    shapes = {k[len(prefix):-len(".weight")]: tuple(v.shape) for k, v in state_dict.items()
              if k.startswith(prefix) and k.endswith(".weight") and v.ndim >= 2}
    check_lora_targets(lora, shapes)
    out = dict(state_dict)
    for name, layer in lora.layers.items():
        key = f"{prefix}{name}.weight"
        w = state_dict[key]
        out[key] = add_deltas_(torch.empty(w.shape, dtype=w.dtype, device=w.device), [(layer, scale)], src=w)
    return out


class MergedLoRAs:
    """Several LoRAs merged into ``denoiser`` at ``scale_i * global_scale``; merged on construction.

    Re-scaling needs the original weights of the layers the LoRAs touch. By default they are
    copied (to ``originals_device``, default next to the weights; ``"cpu"`` saves accelerator
    memory). For a full-size model that copy is as large as the model itself (10 GB in fp32), so
    :func:`lbm_registry.api.run.infer.load` passes ``originals``: a function that re-reads a weight
    from the base checkpoint (memory-mapped, read-only in the registry), and nothing is copied.
    Use as a context manager to restore the base weights on exit.
    """

    def __init__(self, denoiser: nn.Module, loras: Sequence[tuple[LoRAFile, float]], *,
                 global_scale: float = 1.0, originals: OriginalsFn | None = None,
                 originals_device: str | torch.device | None = None) -> None:
        self._layers = _layers(denoiser)
        self._shapes = {n: tuple(m.weight.shape) for n, m in self._layers.items()}
        self._kept: dict[str, torch.Tensor] | None = None if originals is not None else {}
        self._kept_device = originals_device
        self._original = originals if originals is not None else self._kept_original
        self._loras: list[tuple[LoRAFile, float]] = []
        self._modules: dict[str, nn.Module] = {}
        self._global = float(global_scale)
        self.replace(loras)

    def _kept_original(self, name: str) -> torch.Tensor:
        assert self._kept is not None
        return self._kept[name]

    def replace(self, loras: Sequence[tuple[LoRAFile, float]]) -> None:
        """Swap in other LoRAs (checked first: nothing changes if one does not fit), keeping the
        global scale. The weights go back to the base first, so no model is reloaded: ``compare``
        runs two LoRAs on one loaded base this way."""
        for lora, _ in loras:
            check_lora_targets(lora, self._shapes)
        self.restore()
        self._loras = [(lora, float(s)) for lora, s in loras]
        touched = sorted({name for lora, _ in self._loras for name in lora.layers})
        self._modules = {name: self._layers[name] for name in touched}
        if self._kept is not None:   # keep copies of exactly the layers now touched
            self._kept = {name: self._kept[name] if name in self._kept else
                          m.weight.detach().to(self._kept_device or m.weight.device, copy=True)
                          for name, m in self._modules.items()}
        self._apply(from_originals=False)

    @property
    def global_scale(self) -> float:
        return self._global

    @property
    def scales(self) -> tuple[float, ...]:
        """The effective scale of each LoRA as merged now (its own scale times the global one)."""
        return tuple(s * self._global for _, s in self._loras)

    @property
    def loras(self) -> list[tuple[LoRAFile, float]]:
        return list(self._loras)

    def _terms(self, name: str) -> list[tuple[LoRALayer, float]]:
        return [(lora.layers[name], s * self._global) for lora, s in self._loras
                if name in lora.layers and s * self._global != 0]

    def _source(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        src = self._original(name)
        if tuple(src.shape) != tuple(weight.shape):
            raise LoRAError(f"original weight of {name} has shape {tuple(src.shape)}, expected {tuple(weight.shape)}")
        return src.to(weight.device)

    @torch.no_grad()
    def _apply(self, from_originals: bool = True) -> None:
        for name, module in self._modules.items():
            w = module.weight.data
            src = self._source(name, w) if from_originals else None
            add_deltas_(w, self._terms(name), src)

    def set_scale(self, scale: float) -> None:
        """Re-merge every LoRA at ``scale_i * scale`` from the originals (bit-exact base at 0)."""
        self._global = float(scale)
        self._apply()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back (bit-exact); the object can be re-applied with set_scale."""
        for name, module in self._modules.items():
            module.weight.data.copy_(self._source(name, module.weight))

    def __enter__(self) -> MergedLoRAs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
