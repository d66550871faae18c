"""Device check: the GPU figures of lbm-registry, side by side in one run, in under 10 minutes.

    python3 benchmarks/device_check.py --out DIR             # one GPU (CUDA), full size
    .venv/bin/python benchmarks/device_check.py --tiny        # the same code paths, tiny twin, CPU

Writes ``DIR/device_check.json`` and ``DIR/device_check.md`` (a Markdown table). Nothing big is
written to disk: the full-size model (2.4 B-parameter denoiser + SDXL VAE) is built with random
weights directly on the device; only two 180 MB LoRA files go to a temporary folder (the load
benchmark needs real files). Sections, each with its own time budget, each guarded (a failure is
recorded with its error and the next section runs):

1. ``extract``: rank-32/16 factorisation of all 792 layers on the device (the extraction's
   compute: synthetic per-layer deltas generated on the device, a decaying spectrum plus a noise
   floor; reading files is not part of it): time, peak device memory, and on a sample of layers
   the error against the exact truncation (``svdvals``). The same on the CPU path for a sample
   of layers, extrapolated to all 792 by shape (labelled as such).
2. ``relight``: a 1024x768 photo (the 896x1152 bucket, ~1 MP), 1 and 4 steps, bf16: our
   ``infer`` path (:class:`lbm_registry.lbm.pipeline.LBMPipeline`) against a plain loop written
   here with diffusers modules only, doing upstream LBM's sampling arithmetic (posterior sample,
   fp32 Euler schedule and bridge noise, tiled VAE decode above 128 latent px, ``mul(255).byte()``):
   time, peak memory, max pixel difference.
3. ``serve``: 1 MP, batch of 8, one denoiser pass: 8 different rank-32/16 LoRAs mixed (auto,
   loop and batched paths; also 1, 2 and 4 distinct LoRAs, which sets the auto rule) vs no LoRA
   vs merge/unmerge per request; then through the engine, the first request for a LoRA not yet
   loaded vs a cached one, idle and with a busy server, loads inline (before) vs on the loader
   thread (after), and the warm requests' latency while a load runs.
4. ``train``: one LoRA training step at 1024 px (rank 32/16, bf16 autocast, the real bridge
   objective with the VAE): AdamW, + gradient checkpointing, + 8-bit AdamW (bitsandbytes).

``--tiny`` runs every section on the tiny twin on CPU in about a minute (tests/test_device_check.py
runs it, so this script cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


# -- sizes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """What a run measures at: ``full`` on one GPU, ``tiny`` the same paths on the tiny twin."""

    name: str
    config: str                     # lbm-relighting | lbm-tiny
    image_hw: tuple[int, int]       # the source photo (H, W)
    batch: int                      # serving batch
    rank: int
    conv_rank: int
    train_px: int
    cpu_layers: int                 # layers the CPU extraction sample factorises
    error_layers: int               # layers whose error is checked against svdvals
    repeats: int
    tile: int                       # the plain loop's VAE decode tile (latent px) and overlap
    overlap: int
    budgets: tuple[tuple[str, float], ...]
    base_resolution: int | None = None   # override the config's bucket scale (tiny: smaller images)
    relight_steps: tuple[int, ...] = (1, 4)
    layer_stride: int = 1                # extract every n-th layer on the device (tiny: fewer)
    distinct: tuple[int, ...] = (1, 2, 4)   # batches with this many different LoRAs: loop vs batched
    dtype: str = "bf16"                  # the serving dtype (tiny on CPU: fp32, the CPU default)


FULL = Spec("full", "lbm-relighting", (768, 1024), 8, 32, 16, 1024, 10, 16, 3, 128, 16,
            (("extract", 110.0), ("relight", 110.0), ("serve", 170.0), ("train", 110.0)))
TINY = Spec("tiny", "lbm-tiny", (96, 128), 4, 8, 4, 64, 4, 6, 1, 128, 16,
            (("extract", 60.0), ("relight", 60.0), ("serve", 90.0), ("train", 60.0)),
            base_resolution=128, relight_steps=(2,), layer_stride=12, distinct=(2,), dtype="fp32")


class OutOfTime(Exception):
    """A section's budget ran out: what it measured so far is kept."""


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def need(self, seconds: float, what: str) -> None:
        """Stop the section (OutOfTime) unless ``seconds`` are left for ``what``."""
        if self.left() < seconds:
            raise OutOfTime(f"budget: {self.left():.0f} s left, {what} needs ~{seconds:.0f} s")


def bench_module(name: str) -> Any:
    """Another script of benchmarks/ as a module (its helpers are shared, not copied)."""
    import importlib.util

    key = f"lbm_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


