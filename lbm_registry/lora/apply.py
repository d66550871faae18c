"""Merge LoRAs into a denoiser's weights (and take them out again).

Merging (``W += scale * delta``) rather than wrapping layers: inference then runs at the base
model's speed, and LBM infers in one step, so a LoRA is never swapped per step. Deltas are
computed in fp32 from the factors on the weight's device, added to the weight in fp32 and
rounded once to the weight's dtype (adding a bf16-rounded delta to bf16 weights would round
twice).

- :func:`merge_state_dict`: the same on a checkpoint's state dict (returns a new dict).
- :func:`merge_lora` / :func:`unmerge_lora`: one LoRA, in place. Unmerging recomputes the same
  fp32 delta and subtracts it, so it restores the weights to within one rounding of the
  weight's dtype (bit-exact restores need :class:`MergedLoRAs`).
- :class:`MergedLoRAs`: several LoRAs at their own scales under a global multiplier. It keeps
  the original weights of the layers it touches, so :meth:`MergedLoRAs.set_scale` and
  :meth:`MergedLoRAs.restore` are bit-exact: ``set_scale(0)`` gives back the base model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lbm_registry.errors import LoRAError
from lbm_registry.lora.format import LoRAFile, LoRALayer
from lbm_registry.lora.threads import SMALL_LAYER_NUMEL, single_thread_below


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


def _delta(layer: LoRALayer, weight: torch.Tensor) -> torch.Tensor:
    return layer.delta(torch.float32, weight.device)


@torch.no_grad()
def merge_lora(denoiser: nn.Module, lora: LoRAFile, scale: float = 1.0) -> None:
    """``W += scale * delta`` for every LoRA layer, in place (checked first: all or nothing)."""
    layers = _layers(denoiser)
    check_lora_targets(lora, layer_shapes(denoiser))
    if scale == 0:
        return
    for name, layer in lora.layers.items():
        w = layers[name].weight
        with single_thread_below(w.numel(), SMALL_LAYER_NUMEL):
            w.copy_((w.float() + _delta(layer, w).mul_(scale)).to(w.dtype))


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
        with single_thread_below(w.numel(), SMALL_LAYER_NUMEL):
            out[key] = (w.float() + _delta(layer, w).mul_(scale)).to(w.dtype)
    return out


class MergedLoRAs:
    """Several LoRAs merged into ``denoiser`` at ``scale_i * global_scale``; merged on construction.

    ``originals_device`` is where the untouched weights of the affected layers are kept
    (default: next to the weights; ``"cpu"`` saves accelerator memory at the cost of a copy per
    :meth:`set_scale`). Use as a context manager to restore the base weights on exit.
    """

    def __init__(self, denoiser: nn.Module, loras: Sequence[tuple[LoRAFile, float]], *,
                 global_scale: float = 1.0, originals_device: str | torch.device | None = None) -> None:
        layers = _layers(denoiser)
        shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
        for lora, _ in loras:
            check_lora_targets(lora, shapes)
        self._loras = [(lora, float(s)) for lora, s in loras]
        self._global = float(global_scale)
        touched = sorted({name for lora, _ in self._loras for name in lora.layers})
        self._modules = {name: layers[name] for name in touched}
        self._originals = {
            name: m.weight.detach().to(originals_device or m.weight.device, copy=True)
            for name, m in self._modules.items()
        }
        self._apply()

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

    @torch.no_grad()
    def _apply(self) -> None:
        for name, module in self._modules.items():
            w = module.weight
            with single_thread_below(w.numel(), SMALL_LAYER_NUMEL):
                total: torch.Tensor | None = None
                for lora, s in self._loras:
                    layer = lora.layers.get(name)
                    eff = s * self._global
                    if layer is None or eff == 0:
                        continue
                    d = _delta(layer, w).mul_(eff)
                    total = d if total is None else total.add_(d)
                base = self._originals[name].to(w.device)
                w.copy_(base if total is None else (base.float() + total).to(w.dtype))

    def set_scale(self, scale: float) -> None:
        """Re-merge every LoRA at ``scale_i * scale`` from the stored originals (bit-exact base at 0)."""
        self._global = float(scale)
        self._apply()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back (bit-exact); the object can be re-applied with set_scale."""
        for name, module in self._modules.items():
            module.weight.copy_(self._originals[name].to(module.weight.device))

    def __enter__(self) -> MergedLoRAs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
