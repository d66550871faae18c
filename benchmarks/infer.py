"""Inference benchmark: merging a rank-32/16 LoRA into the FULL-SIZE denoiser on CPU, and
per-image latency on the tiny twin with and without a merged LoRA (side by side, one run);
``--decode``: peak memory and time of a ~1 MP decode by the FULL-SIZE SDXL VAE (84 M
parameters, seeded random weights, fp32 CPU), whole vs in upstream's tiles, each in its own
process (peak RSS is per process).

    .venv/bin/python benchmarks/infer.py            # uses benchmarks/.cache from extract.py if present
    .venv/bin/python benchmarks/infer.py --tiny-only
    flock /tmp/lbm-heavy.lock .venv/bin/python benchmarks/infer.py --tiny-only --decode

The full-size part needs the synthetic full-size base that ``benchmarks/extract.py`` caches
(``benchmarks/.cache/lbm-relighting-v1-base.safetensors``, bf16). The LoRA is random
rank-32 (linear) / rank-16 (conv) factors over all 792 layers, which costs the same to merge
as an extracted one. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent / ".cache"


def random_lora(shapes: dict[str, tuple[int, ...]], rank: int = 32, conv_rank: int = 16, seed: int = 0):
    from lbm_registry.lora.format import LoRAFile, LoRALayer

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for m, shape in shapes.items():
        r = min(conv_rank if len(shape) == 4 else rank, shape[0], int(torch.tensor(shape[1:]).prod()))
        down = torch.randn(r, *shape[1:], generator=g) * 0.01
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.01
        layers[m] = LoRALayer(m, down.to(torch.bfloat16), up.to(torch.bfloat16), float(r))
    return LoRAFile(layers, {})


def naive_merge_state_dict(sd: dict, lora, scale: float = 1.0) -> dict:
    """The straightforward merge (and ours before this benchmark): materialise the fp32 delta,
    add it to an fp32 copy of the weight, round back. Kept here as the side-by-side reference."""
    out = dict(sd)
    for name, layer in lora.layers.items():
        key = f"denoiser.{name}.weight"
        w = sd[key]
        out[key] = (w.float() + layer.delta(torch.float32).mul_(scale)).to(w.dtype)
    return out


def full_size_merge(base: Path) -> list[tuple[str, str]]:
    """Merge into the full-size denoiser the way ``lbm-reg infer`` does on CPU (fp32 model,
    originals re-read from the checkpoint), and into its bf16 state dict, against the naive merge."""
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import build_denoiser
    from lbm_registry.lora.apply import MergedLoRAs, merge_state_dict

    reader = CheckpointReader(base)
    t0 = time.perf_counter()
    sd = {k: reader.read(k) for k in reader.keys() if k.startswith("denoiser.")}
    load_s = time.perf_counter() - t0
    shapes = {k[len("denoiser."):-len(".weight")]: tuple(v.shape) for k, v in sd.items()
              if k.endswith(".weight") and v.ndim >= 2}
    lora = random_lora(shapes)
    n_params = sum(v.numel() for v in sd.values())

    t0 = time.perf_counter()
    merged = naive_merge_state_dict(sd, lora)
    naive_s = time.perf_counter() - t0
    del merged
    t0 = time.perf_counter()
    merged = merge_state_dict(sd, lora)
    ours_sd_s = time.perf_counter() - t0
    del merged, sd

    with torch.device("meta"):
        den = build_denoiser(load_config("lbm-relighting"))
    t0 = time.perf_counter()
    den.load_state_dict({k[len("denoiser."):]: reader.get(k).float() for k in reader.keys()
                         if k.startswith("denoiser.")}, strict=True, assign=True)
    load_fp32_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = MergedLoRAs(den, [(lora, 1.0)], originals=lambda name: reader.get(f"denoiser.{name}.weight"))
    model_merge_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.set_scale(0.5)
    rescale_s = time.perf_counter() - t0
    return [("full-size denoiser params", f"{n_params:,}"),
            ("LoRA layers / params", f"{len(lora.layers)} / {lora.num_params():,}"),
            ("read base denoiser (bf16 file)", f"{load_s:.1f} s"),
            ("load it as an fp32 model (what `infer` does on CPU)", f"{load_fp32_s:.1f} s"),
            ("**merge rank-32/16 LoRA into the fp32 model (all 792 layers)**", f"**{model_merge_s:.1f} s**"),
            ("re-scale it (`pipe(img, scale=0.5)`: originals re-read from the file)", f"{rescale_s:.1f} s"),
            ("merge into the bf16 state dict: ours / naive", f"{ours_sd_s:.1f} s / {naive_s:.1f} s "
                                                              f"({naive_s / ours_sd_s:.1f}x faster)")]


def tiny_latency(repeats: int = 5) -> list[tuple[str, str]]:
    from PIL import Image

    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import build_model, weight_layers
    from lbm_registry.lbm.pipeline import LBMPipeline
    from lbm_registry.lora.apply import MergedLoRAs

    cfg = load_config("lbm-tiny")
    model = build_model(cfg, seed=0).eval()
    img = Image.new("RGB", (256, 256), (120, 80, 40))
    pipe = LBMPipeline(model, torch.device("cpu"), torch.float32)
    pipe(img)  # warm-up

    def timed() -> float:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipe(img)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    base_s = timed()
    lora = random_lora({n: tuple(m.weight.shape) for n, m in weight_layers(model.denoiser).items()})
    t0 = time.perf_counter()
    pipe.loras = MergedLoRAs(model.denoiser, [(lora, 1.0)])
    merge_s = time.perf_counter() - t0
    lora_s = timed()
    t0 = time.perf_counter()
    pipe.loras.set_scale(0.5)
    rescale_s = time.perf_counter() - t0
    return [("tiny: image 256x256, 1 step, base only", f"{base_s * 1000:.0f} ms"),
            ("tiny: same with a merged rank-32/16 LoRA", f"{lora_s * 1000:.0f} ms ({lora_s / base_s:.2f}x)"),
            ("tiny: merge / re-scale the LoRA", f"{merge_s * 1000:.0f} ms / {rescale_s * 1000:.0f} ms")]


_DECODE_CHILD = r"""
import json, resource, sys, time
import torch
from lbm_registry.lbm.config import load_config
from lbm_registry.lbm.model import VAEWrapper, build_vae
h, w, tiled = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "tiled"
cfg = load_config("lbm-relighting")
torch.manual_seed(0)
vae = VAEWrapper(build_vae(cfg).eval().requires_grad_(False), cfg.vae.scaling_factor, cfg.vae.downsample_factor)
z = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
with torch.no_grad():
    out = vae.decode(z, tiled=tiled)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "seconds": seconds, "shape": list(out.shape)}))