# -- timing helpers ---------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak device memory since :func:`reset_peak` (None on CPU: RSS is no device memory)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1, warmup: int = 0) -> tuple[float, Any]:
    """Median wall seconds of ``repeats`` calls (after ``warmup``), synchronised; and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# -- the model, built on the device -----------------------------------------------------------
def build_model_on(config: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                   base_resolution: int | None = None):
    """The LBM model (denoiser + VAE + scheduler) with diffusers' own random init, allocated and
    initialised on ``device`` (no 10 GB host copy), then cast to ``dtype``."""
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import LBMModel, build_denoiser, build_vae

    cfg = load_config(config)
    if base_resolution is not None:
        cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"base_resolution": base_resolution})})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LBMModel(cfg, build_denoiser(cfg), build_vae(cfg))
    return model.to(dtype).eval().requires_grad_(False), cfg


def synthetic_image(hw: tuple[int, int], seed: int = 0):
    """A deterministic photo-like RGB image: smooth gradients, a few shapes, mild noise."""
    import numpy as np
    from PIL import Image

    h, w = hw
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.4 * np.sin(6 * x + 1), 0.5 + 0.4 * np.cos(5 * y), 0.4 + 0.3 * x * y], -1)
    for _ in range(6):
        cy, cx, r = rng.random(3) * [1, 1, 0.2]
        mask = (y - cy * h / max(h, w)) ** 2 + (x - cx * w / max(h, w)) ** 2 < r**2
        img[mask] = rng.random(3)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return Image.fromarray((img * 255).astype("uint8"))


def random_lora_on(shapes: dict[str, tuple[int, ...]], seed: int, rank: int, conv_rank: int,
                   device: torch.device, dtype: torch.dtype):
    """A random rank/conv-rank LoRA over every layer, generated on ``device`` in ``dtype``
    (trained-looking magnitudes: the delta is a few % of a unit-scale weight)."""
    from lbm_registry.lora.format import LoRAFile, LoRALayer

    g = torch.Generator(device=device).manual_seed(seed)
    layers = {}
    for m, shape in shapes.items():
        n = math.prod(shape[1:])
        r = min(conv_rank if len(shape) == 4 else rank, shape[0], n)
        down = torch.randn(r, *shape[1:], generator=g, device=device) / n**0.5
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=g, device=device) * 0.01
        layers[m] = LoRALayer(m, down.to(dtype), up.to(dtype), float(r))
    return LoRAFile(layers, {})


# -- 1. extraction ----------------------------------------------------------------------------
def synthetic_delta(shape: tuple[int, ...], name: str, device: torch.device) -> torch.Tensor:
    """``dW`` as benchmarks/extract.py makes it (a 128-component power-law spectrum scaled to 5%
    of a weight, plus a noise floor at 25% of it), as an fp32 (out, in*k*k) matrix on ``device``."""
    m, n = shape[0], math.prod(shape[1:])
    g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    r = min(128, m, n)
    exponent = (0.5, 0.8, 1.1)[zlib.crc32(name.encode()) % 3]
    s = torch.arange(1, r + 1, dtype=torch.float32, device=device) ** -exponent
    u = torch.randn(m, r, generator=g, device=device) / math.sqrt(m)
    v = torch.randn(n, r, generator=g, device=device) / math.sqrt(n)
    low = (u * s) @ v.T
    low *= 0.05 * min(0.05, 1 / math.sqrt(n)) * math.sqrt(m * n) / float(low.norm())
    noise = torch.randn(m, n, generator=g, device=device)
    noise *= 0.25 * float(low.norm()) / float(noise.norm())
    return low.add_(noise)


def _factorize(d: torch.Tensor, shape: tuple[int, ...], name: str, spec: Spec, scratch: torch.Tensor):
    """One layer as ``lbm-reg extract`` does it (small layers single-threaded on CPU)."""
    from lbm_registry.lbm.threads import SMALL_LAYER_NUMEL, single_thread_below
    from lbm_registry.lora.extract import factorize
    from lbm_registry.lora.svd import SVDSettings, sq_norm

    settings = SVDSettings()
    rank = spec.conv_rank if len(shape) == 4 else spec.rank
    small = d.device.type == "cpu" and d.numel() < SMALL_LAYER_NUMEL
    with single_thread_below(0 if small else SMALL_LAYER_NUMEL, SMALL_LAYER_NUMEL):
        f = factorize(d, shape, rank, sq_norm=sq_norm(d), dtype=torch.bfloat16, settings=settings,
                      generator=settings.generator(name), scratch=scratch)
    f.down.cpu(), f.up.cpu()   # the factors go to the writer on the host
    return f


def _exact_error(d: torch.Tensor, rank: int) -> float:
    from lbm_registry.lora.svd import truncation_error

    return truncation_error(torch.linalg.svdvals(d), rank)


def section_extract(spec: Spec, device: torch.device, budget: Budget, ctx: dict, out: dict) -> None:
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import denoiser_weight_layer_shapes

    bench = bench_module("extract")
    extrapolate, pick_sample = bench.extrapolate, bench.pick_sample
    shapes = denoiser_weight_layer_shapes(load_config(spec.config))
    layers = [{"module": m, "shape": list(s)} for m, s in shapes.items()]
    sample = pick_sample(layers, spec.error_layers)
    checked = {r["module"] for r in sample}
    out.update(layers=len(shapes), rank=spec.rank, conv_rank=spec.conv_rank)

    # On the device: all 792 layers.
    biggest = max(math.prod(s) for s in shapes.values())
    scratch = torch.empty(biggest, dtype=torch.float32, device=device)
    reset_peak(device)
    compute_s, gen_s, ratios = 0.0, 0.0, []
    chosen = [(n, sh) for i, (n, sh) in enumerate(shapes.items()) if i % spec.layer_stride == 0 or n in checked]
    out["device_layers"] = len(chosen)
    for i, (name, shape) in enumerate(chosen):
        if i % 64 == 0:
            budget.need(5, "the device extraction")
        t0 = time.perf_counter()
        d = synthetic_delta(shape, name, device)
        sync(device)
        t1 = time.perf_counter()
        f = _factorize(d, shape, name, spec, scratch)
        sync(device)
        compute_s += time.perf_counter() - t1
        gen_s += t1 - t0
        if name in checked:
            ratios.append(f.rel_error / max(_exact_error(d, f.rank), 1e-12))
    out["device"] = {"seconds": compute_s, "generate_s": gen_s, "peak_gb": peak_gb(device),
                     "error_ratio_max": max(ratios), "error_ratio_mean": statistics.mean(ratios),
                     "error_layers": len(ratios)}
    del scratch

    # The CPU path: a sample of layers (one per distinct shape, the costliest first), extrapolated.
    cpu = torch.device("cpu")
    cpu_sample = pick_sample(layers, spec.cpu_layers)
    scratch = torch.empty(max(math.prod(r["shape"]) for r in cpu_sample), dtype=torch.float32)
    measured: dict[tuple, float] = {}
    cpu_ratios = []
    for r in cpu_sample:
        budget.need(15, "the CPU sample")
        shape = tuple(r["shape"])
        d = synthetic_delta(shape, r["module"], cpu)
        t0 = time.perf_counter()
        f = _factorize(d, shape, r["module"], spec, scratch)
        measured[shape] = time.perf_counter() - t0
        cpu_ratios.append(f.rel_error / max(_exact_error(d, f.rank), 1e-12))
    total = extrapolate(layers, measured)
    out["cpu"] = {"seconds_extrapolated": total, "layers_measured": len(measured), "threads": torch.get_num_threads(),
                  "error_ratio_max": max(cpu_ratios), "measured_s": sum(measured.values())}
    out["cpu_over_device"] = total / compute_s * len(chosen) / len(shapes) if compute_s else None


# -- 2. relight: ours vs a plain diffusers loop with upstream's arithmetic --------------------
UPSTREAM_BUCKETS_WH = ((512, 2048), (1024, 1024), (2048, 512), (896, 1152), (1152, 896), (512, 1920),
                       (640, 1536), (768, 1280), (1280, 768), (1536, 640), (1920, 512))
"""Upstream's aspect table as (width, height) pairs, picked by the nearest width / height."""


