"""How well does base + LoRA reproduce the tuned model? Per layer and on denoiser outputs.

Per layer (streamed, one layer in memory at a time):
- ``rel_error`` = ||dW - BA||_F / ||dW||_F, and ``energy`` = 1 - rel_error^2, the share of the
  fine-tune's weight change the LoRA keeps;
- ``mean_abs_ratio`` = mean|dW - BA| / mean|dW|, the metric the original LBM / kohya
  extraction scripts print, kept for comparison with them.

Functional: the denoiser's velocity on fixed seeded latents at several bridge times, for the
tuned model, the base model, and the base with the LoRA merged. ``functional_error`` is
||v_lora - v_tuned|| / ||v_tuned||; ``recovered`` = 1 - ||v_lora - v_tuned|| / ||v_base - v_tuned||
is the share of the fine-tune's effect on the output that the LoRA reproduces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lbm_registry.lbm.checkpoint import CheckpointReader
from lbm_registry.lbm.config import LBMConfig
from lbm_registry.lbm.threads import SMALL_LAYER_NUMEL, single_thread_below
from lbm_registry.lora.format import LoRAFile, layer_kind
from lbm_registry.lora.stream import DeltaStream
from lbm_registry.lora.svd import sq_norm

DEFAULT_SIGMAS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class LayerCheck:
    module: str
    kind: str
    shape: tuple[int, ...]
    rank: int            # 0: the LoRA has no entry for this layer
    rel_error: float
    energy: float
    mean_abs_ratio: float
    delta_norm: float
    rel_error_alpha_at_rank: float | None = None   # only for layers asked about (see layer_checks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if d["rel_error_alpha_at_rank"] is None:
            del d["rel_error_alpha_at_rank"]
        return d


@dataclass
class Coverage:
    """``expected``: LoRA-able layers in the base; ``found``: LoRA modules matching one of them;
    ``applied``: LoRA modules merged; ``changed_not_covered``: layers the fine-tune changed that
    the LoRA leaves out (e.g. skipped by a budget)."""

    expected: int
    found: int
    applied: int
    changed_not_covered: list[str] = field(default_factory=list)


@dataclass
class FunctionalCheck:
    sigmas: list[float]
    functional_error: float
    base_error: float
    recovered: float
    per_sigma: list[dict[str, float]]
    latent_size: int
    seed: int


def layer_checks(base: CheckpointReader, tuned: CheckpointReader, lora: LoRAFile,
                 modules: Mapping[str, tuple[int, ...]], *, prefix: str = "denoiser.",
                 progress: Callable[[str, int, int], None] | None = None,
                 alpha_at_rank: Iterable[str] = ()) -> list[LayerCheck]:
    """Compare each layer's true delta with the LoRA's, streaming both checkpoints.

    ``alpha_at_rank``: modules whose error is also measured with alpha = rank (scale 1), to
    tell whether a wrong alpha is what makes them wrong (see :mod:`lbm_registry.lora.alpha`)."""
    also = set(alpha_at_rank)
    out: list[LayerCheck] = []
    with DeltaStream(base, tuned, modules, prefix=prefix) as stream:
        for i, d in enumerate(stream, 1):
            a = d.matrix
            layer = lora.layers.get(d.module)
            with single_thread_below(a.numel(), SMALL_LAYER_NUMEL):
                resid = a - layer.delta(torch.float32).reshape(a.shape) if layer is not None else a
                rn = math.sqrt(sq_norm(resid))
                mean_a = float(a.abs().mean())
                mean_r = float(resid.abs().mean())
            an = math.sqrt(d.sq_norm)
            rel = rn / an if an > 0 else (0.0 if rn == 0 else math.inf)
            rel_at_rank = None
            if layer is not None and d.module in also:
                with single_thread_below(a.numel(), SMALL_LAYER_NUMEL):
                    unit = layer.delta(torch.float32).reshape(a.shape) / layer.scale
                    r1 = float(torch.linalg.vector_norm(a - unit))
                rel_at_rank = r1 / an if an > 0 else (0.0 if r1 == 0 else math.inf)
            out.append(LayerCheck(
                module=d.module, kind=layer_kind(d.shape), shape=tuple(d.shape),
                rank=layer.rank if layer is not None else 0, rel_error=rel,
                energy=1.0 - rel * rel if math.isfinite(rel) else -math.inf,
                mean_abs_ratio=mean_r / mean_a if mean_a > 0 else (0.0 if mean_r == 0 else math.inf),
                delta_norm=an, rel_error_alpha_at_rank=rel_at_rank,
            ))
            if progress:
                progress("layers", i, len(modules))
    return out


def coverage(lora: LoRAFile, checks: Sequence[LayerCheck] | None, expected: Mapping[str, tuple[int, ...]]) -> Coverage:
    found = [m for m in lora.layers if m in expected]
    missing = []
    if checks is not None:
        missing = [c.module for c in checks if c.rank == 0 and c.delta_norm > 0]
    return Coverage(expected=len(expected), found=len(found), applied=len(found), changed_not_covered=missing)


def _velocities(model: Any, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.velocity(x, sigmas).float()


def functional_check(base_path: str | Path, tuned_path: str | Path, lora: LoRAFile, config: LBMConfig, *,
                     sigmas: Sequence[float] = DEFAULT_SIGMAS, latent_size: int = 32, seed: int = 0,
                     device: str | torch.device = "cpu") -> FunctionalCheck:
    """Denoiser outputs of tuned vs base vs base + LoRA on seeded latents (fp32).

    The models are loaded one after the other (tuned, then base), so peak memory is one model.
    """
    from lbm_registry.lbm.loading import load_lbm
    from lbm_registry.lora.apply import merge_lora

    g = torch.Generator().manual_seed(seed)
    channels = config.denoiser.in_channels
    x = torch.randn(len(sigmas), channels, latent_size, latent_size, generator=g).to(device)
    s = torch.tensor(list(sigmas), dtype=torch.float32, device=device)

    tuned = load_lbm(tuned_path, config, device=device, dtype=torch.float32)
    v_tuned = _velocities(tuned, x, s)
    del tuned
    model = load_lbm(base_path, config, device=device, dtype=torch.float32)
    v_base = _velocities(model, x, s)
    merge_lora(model.denoiser, lora, 1.0)
    v_lora = _velocities(model, x, s)
    del model

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        den = float(torch.linalg.vector_norm(b))
        return float(torch.linalg.vector_norm(a - b)) / den if den > 0 else 0.0

    per = []
    for i, sig in enumerate(sigmas):
        per.append({"sigma": float(sig), "error": rel(v_lora[i], v_tuned[i]), "base_error": rel(v_base[i], v_tuned[i])})
    err = rel(v_lora, v_tuned)
    base_err = rel(v_base, v_tuned)
    gap = float(torch.linalg.vector_norm(v_base - v_tuned))
    recovered = 1.0 - float(torch.linalg.vector_norm(v_lora - v_tuned)) / gap if gap > 0 else 1.0
    return FunctionalCheck(sigmas=[float(x) for x in sigmas], functional_error=err, base_error=base_err,
                           recovered=recovered, per_sigma=per, latent_size=latent_size, seed=seed)


# -- held-out images --------------------------------------------------------------------------
PSNR_CAP = 100.0


@dataclass
class HeldOutCheck:
    """Base + LoRA against the tuned model on real images, run as inference runs them.

    ``functional_error``: ||v_lora - v_tuned|| / ||v_tuned|| over every denoiser call of every
    image (each model along its own trajectory: from ``z_src`` at sigma 1, ``steps`` steps);
    ``psnr``: decoded outputs of base + LoRA against the tuned model's (dB, images in [-1, 1],
    mean over images); ``base_*``: the same for the base alone, for scale.
    """

    images: int
    steps: int
    functional_error: float
    base_error: float
    recovered: float
    psnr: float
    base_psnr: float
    per_image: list[dict[str, Any]]


def _translate_all(model: Any, images: Sequence[torch.Tensor], steps: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image: the denoiser outputs along the sampler's path (concatenated) and the decoded output."""
    from lbm_registry.lbm.sampler import sample

    vels, outs = [], []
    with torch.no_grad():
        for i, x in enumerate(images):
            gen = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + i)
            seen: list[torch.Tensor] = []

            def velocity(z: torch.Tensor, s: torch.Tensor, seen: list[torch.Tensor] = seen) -> torch.Tensor:
                v = model.velocity(z, s)
                seen.append(v.float().cpu().reshape(-1))
                return v

            z = sample(velocity, model.vae.encode(x), steps=steps, bridge_noise_sigma=model.config.bridge.bridge_noise_sigma,
                       generator=gen)
            vels.append(torch.cat(seen))
            outs.append(model.vae.decode(z).float().clamp(-1, 1).cpu())
    return vels, outs


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2), capped at :data:`PSNR_CAP`."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return PSNR_CAP if mse <= 0 else min(PSNR_CAP, 10 * math.log10(4.0 / mse))


