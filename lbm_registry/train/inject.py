"""LoRA wrapper modules for training that round-trip the native LoRA file exactly.

Why our own wrappers rather than PEFT: the native file stores ``lora_down`` as ``(r, in[, k, k])``
and ``lora_up`` as ``(out, r[, 1, 1])`` with a per-module alpha. A wrapper whose ``lora_down`` /
``lora_up`` *are* those tensors (a Linear/Linear pair, or a k x k conv with the base's
stride/padding followed by a 1 x 1 conv) reads and writes the file with no reshaping, so a
trained LoRA is bit-for-bit what the model ran with.

forward(x) = base_layer(x) + (alpha / r) * lora_up(lora_down(x))
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lbm_registry.errors import LoRAError
from lbm_registry.lora.format import LoRAFile, LoRALayer


class LoRAModule(nn.Module):
    """A frozen base layer plus a trainable low-rank residual."""

    def __init__(self, base_layer: nn.Module, lora_down: nn.Module, lora_up: nn.Module, alpha: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_down = lora_down
        self.lora_up = lora_up
        self.alpha = float(alpha)

    @property
    def rank(self) -> int:
        return int(self.lora_down.weight.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that inspects ``layer.weight`` (dtype, device, shape)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        lora_in = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_down.weight.dtype)
        return out + (self.scale * self.lora_up(self.lora_down(lora_in))).to(out.dtype)

    def to_layer(self, module: str) -> LoRALayer:
        """The factors as a file layer (detached fp32 copies)."""
        return LoRALayer(module, self.lora_down.weight.detach().float().cpu().clone(),
                         self.lora_up.weight.detach().float().cpu().clone(), self.alpha)

    @torch.no_grad()
    def load_layer(self, layer: LoRALayer) -> None:
        """Copy a file layer's factors in (shapes must match)."""
        if tuple(layer.down.shape) != tuple(self.lora_down.weight.shape) or \
                tuple(layer.up.shape) != tuple(self.lora_up.weight.shape):
            raise LoRAError(f"module {layer.module!r}: factor shapes {tuple(layer.down.shape)}/"
                            f"{tuple(layer.up.shape)} do not match {tuple(self.lora_down.weight.shape)}/"
                            f"{tuple(self.lora_up.weight.shape)}")
        self.lora_down.weight.copy_(layer.down)
        self.lora_up.weight.copy_(layer.up)
        self.alpha = float(layer.alpha)


class LoRALinear(LoRAModule):
    @classmethod
    def wrap(cls, base: nn.Linear, rank: int, alpha: float) -> LoRALinear:
        kw = {"device": base.weight.device, "dtype": torch.float32}
        down = nn.Linear(base.in_features, rank, bias=False, **kw)
        up = nn.Linear(rank, base.out_features, bias=False, **kw)
        return cls(base, down, up, alpha)


class LoRAConv2d(LoRAModule):
    @classmethod
    def wrap(cls, base: nn.Conv2d, rank: int, alpha: float) -> LoRAConv2d:
        if base.groups != 1:
            raise LoRAError("grouped convolutions are not supported by LoRA")
        kw = {"device": base.weight.device, "dtype": torch.float32}
        down = nn.Conv2d(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                         dilation=base.dilation, padding_mode=base.padding_mode, bias=False, **kw)
        up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **kw)
        return cls(base, down, up, alpha)


def lora_targets(denoiser: nn.Module) -> dict[str, nn.Module]:
    """LoRA-able layers (Linear/Conv2d with a >= 2-d weight) by module name; an injected wrapper
    stands for its layer (its children are not listed)."""
    out: dict[str, nn.Module] = {}
    wrapped: list[str] = []
    for name, m in denoiser.named_modules():  # pre-order: a wrapper comes before its children
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(m, LoRAModule):
            out[name] = m
            wrapped.append(name)
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.ndim >= 2:
            out[name] = m
    return out


_GLOB_CHARS = frozenset("*?[")


def is_plain_name(pattern: str) -> bool:
    """A pattern with no glob characters and no ``re:`` prefix (``attn1``, ``up_blocks``)."""
    return not pattern.startswith("re:") and not (_GLOB_CHARS & set(pattern))