def upstream_bucket(width: int, height: int, base: int) -> tuple[int, int]:
    """(width, height) upstream resizes a ``width x height`` photo to (scaled to ``base``)."""
    ar = width / height
    w, h = min(UPSTREAM_BUCKETS_WH, key=lambda wh: abs(wh[0] / wh[1] - ar))
    scale = base / 1024
    return round(w * scale / 32) * 32, round(h * scale / 32) * 32


def _tile_weights(width: int, height: int) -> torch.Tensor:
    """Upstream's Gaussian blending mask of a decoded tile (variance 0.01 of the tile's side,
    centred at (width - 1) / 2 across and height / 2 down, as upstream has it), (height, width)."""
    var = 0.01
    xs = torch.arange(width, dtype=torch.float64)
    ys = torch.arange(height, dtype=torch.float64)
    px = torch.exp(-((xs - (width - 1) / 2) ** 2) / (width * width) / (2 * var)) / math.sqrt(2 * math.pi * var)
    py = torch.exp(-((ys - height / 2) ** 2) / (height * height) / (2 * var)) / math.sqrt(2 * math.pi * var)
    return torch.outer(py, px)


def decode_tiled(vae, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """Upstream's VAE decode: whole when the latent fits in ``tile``, else overlapping tiles
    (each padded with zeros to ``tile``, decoded, cropped) blended with Gaussian weights on the
    host in fp32. ``z`` is already divided by the scaling factor."""
    if z.shape[2] <= tile and z.shape[3] <= tile:
        return vae.decode(z).sample
    import torch.nn.functional as F

    scale = 8
    outs = []
    for zi in z.split(1):
        _, _, h, w = zi.shape
        oh, ow = (overlap if h > tile else 0), (overlap if w > tile else 0)
        out = torch.zeros(1, 3, h * scale, w * scale)
        weight = torch.zeros_like(out)
        for i in range(0, h, tile - oh):
            for j in range(0, w, tile - ow):
                piece = zi[:, :, i:i + tile, j:j + tile]
                ph, pw = piece.shape[2:]
                padded = F.pad(piece, (0, tile - pw if pw < tile else 0, 0, tile - ph if ph < tile else 0))
                dec = vae.decode(padded).sample[:, :, : ph * scale, : pw * scale].cpu()
                mask = _tile_weights(pw * scale, ph * scale)
                y0, x0 = i * scale, j * scale
                out[:, :, y0:y0 + ph * scale, x0:x0 + pw * scale] += dec * mask
                weight[:, :, y0:y0 + ph * scale, x0:x0 + pw * scale] += mask
        outs.append(out / weight)
    return torch.cat(outs).to(z.device)


@torch.no_grad()
def plain_relight(unet, vae, image, *, steps: int, seed: int, bridge_noise_sigma: float, base: int,
                  scaling_factor: float, tile: int, overlap: int, device: torch.device, dtype: torch.dtype):
    """Upstream LBM's relight with diffusers modules only (UNet2DConditionModel, AutoencoderKL,
    FlowMatchEulerDiscreteScheduler): resize to the bucket, encode a posterior sample, Euler steps
    on the fp32 sigma schedule ``linspace(1, 1/n, n)`` with bridge noise between steps, tiled
    decode, clamp, ``mul(255).byte()``. Noise comes from one generator seeded with ``seed`` (the
    posterior sample first, then each step's bridge noise), where upstream uses the global RNG."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from PIL import Image

    size = upstream_bucket(image.width, image.height, base)
    src = image.resize(size, Image.BICUBIC)
    x = torch.from_numpy(np.asarray(src, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    x = x.to(device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    z = vae.encode(x).latent_dist.sample(generator=g) * scaling_factor
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(sigmas=np.linspace(1, 1 / steps, steps))
    timesteps = sched.timesteps
    for i, t in enumerate(timesteps):
        inp = sched.scale_model_input(z, t) if hasattr(sched, "scale_model_input") else z
        pred = unet(inp, t.to(device).repeat(inp.shape[0]), encoder_hidden_states=None).sample
        z = sched.step(pred, t, z, return_dict=False)[0]
        if i < len(timesteps) - 1:
            sigma = sched.sigmas[i + 1].to(device=device, dtype=torch.float32)
            eps = torch.randn(z.shape, generator=g, device=device, dtype=z.dtype)
            z = (z + bridge_noise_sigma * (sigma * (1.0 - sigma)) ** 0.5 * eps).to(dtype)
    out = decode_tiled(vae, z / scaling_factor, tile, overlap).clamp(-1, 1)
    arr = ((out[0].float().cpu() + 1) / 2).mul(255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def section_relight(spec: Spec, device: torch.device, budget: Budget, ctx: dict, out: dict) -> None:
    import numpy as np
    from PIL import Image

    from lbm_registry.lbm.imaging import nearest_bucket
    from lbm_registry.lbm.pipeline import LBMPipeline

    model, cfg = ctx["model"]()
    dtype = ctx["dtype"]
    img = synthetic_image(spec.image_hw)
    bucket = nearest_bucket(img.height, img.width, cfg.inference.base_resolution, cfg.pixel_multiple)
    up_w, up_h = upstream_bucket(img.width, img.height, cfg.inference.base_resolution)
    out.update(source_hw=list(spec.image_hw), bucket_hw=list(bucket),
               same_bucket_as_upstream=(up_h, up_w) == tuple(bucket), dtype=str(dtype))
    pipe = LBMPipeline(model, device, dtype)
    warm = 1 if device.type == "cuda" else 0     # CPU: no warm-up run (the tiny smoke run is short)
    for steps in spec.relight_steps:
        budget.need(10, f"the {steps}-step relight")

        def ours(steps: int = steps) -> Image.Image:
            return pipe(img, steps=steps, seed=0)

        def plain(steps: int = steps) -> Image.Image:
            res = plain_relight(model.denoiser, model.vae.vae_model, img, steps=steps, seed=0,
                                bridge_noise_sigma=cfg.bridge.bridge_noise_sigma,
                                base=cfg.inference.base_resolution, scaling_factor=cfg.vae.scaling_factor,
                                tile=spec.tile, overlap=spec.overlap, device=device, dtype=dtype)
            return res.resize((img.width, img.height), Image.BICUBIC)   # back to the photo's size, as ours

        row: dict[str, Any] = {}
        for name, fn in (("ours", ours), ("plain", plain)):
            reset_peak(device)
            s, result = timed(fn, device, repeats=spec.repeats, warmup=warm)
            row[name] = {"seconds": s, "peak_gb": peak_gb(device)}
            row[name + "_pixels"] = np.asarray(result, dtype=np.int16)
        diff = np.abs(row.pop("ours_pixels") - row.pop("plain_pixels"))
        row["max_pixel_diff"] = int(diff.max())
        row["mean_pixel_diff"] = float(diff.mean())
        row["ours_over_plain"] = row["ours"]["seconds"] / row["plain"]["seconds"]
        out[f"steps_{steps}"] = row


# -- 3. serving -------------------------------------------------------------------------------
def section_serve(spec: Spec, device: torch.device, budget: Budget, ctx: dict, out: dict) -> None:
    from lbm_registry.lbm.imaging import nearest_bucket
    from lbm_registry.lbm.model import weight_layers
    from lbm_registry.lora.apply import merge_lora, unmerge_lora
    from lbm_registry.serve.multilora import MultiLoRA, factors_from_lora, plan_batch

    model, cfg = ctx["model"]()
    dtype = ctx["dtype"]
    den = model.denoiser
    shapes = {n: tuple(m.weight.shape) for n, m in weight_layers(den).items()}
    h, w = nearest_bucket(*spec.image_hw, cfg.inference.base_resolution, cfg.pixel_multiple)
    b = spec.batch
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, 4, h // 8, w // 8, generator=g, device=device).to(dtype)
    t = torch.full((b,), 999.0, device=device, dtype=dtype)
    loras = [random_lora_on(shapes, i, spec.rank, spec.conv_rank, device, dtype) for i in range(b)]
    factors = [factors_from_lora(lf, f"lora{i}", device=device, dtype=dtype) for i, lf in enumerate(loras)]
    out.update(batch=b, latent_hw=[h // 8, w // 8], lora_mb=factors[0].nbytes / 2**20)

    def run(xb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        return den(xb, tb, encoder_hidden_states=None).sample

    with torch.no_grad(), MultiLoRA(den) as multi:
        def with_plan(plan, mode: str) -> Callable[[], Any]:
            def go() -> Any:
                multi.mode = mode
                with multi.apply(plan):
                    return run(x, t)
            return go

        reps = spec.repeats
        warm = 1 if device.type == "cuda" else 0
        reset_peak(device)
        out["no_lora_s"], _ = timed(lambda: run(x, t), device, reps, warmup=warm)
        out["no_lora_peak_gb"] = peak_gb(device)
        mixed = plan_batch([[(f, 1.0)] for f in factors])
        for mode in ("loop", "batched"):
            budget.need(10, f"the mixed batch ({mode})")
            reset_peak(device)
            out[f"mixed_{mode}_s"], _ = timed(with_plan(mixed, mode), device, reps, warmup=warm)
            out[f"mixed_{mode}_peak_gb"] = peak_gb(device)
        multi.mode = "auto"
        out["auto_took"] = auto = "batched" if multi.uses_batched(mixed) else "loop"
        out["mixed_auto_s"] = out[f"mixed_{auto}_s"]
        out[f"distinct_{b}_loop_s"], out[f"distinct_{b}_batched_s"] = out["mixed_loop_s"], out["mixed_batched_s"]
        for distinct in [k for k in spec.distinct if k < b]:   # the rule: loop vs batched by distinct LoRAs
            budget.need(10, f"{distinct} distinct LoRAs")
            plan = plan_batch([[(factors[i * distinct // b], 1.0)] for i in range(b)])
            out[f"distinct_{distinct}_loop_s"], _ = timed(with_plan(plan, "loop"), device, reps, warmup=warm)
            out[f"distinct_{distinct}_batched_s"], _ = timed(with_plan(plan, "batched"), device, reps, warmup=warm)

        def per_request() -> None:
            for i, lf in enumerate(loras):
                merge_lora(den, lf, 1.0)
                run(x[i:i + 1], t[i:i + 1])
                unmerge_lora(den, lf, 1.0)

        budget.need(15, "merge per request")
        out["merge_per_request_s"], _ = timed(per_request, device, max(1, reps - 1), warmup=warm)
    out["mixed_over_no_lora"] = out["mixed_auto_s"] / out["no_lora_s"]
    out["merge_over_mixed"] = out["merge_per_request_s"] / out["mixed_auto_s"]
    budget.need(30 if device.type == "cuda" else 15, "the engine's LoRA loads")
    out["loads"] = {}
    engine_loads(spec, model, device, dtype, shapes, budget, out["loads"])


def engine_loads(spec: Spec, model, device: torch.device, dtype: torch.dtype,
                 shapes: dict[str, tuple[int, ...]], budget: Budget, res: dict) -> None:
    """First request for a LoRA not yet loaded vs a cached one, idle and with a busy server;
    inline loads (before) vs the loader thread (after); warm requests' latency during a load."""
    import io

    from lbm_registry.lora.format import read_lora, write_lora
    from lbm_registry.registry.blobs import sha256_file
    from lbm_registry.serve.engine import Engine, ServeOptions
    from lbm_registry.serve.loader import LoRALoader, LoRASource

    img = synthetic_image(spec.image_hw, seed=1)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    png = buf.getvalue()
    with tempfile.TemporaryDirectory(prefix="lbm-device-check-") as tmp:
        files = {}
        for i, name in enumerate(("warm", "new")):
            lf = random_lora_on(shapes, 100 + i, spec.rank, spec.conv_rank, torch.device("cpu"), torch.bfloat16)
            path = write_lora(lf, Path(tmp) / f"{name}.safetensors", dtype=torch.bfloat16)
            files[name] = (path, sha256_file(path))
        res["file_mb"] = files["new"][0].stat().st_size / 2**20

        def resolver(ref: str) -> LoRASource:
            path, sha = files[ref]

            def load():   # how a resolver read and verified a LoRA before the loader thread
                if sha256_file(path) != sha:
                    raise RuntimeError("sha256 mismatch")
                return read_lora(path)

            return LoRASource(ref=ref, sha256=sha, load=load, size=path.stat().st_size, path=path)

        engine = Engine(model, resolver, device=device, dtype=dtype,
                        options=ServeOptions(max_batch=spec.batch, max_wait_ms=5.0, max_loras=4))
        try:
            engine.run(png, lora="warm")                 # warm-up (kernels, the warm LoRA)
            sync(device)
            for mode, threads in (("inline", 0), ("loader", 1)):
                engine.loader.close()
                engine.loader = LoRALoader(device, dtype, engine._check, threads=threads)
                budget.need(10, f"loads ({mode})")
                engine.cache.unload(files["new"][1])
                t0 = time.perf_counter()
                engine.run(png, lora="new")
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                engine.run(png, lora="new")
                cached = time.perf_counter() - t0
                engine.cache.unload(files["new"][1])
                busy = _busy_first_request(engine, png, files["new"][1], spec.batch)
                res[mode] = {"idle_first_s": first, "idle_cached_s": cached, **busy}
        finally:
            engine.close()
            engine.multi.close()   # the denoiser is shared with the next section


def _busy_first_request(engine, png: bytes, new_sha: str, clients: int) -> dict:
    """Keep ``clients`` threads submitting warm requests; after a few, ask for the new LoRA."""
    stop = threading.Event()
    lat: list[tuple[float, float]] = []   # (end time, latency) of warm requests

    def client() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            engine.run(png, lora="warm")
            lat.append((time.perf_counter(), time.perf_counter() - t0))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    while len(lat) < clients:
        time.sleep(0.005)
    t_start = time.perf_counter()
    engine.run(png, lora="new")
    t_end = time.perf_counter()
    n_before = len(lat)
    while len(lat) < n_before + clients:
        time.sleep(0.005)
    stop.set()
    for th in threads:
        th.join()
    before = [d for end, d in lat if end < t_start]
    during = [d for end, d in lat if t_start <= end <= t_end]
    engine.cache.unload(new_sha)
    return {"busy_first_s": t_end - t_start, "warm_median_s": statistics.median(before),
            "warm_during_load_median_s": statistics.median(during) if during else None,
            "warm_during_load_n": len(during)}


# -- 4. training ------------------------------------------------------------------------------
def section_train(spec: Spec, device: torch.device, budget: Budget, ctx: dict, out: dict) -> None:
    from types import SimpleNamespace

    from lbm_registry.lbm.model import build_model
    from lbm_registry.train.inject import inject_lora, new_lora_file
    from lbm_registry.train.loop import autocast_context, build_optimizer, check_optimizer_available
    from lbm_registry.train.losses import latent_loss_fn
    from lbm_registry.train.objective import BridgeObjective

    model, cfg = ctx["model"]()
    lora = new_lora_file(build_model(cfg, meta=True).denoiser, rank=spec.rank, conv_rank=spec.conv_rank,
                         targets=["*"], seed=0)
    injection = inject_lora(model.denoiser, lora)
    injection.set_trainable(["*"])
    params = list(injection.trainable_parameters())
    with torch.no_grad():
        for p in params[1::2]:                  # a trained-looking LoRA (up = 0 makes trivial grads)
            p.normal_(0.0, 1e-3)
    objective = BridgeObjective.create(cfg, latent_loss_fn("l2"))
    autocast = autocast_context(device, "auto")     # bf16 on a GPU; plain fp32 on CPU (as lbm-reg train)
    g = torch.Generator(device=device).manual_seed(0)
    source = torch.rand(1, 3, spec.train_px, spec.train_px, generator=g, device=device) * 2 - 1
    target = (source * 0.8).clamp(-1, 1)
    out.update(px=spec.train_px, lora_params=sum(p.numel() for p in params),
               autocast="bf16" if device.type == "cuda" else "none (fp32)")
    variants = [("adamw", False), ("adamw", True), ("adamw8bit", True), ("adamw8bit", False)]
    model.denoiser.train()
    for optimizer, ckpt in variants:
        key = f"{optimizer}{'_ckpt' if ckpt else ''}"
        try:
            check_optimizer_available(optimizer, device)
        except Exception as exc:   # no CUDA / no bitsandbytes: recorded, the other variants run
            out[key] = {"skipped": str(exc)}
            continue
        budget.need(10 if device.type == "cuda" else 5, f"training ({key})")
        opt = build_optimizer(SimpleNamespace(optimizer=optimizer, learning_rate=1e-4, weight_decay=0.0,
                                              momentum=0.0), params)
        if ckpt:
            model.denoiser.enable_gradient_checkpointing()
        else:
            model.denoiser.disable_gradient_checkpointing()
        gen = torch.Generator().manual_seed(0)

        def step(opt: torch.optim.Optimizer = opt, gen: torch.Generator = gen) -> float:
            with autocast():
                loss = objective(model, source, target, gen)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        reset_peak(device)
        s, loss = timed(step, device, repeats=spec.repeats, warmup=1 if device.type == "cuda" else 0)
        out[key] = {"s_per_step": s, "peak_gb": peak_gb(device), "loss": loss}
        del opt
    model.denoiser.eval()
    injection.remove()


# -- the run ----------------------------------------------------------------------------------
SECTIONS: dict[str, Callable[[Spec, torch.device, Budget, dict, dict], None]] = {
    "extract": section_extract, "relight": section_relight, "serve": section_serve, "train": section_train}


def run(spec: Spec, device: torch.device, sections: list[str], budget_scale: float = 1.0) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec.dtype]
    cache: dict[str, Any] = {}

    def model() -> Any:
        if "model" not in cache:
            t0 = time.perf_counter()
            cache["model"] = build_model_on(spec.config, device, dtype, base_resolution=spec.base_resolution)
            sync(device)
            results["model_build_s"] = time.perf_counter() - t0
        return cache["model"]

    ctx = {"model": model, "dtype": dtype}
    results: dict[str, Any] = {"spec": asdict(spec), "device": describe(device), "sections": {}}
    t_all = time.perf_counter()
    for name in sections:
        seconds = dict(spec.budgets)[name] * budget_scale
        budget = Budget(seconds)
        t0 = time.perf_counter()
        print(f"[device_check] {name} (budget {seconds:.0f} s) ...", file=sys.stderr, flush=True)
        res: dict[str, Any] = {}
        try:
            SECTIONS[name](spec, device, budget, ctx, res)   # fills res as it goes: a cut keeps the rest
            res["ok"] = True
        except OutOfTime as exc:
            res.update(ok=False, error=str(exc))
        except Exception as exc:  # noqa: BLE001  (recorded; the next section still runs)
            res.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc(limit=6)[-2000:])
        res["wall_s"] = time.perf_counter() - t0
        results["sections"][name] = res
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[device_check] {name}: {'ok' if res['ok'] else res['error']} ({res['wall_s']:.0f} s)",
              file=sys.stderr, flush=True)
    results["total_s"] = time.perf_counter() - t_all
    return results


