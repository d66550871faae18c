"""The exact LBM base: SDXL UNet weights adapted to LBM's denoiser shape.

Rule (DESIGN.md): drop ``add_embedding.*``; for ``conv_in.weight`` and every
``attn*.to_k/to_v.weight`` whose shape differs, keep the leading slice where the target is
smaller and append zeros where it is larger (per dimension); copy everything else bit-exact.
Any other difference is an error: the result must be *exactly* SDXL where shapes agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lbm_registry.errors import ArchitectureError, CheckpointError

if TYPE_CHECKING:
    import torch

ADAPTABLE = re.compile(r"^(conv_in\.weight|.*\.attn\d+\.to_[kv]\.weight)$")
DROPPED_PREFIXES = ("add_embedding.",)


@dataclass
class BaseReport:
    """What the adaptation did to each key (for the CLI summary and the catalog)."""

    copied: list[str] = field(default_factory=list)
    sliced: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    padded: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"copied": len(self.copied), "sliced": len(self.sliced), "padded": len(self.padded),
                "dropped": len(self.dropped), "initialised": len(self.initialised)}


def fit_tensor(src: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    """Leading slice where ``shape`` is smaller, zeros appended where larger, per dimension."""
    import torch

    if src.ndim != len(shape):
        raise ValueError(f"rank mismatch {tuple(src.shape)} vs {shape}")
    out = src[tuple(slice(0, min(a, b)) for a, b in zip(src.shape, shape, strict=True))]
    grew = any(b > a for a, b in zip(src.shape, shape, strict=True))
    shrank = any(b < a for a, b in zip(src.shape, shape, strict=True))
    if grew:
        full = torch.zeros(shape, dtype=src.dtype)
        full[tuple(slice(0, s) for s in out.shape)] = out
        out = full
    return out.contiguous().clone(), ("padded" if grew else "sliced" if shrank else "copied")


def check_sdxl_shapes(shapes: Mapping[str, tuple[int, ...]], target: Mapping[str, tuple[int, ...]],
                      source: str = "SDXL UNet") -> None:
    """Every check :func:`adapt_sdxl_unet` makes, on the key/shape table alone (a file's header),
    so a wrong file is refused before any model is built or tensor read."""
    if any(k.startswith("model.diffusion_model.") for k in shapes):
        raise CheckpointError(
            f"{source}: original (non-diffusers) SDXL key names; convert it to a diffusers UNet folder first"
        )
    extra = [k for k in shapes if k not in target and not k.startswith(DROPPED_PREFIXES)]
    if extra:
        raise ArchitectureError(f"{source}: not an SDXL UNet for this config: unexpected keys e.g. {', '.join(extra[:3])}")
    missing = [k for k in target if k not in shapes]
    if missing:
        raise ArchitectureError(f"{source}: not an SDXL UNet for this config: missing keys e.g. {', '.join(missing[:3])}")
    for key, shape in target.items():
        have = tuple(shapes[key])
        if have == tuple(shape):
            continue
        if not ADAPTABLE.match(key):
            raise ArchitectureError(
                f"{source}: {key} has shape {have} but LBM needs {tuple(shape)}; only conv_in and "
                "attention to_k/to_v may be adapted"
            )
        if len(have) != len(shape):
            raise ArchitectureError(f"{source}: {key} has shape {have} but LBM needs {tuple(shape)}")


def adapt_sdxl_unet(sdxl: Mapping[str, torch.Tensor], target: Mapping[str, tuple[int, ...]],
                    source: str = "SDXL UNet") -> tuple[dict[str, torch.Tensor], BaseReport]:
    """Map an SDXL UNet state dict (diffusers key names) onto the LBM denoiser's shapes."""
    check_sdxl_shapes({k: tuple(v.shape) for k, v in sdxl.items()}, target, source)
    report = BaseReport()
    out: dict[str, torch.Tensor] = {}
    report.dropped = sorted(k for k in sdxl if k.startswith(DROPPED_PREFIXES))
    for key, shape in target.items():
        src = sdxl[key]
        if tuple(src.shape) == tuple(shape):
            out[key] = src.clone()
            report.copied.append(key)
            continue
        t, how = fit_tensor(src, tuple(shape))
        out[key] = t
        getattr(report, how).append((key, tuple(src.shape), tuple(shape)))
    return out, report


def locate_sdxl_unet(path: str | Path) -> Path:
    """The UNet weight file: ``path`` itself, or the diffusers file in the folder or its ``unet/``."""
    p = Path(path)
    if p.is_dir():
        for sub in (p / "unet", p):
            for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
                if (sub / name).is_file():
                    return sub / name
        raise CheckpointError(f"{path}: no diffusion_pytorch_model(.fp16).safetensors in this folder or unet/")
    if not p.exists():
        raise CheckpointError(f"--sdxl-unet: file not found: {path}")
    return p


def strip_denoiser_prefix(keys: Mapping[str, object]) -> dict[str, object]:
    prefix = "denoiser."
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in keys.items()}
    return dict(keys)


def read_sdxl_unet(path: str | Path) -> dict[str, torch.Tensor]:
    """An SDXL UNet from a diffusers folder (``unet/`` or the UNet folder itself) or one file."""
    from lbm_registry.lbm.checkpoint import CheckpointReader

    reader = CheckpointReader(locate_sdxl_unet(path))
    return strip_denoiser_prefix(reader.state_dict())  # type: ignore[return-value]