def _pattern_matches(name: str, pattern: str) -> bool:
    """``re:REGEX`` must match the whole name, a glob too; a plain name is a substring.

    Why substrings for plain names: the original LBM training config selects modules with
    ``trainable_lora_modules: ["attn1", "attn2", "up_blocks"]`` and means "every module whose
    name contains it", like PEFT's ``target_modules`` and kohya's module filters."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if is_plain_name(pattern):
        return pattern in name
    return fnmatch.fnmatchcase(name, pattern)


def match_modules(names: Iterable[str], patterns: Iterable[str], *, what: str = "module") -> list[str]:
    """Names matching any pattern, in ``names`` order: a plain name selects every name containing
    it; ``*``/``?``/``[`` globs and ``re:REGEX`` match whole names.

    A pattern that matches nothing is an error: it is almost always a typo, and silently
    training nothing (or everything) is worse than stopping.
    """
    names = list(names)
    patterns = [p[len("denoiser."):] if p.startswith("denoiser.") else p for p in patterns]
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise LoRAError(f"bad regular expression {p!r}: {exc}") from None
        if not any(_pattern_matches(n, p) for n in names):
            example = f" (e.g. {names[0]})" if names else ""
            raise LoRAError(f"pattern {p!r} matches no {what} among {len(names)}{example}")
    return [n for n in names if any(_pattern_matches(n, p) for p in patterns)]


def new_lora_file(denoiser: nn.Module, *, rank: int, conv_rank: int = 0, alpha: float | None = None,
                  conv_alpha: float | None = None, targets: Iterable[str] = ("*",),
                  seed: int = 0) -> LoRAFile:
    """A fresh LoRA over the matching layers: down Kaiming-uniform (like ``nn.Linear``), up zero.

    With up = 0 the delta is exactly zero, so training starts at the base model. Convs are only
    included when ``conv_rank > 0``; ranks are clamped to each layer's smallest side.
    """
    layers_by_name = lora_targets(denoiser)
    candidates = [n for n, m in layers_by_name.items() if isinstance(m, nn.Linear) or conv_rank > 0]
    names = match_modules(candidates, targets, what="target layer")
    gen = torch.Generator().manual_seed(seed)
    layers: dict[str, LoRALayer] = {}
    for name in names:
        w = layers_by_name[name].weight
        is_conv = w.ndim == 4
        want = conv_rank if is_conv else rank
        r = max(1, min(want, w.shape[0], w[0].numel()))
        a = (conv_alpha if is_conv else alpha) or float(r)
        down = torch.empty((r, *w.shape[1:]), dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=gen)
        up = torch.zeros((w.shape[0], r, 1, 1) if is_conv else (w.shape[0], r), dtype=torch.float32)
        layers[name] = LoRALayer(name, down, up, a)
    return LoRAFile(layers=layers, info={"policy": "trained", "rank": rank, "conv_rank": conv_rank})


@dataclass
class LoRAInjection:
    """The wrappers injected into a denoiser, by module name (no ``denoiser.`` prefix)."""

    denoiser: nn.Module
    modules: dict[str, LoRAModule]
    trainable: list[str] = field(default_factory=list)

    def set_trainable(self, patterns: Iterable[str]) -> list[str]:
        """Only LoRA factors of modules matching ``patterns`` get gradients; everything else is frozen."""
        chosen = set(match_modules(self.modules, patterns, what="LoRA module"))
        for name, m in self.modules.items():
            m.lora_down.weight.requires_grad_(name in chosen)
            m.lora_up.weight.requires_grad_(name in chosen)
        self.trainable = [n for n in self.modules if n in chosen]
        return self.trainable

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """In a fixed order (module order, down then up): the optimizer state depends on it."""
        for name in self.trainable:
            m = self.modules[name]
            yield m.lora_down.weight
            yield m.lora_up.weight

    def num_parameters(self, trainable_only: bool = False) -> int:
        names = self.trainable if trainable_only else list(self.modules)
        return sum(self.modules[n].lora_down.weight.numel() + self.modules[n].lora_up.weight.numel()
                   for n in names)

    def to_lora_file(self, info: dict | None = None) -> LoRAFile:
        return LoRAFile(layers={n: m.to_layer(n) for n, m in self.modules.items()}, info=dict(info or {}))

    def load_lora_file(self, lora: LoRAFile) -> None:
        """Copy factors in, e.g. from a resumable checkpoint (same modules required)."""
        if set(lora.layers) != set(self.modules):
            missing = sorted(set(self.modules) - set(lora.layers))[:3]
            extra = sorted(set(lora.layers) - set(self.modules))[:3]
            raise LoRAError(f"LoRA modules differ from the injected ones (missing {missing}, extra {extra})")
        for name, layer in lora.layers.items():
            self.modules[name].load_layer(layer)

    def remove(self) -> None:
        """Put the original layers back (the LoRA is dropped, not merged)."""
        for name, m in self.modules.items():
            _set_submodule(self.denoiser, name, m.base_layer)
        self.modules = {}
        self.trainable = []


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def check_lora_fits(lora: LoRAFile, denoiser: nn.Module) -> None:
    """Raise :class:`LoRAError` unless every LoRA module is a layer of ``denoiser`` with the right
    shape. Works on a meta-device denoiser, so a LoRA for another architecture is refused before
    gigabytes of weights are loaded."""
    targets = lora_targets(denoiser)
    for name, layer in lora.layers.items():
        base = targets.get(name)
        if base is None:
            raise LoRAError(f"LoRA module {name!r} is not a weight layer of this denoiser (wrong architecture?)")
        if isinstance(base, LoRAModule):
            raise LoRAError(f"module {name!r} already has a LoRA injected")
        if tuple(layer.weight_shape) != tuple(base.weight.shape):
            raise LoRAError(f"LoRA module {name!r} has shape {tuple(layer.weight_shape)} but the layer's weight is "
                            f"{tuple(base.weight.shape)} (LoRA for another architecture?)")


def inject_lora(denoiser: nn.Module, lora: LoRAFile) -> LoRAInjection:
    """Wrap every layer named in ``lora`` and load its factors (fp32 parameters, on the layer's device).

    Refuses modules the denoiser does not have and factors whose shapes do not fit the layer
    (a LoRA made for another architecture).
    """
    check_lora_fits(lora, denoiser)
    targets = lora_targets(denoiser)
    modules: dict[str, LoRAModule] = {}
    for name, layer in lora.layers.items():
        base = targets[name]
        if isinstance(base, nn.Conv2d):
            wrapper: LoRAModule = LoRAConv2d.wrap(base, layer.rank, layer.alpha)
        else:
            wrapper = LoRALinear.wrap(base, layer.rank, layer.alpha)
        wrapper.load_layer(layer)
        wrapper.lora_down.weight.requires_grad_(False)
        wrapper.lora_up.weight.requires_grad_(False)
        _set_submodule(denoiser, name, wrapper)
        modules[name] = wrapper
    return LoRAInjection(denoiser=denoiser, modules=modules)
