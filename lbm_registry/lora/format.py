"""The native LoRA file format (DESIGN.md, "LoRA file").

safetensors with, per denoiser module ``M``::

    denoiser.M.lora_down.weight   (r, in)        or (r, in, k, k) for convs
    denoiser.M.lora_up.weight     (out, r)       or (out, r, 1, 1)
    denoiser.M.alpha              scalar

delta = (alpha / r) * up @ down, reshaped to the weight. Metadata carries kohya's ``ss_*``
keys and an ``lbm_registry`` JSON entry (format version, base/tuned sha256, ranks, policy, errors).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lbm_registry.errors import LoRAError

FORMAT_VERSION = 1
PREFIX = "denoiser."
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
META_KEY = "lbm_registry"


@dataclass
class LoRALayer:
    """One low-rank pair. ``module`` is the denoiser module name without the ``denoiser.`` prefix."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.up.shape[0], self.down.shape[1], self.down.shape[2], self.down.shape[3])
        return (self.up.shape[0], self.down.shape[1])

    @property
    def kind(self) -> str:
        if not self.is_conv:
            return "linear"
        k = self.down.shape[2:]
        return f"conv{k[0]}x{k[1]}"

    def num_params(self) -> int:
        return self.down.numel() + self.up.numel()

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """(alpha / r) * up @ down, reshaped to the weight's shape."""
        down = self.down.to(device=device, dtype=dtype).reshape(self.rank, -1)
        up = self.up.to(device=device, dtype=dtype).reshape(self.up.shape[0], self.rank)
        return (up @ down).mul_(self.scale).reshape(self.weight_shape)


@dataclass
class LoRAFile:
    """A whole LoRA: layers plus the ``lbm_registry`` metadata (``info``)."""

    layers: dict[str, LoRALayer]
    info: dict[str, Any] = field(default_factory=dict)
    raw_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def base_sha256(self) -> str | None:
        return self.info.get("base_sha256")

    def ranks(self) -> dict[str, int]:
        return {m: layer.rank for m, layer in self.layers.items()}

    def num_params(self) -> int:
        return sum(layer.num_params() for layer in self.layers.values())


def _kohya_metadata(lora: LoRAFile, dtype: torch.dtype) -> dict[str, str]:
    ranks = [layer.rank for layer in lora.layers.values() if not layer.is_conv]
    cranks = [layer.rank for layer in lora.layers.values() if layer.is_conv]
    alphas = [layer.alpha for layer in lora.layers.values()]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks) if ranks else 0),
        "ss_network_alpha": str(max(alphas) if alphas else 0),
        "ss_network_args": json.dumps({"conv_dim": max(cranks) if cranks else 0,
                                       "conv_alpha": max((la.alpha for la in lora.layers.values() if la.is_conv), default=0)}),
        "ss_base_model_version": "lbm",
        "ss_v2": "False",
        "ss_mixed_precision": str(dtype).replace("torch.", ""),
    }
    for k in ("base_sha256", "tuned_sha256"):
        if lora.info.get(k):
            meta[f"ss_{'sd_model_hash' if k == 'base_sha256' else 'tuned_model_hash'}"] = lora.info[k]
    return meta


def write_lora(lora: LoRAFile, dest: str | Path, dtype: torch.dtype = torch.bfloat16,
               extra_metadata: dict[str, str] | None = None) -> Path:
    """Write atomically; factors stored in ``dtype``, alphas as fp32 scalars."""
    from lbm_registry.lbm.checkpoint import save_safetensors

    if not lora.layers:
        raise LoRAError("refusing to write a LoRA with no layers")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora.layers.items():
        key = PREFIX + name
        tensors[key + DOWN] = layer.down.to(dtype)
        tensors[key + UP] = layer.up.to(dtype)
        tensors[key + ALPHA] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    info = dict(lora.info)
    info["format_version"] = FORMAT_VERSION
    info["dtype"] = str(dtype).replace("torch.", "")
    meta = _kohya_metadata(lora, dtype)
    meta[META_KEY] = json.dumps(info, separators=(",", ":"))
    meta["format"] = "pt"
    meta.update(extra_metadata or {})
    return save_safetensors(tensors, dest, meta)


def parse_lora_keys(keys: Iterable[str], source: str | Path) -> list[str]:
    """Module names present, checking each has exactly down, up and alpha."""
    groups: dict[str, set[str]] = {}
    for k in keys:
        if not k.startswith(PREFIX):
            raise LoRAError(f"{source}: not an LBM LoRA (unexpected key {k!r})")
        for suffix in (DOWN, UP, ALPHA):
            if k.endswith(suffix):
                groups.setdefault(k[len(PREFIX):-len(suffix)], set()).add(suffix)
                break
        else:
            raise LoRAError(f"{source}: not an LBM LoRA (unexpected key {k!r})")
    for m, parts in groups.items():
        missing = {DOWN, UP, ALPHA} - parts
        if missing:
            raise LoRAError(f"{source}: module {m!r} lacks {', '.join(sorted(s.strip('.') for s in missing))}")
    return list(groups)


def read_lora(path: str | Path, *, check_finite: bool = True) -> LoRAFile:
    """Read and validate a native LoRA file (keys complete, shapes consistent, rank > 0, finite)."""
    from lbm_registry.lbm.checkpoint import CheckpointReader

    reader = CheckpointReader(path)
    if len(reader) == 0:
        raise LoRAError(f"{path}: empty file, not a LoRA")
    modules = parse_lora_keys(reader.keys(), path)
    layers: dict[str, LoRALayer] = {}
    for m in modules:
        key = PREFIX + m
        down, up, alpha = reader.get(key + DOWN), reader.get(key + UP), reader.get(key + ALPHA)
        r = down.shape[0] if down.ndim else 0
        if r == 0 or down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != r:
            raise LoRAError(f"{path}: module {m!r} has inconsistent shapes down {tuple(down.shape)} up {tuple(up.shape)}")
        if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoRAError(f"{path}: module {m!r} conv lora_up must be (out, r, 1, 1), got {tuple(up.shape)}")
        if alpha.numel() != 1:
            raise LoRAError(f"{path}: module {m!r} alpha must be a scalar")
        if check_finite:
            for t, part in ((down, "lora_down"), (up, "lora_up"), (alpha, "alpha")):
                if not bool(torch.isfinite(t.float()).all()):
                    raise LoRAError(f"{path}: module {m!r} {part} contains NaN or Inf")
        layers[m] = LoRALayer(m, down, up, float(alpha.float().item()))
    info: dict[str, Any] = {}
    raw = reader.metadata.get(META_KEY)
    if raw:
        try:
            info = json.loads(raw)
        except json.JSONDecodeError:
            raise LoRAError(f"{path}: corrupt {META_KEY} metadata") from None
    return LoRAFile(layers=layers, info=info, raw_metadata=dict(reader.metadata))