def describe(device: torch.device) -> dict:
    d = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
         "cpu_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        d.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, cuda=torch.version.cuda)
    with contextlib.suppress(Exception):
        import diffusers

        d["diffusers"] = diffusers.__version__
    return d


# -- the table --------------------------------------------------------------------------------
def _s(v: Any, unit: str = "s", digits: int = 3) -> str:
    if v is None:
        return "—"
    if unit == "s":
        return f"{v:.{digits}f} s" if v < 10 else f"{v:.1f} s"
    if unit == "GB":
        return f"{v:.2f} GB"
    return f"{v:.{digits}f}{unit}"


def spec_distinct(r: dict) -> tuple[int, ...]:
    return tuple(r["spec"].get("distinct", (1, 2, 4)))


def markdown(r: dict) -> str:
    d = r["device"]
    head = d.get("gpu", "CPU") + (f" ({d['gpu_memory_gb']:.0f} GiB, CUDA {d.get('cuda')})" if "gpu" in d else "")
    lines = [f"### Device check: {r['spec']['name']} size on {head}", "",
             f"{d['date']}, torch {d['torch']}, diffusers {d.get('diffusers', '?')}, {d['cpu_threads']} CPU threads, "
             f"load average {d['load_average'][0]:.1f}; model built on the device in "
             f"{_s(r.get('model_build_s'))}; whole run {_s(r['total_s'])}.", "",
             "| measurement | value | target |", "| --- | --- | --- |"]
    sec = r["sections"]
    for name, res in sec.items():
        if not res.get("ok"):
            lines.append(f"| {name} | **failed or cut short** (rows below are what it measured): "
                         f"{res.get('error', '?')} | |")
    e = sec.get("extract", {})
    if "device" in e:
        dv, cp = e["device"], e.get("cpu", {})
        lines.append(f"| extraction {e['rank']}/{e['conv_rank']}, {e['device_layers']} of {e['layers']} layers, on "
                     f"the device (compute; deltas generated there) | **{_s(dv['seconds'])}**, peak "
                     f"{_s(dv['peak_gb'], 'GB')} | < 10 s |")
        lines.append(f"| extraction error / exact truncation ({dv['error_layers']} layers) | max "
                     f"{dv['error_ratio_max']:.4f}, mean {dv['error_ratio_mean']:.4f} | <= 1.01 |")
        if cp:
            lines.append(f"| extraction on the CPU path, {cp['threads']} threads (**extrapolated** from "
                         f"{cp['layers_measured']} layers) | {_s(cp['seconds_extrapolated'])} "
                         f"(**{e['cpu_over_device']:.1f}x** the device) | |")
    rl = sec.get("relight", {})
    for k in [k for k in rl if k.startswith("steps_")]:
        x = rl[k]
        lines.append(f"| relight {rl['source_hw'][1]}x{rl['source_hw'][0]} -> bucket {rl['bucket_hw'][1]}x"
                     f"{rl['bucket_hw'][0]}, {k[6:]} step(s), {rl['dtype'].replace('torch.', '')}: ours / plain "
                     f"diffusers loop | "
                     f"{_s(x['ours']['seconds'])} / {_s(x['plain']['seconds'])} "
                     f"(**{x['ours_over_plain']:.2f}x**); peak {_s(x['ours']['peak_gb'], 'GB')} / "
                     f"{_s(x['plain']['peak_gb'], 'GB')}; max pixel diff **{x['max_pixel_diff']}** "
                     f"(mean {x['mean_pixel_diff']:.2f}) | <= 1.05x |")
    s = sec.get("serve", {})
    if "no_lora_s" in s:
        b = s["batch"]
        lines.append(f"| serve, batch of {b} at latent {s['latent_hw'][0]}x{s['latent_hw'][1]}, one denoiser pass: "
                     f"no LoRA | {_s(s['no_lora_s'])} (peak {_s(s.get('no_lora_peak_gb'), 'GB')}) | |")
        if "mixed_auto_s" in s:
            lines.append(f"| {b} different LoRAs mixed ({s.get('auto_took', '?')} path) | **{_s(s['mixed_auto_s'])} "
                         f"({s['mixed_auto_s'] / s['no_lora_s']:.2f}x no LoRA)** | <= 1.15x |")
        if "merge_per_request_s" in s and "mixed_auto_s" in s:
            lines.append(f"| the {b} one after another, merge + 1-sample pass + unmerge | "
                         f"{_s(s['merge_per_request_s'])} (**{s['merge_per_request_s'] / s['mixed_auto_s']:.1f}x** "
                         f"mixed) | >= 3x |")
        rule = [f"{k}: loop {_s(s.get(f'distinct_{k}_loop_s'))} / batched {_s(s.get(f'distinct_{k}_batched_s'))}"
                for k in sorted({*spec_distinct(r), b}) if f"distinct_{k}_loop_s" in s]
        if rule:
            lines.append(f"| distinct LoRAs in the batch -> loop / batched | {'; '.join(rule)} | sets the auto rule |")
        ld = s.get("loads", {})
        for mode, label in (("inline", "before: inline load"), ("loader", "after: loader thread")):
            if mode in ld and "busy_first_s" in ld[mode]:
                x = ld[mode]
                lines.append(f"| first request for a new {ld['file_mb']:.0f} MB LoRA, {label}: idle / cached / "
                             f"busy server | {_s(x['idle_first_s'])} / {_s(x['idle_cached_s'])} / "
                             f"**{_s(x['busy_first_s'])}** | |")
                lines.append(f"| warm requests' median latency, {label}: before / during the load | "
                             f"{_s(x['warm_median_s'])} / {_s(x['warm_during_load_median_s'])} "
                             f"({x['warm_during_load_n']} during) | |")
    t = sec.get("train", {})
    if "px" in t:
        for key, label in (("adamw", "AdamW"), ("adamw_ckpt", "AdamW + checkpointing"),
                           ("adamw8bit_ckpt", "8-bit AdamW + checkpointing"), ("adamw8bit", "8-bit AdamW")):
            if key not in t:
                continue
            x = t[key]
            target = "fits 24 GB" if key == "adamw8bit_ckpt" else ""
            if "skipped" in x:
                lines.append(f"| training step {t['px']} px, {label} | skipped: {x['skipped']} | {target} |")
            else:
                lines.append(f"| training step {t['px']} px, rank {r['spec']['rank']}/{r['spec']['conv_rank']}, "
                             f"autocast {t['autocast']}, {label} | {_s(x['s_per_step'])}/step, peak "
                             f"{_s(x['peak_gb'], 'GB')} | {target} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny twin on CPU (a smoke run of every code path)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")),
                    help="folder for device_check.json and device_check.md (default: $OUT or .)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ",".join(SECTIONS))
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}: use {', '.join(SECTIONS)}")
    if args.tiny:
        # One intra-op thread: the tiny twin is all small ops, which two OpenMP threads only slow
        # down (barriers), badly so on a busy machine.
        torch.set_num_threads(1)
        spec, device = TINY, torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here: run with --tiny for the CPU smoke run", file=sys.stderr)
            return 2
        spec, device = FULL, torch.device("cuda")
    results = run(spec, device, sections, args.budget_scale)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results)
    (args.out / "device_check.md").write_text(table + "\n")
    print(table)
    return 0 if all(s.get("ok") for s in results["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