def heldout_check(base_path: str | Path, tuned_path: str | Path, lora: LoRAFile, config: LBMConfig,
                  images: Sequence[torch.Tensor], *, labels: Sequence[str] = (), steps: int | None = None,
                  seed: int = 0, device: str | torch.device = "cpu") -> HeldOutCheck:
    """Run tuned, base and base + LoRA (fp32, one model in memory at a time) on ``images``
    ((1, 3, h, w) in [-1, 1]) and compare, per denoiser call and on the decoded outputs."""
    from lbm_registry.lbm.loading import load_lbm
    from lbm_registry.lora.apply import merge_lora

    steps = steps or config.inference.steps
    xs = [x.to(device) for x in images]
    tuned = load_lbm(tuned_path, config, device=device, dtype=torch.float32)
    v_t, o_t = _translate_all(tuned, xs, steps, seed)
    del tuned
    model = load_lbm(base_path, config, device=device, dtype=torch.float32)
    v_b, o_b = _translate_all(model, xs, steps, seed)
    merge_lora(model.denoiser, lora, 1.0)
    v_l, o_l = _translate_all(model, xs, steps, seed)
    del model

    def norm(ts: list[torch.Tensor]) -> float:
        return math.sqrt(sum(float(torch.linalg.vector_norm(t.double())) ** 2 for t in ts))

    ref = norm(v_t)
    err = norm([a - b for a, b in zip(v_l, v_t, strict=True)])
    gap = norm([a - b for a, b in zip(v_b, v_t, strict=True)])
    per = []
    for i in range(len(xs)):
        vt = float(torch.linalg.vector_norm(v_t[i].double()))
        per.append({"image": labels[i] if i < len(labels) else str(i),
                    "error": float(torch.linalg.vector_norm((v_l[i] - v_t[i]).double())) / vt if vt else 0.0,
                    "psnr": psnr(o_l[i], o_t[i]), "base_psnr": psnr(o_b[i], o_t[i])})
    return HeldOutCheck(images=len(xs), steps=steps, functional_error=err / ref if ref else 0.0,
                        base_error=gap / ref if ref else 0.0, recovered=1.0 - err / gap if gap else 1.0,
                        psnr=sum(p["psnr"] for p in per) / len(per), base_psnr=sum(p["base_psnr"] for p in per) / len(per),
                        per_image=per)