"""


def decode_memory(buckets: tuple[tuple[int, int], ...] = ((1152, 896), (512, 2048))) -> list[tuple[str, str]]:
    """Peak RSS and time of one full-size VAE decode per bucket, whole vs tiled (a process each)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rows = []
    for h, w in buckets:
        got = {}
        for mode in ("whole", "tiled"):
            out = subprocess.run([sys.executable, "-c", _DECODE_CHILD, str(h), str(w), mode], env=env,
                                 capture_output=True, text=True, check=True)
            got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = got["whole"], got["tiled"]
        gib = 1024**3
        rows.append((f"full-size VAE decode {h}x{w} (latent {h // 8}x{w // 8}): peak RSS whole / tiled",
                     f"{a['peak'] / gib:.2f} / {b['peak'] / gib:.2f} GiB ({b['peak'] / a['peak']:.2f}x; "
                     f"the decode itself +{(a['peak'] - a['before']) / gib:.2f} / +{(b['peak'] - b['before']) / gib:.2f} GiB)"))
        rows.append((f"full-size VAE decode {h}x{w}: time whole / tiled",
                     f"{a['seconds']:.1f} / {b['seconds']:.1f} s ({b['seconds'] / a['seconds']:.2f}x)"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--decode", action="store_true", help="full-size VAE decode, whole vs tiled (heavy: use the lock)")
    ap.add_argument("--base", type=Path, default=CACHE / "lbm-relighting-v1-base.safetensors")
    args = ap.parse_args()
    rows = tiny_latency()
    if args.decode:
        rows += decode_memory()
    if not args.tiny_only:
        if args.base.is_file():
            rows += full_size_merge(args.base)
        else:
            rows.append(("full-size merge", f"skipped: {args.base} missing (run benchmarks/extract.py first)"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| measurement | value |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
