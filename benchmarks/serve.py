"""Serving benchmark: a batch of 8 requests for 8 different LoRAs, side by side in one run.

    .venv/bin/python benchmarks/serve.py --tiny-only
    flock /work/coord/heavy.lock .venv/bin/python benchmarks/serve.py --full-only   # ~12 GB RAM

For the tiny twin (256 px) and the full-size LBM denoiser (512 px, synthetic random weights,
fp32 on CPU) it times one denoiser pass of 8 samples:

- **mixed**: 8 different rank-32/16 LoRAs in one pass (``serve.multilora``: ``W x`` once,
  each sample's low-rank path on its own rows);
- **no LoRA**: the same batch on the bare base;
- **merge per request**: the 8 one after another, each with merge, a 1-sample pass, unmerge
  (what a server that swaps one adapter at a time does);
- **one LoRA for all 8**: the low-rank path vs the weights merged once (is merging worth it?).

Plus the first request for a new LoRA (sha256 of the file, read, copy to the device) against a
cached one, and the bytes each cached LoRA holds. The VAE is left out: it costs the same in
every variant. Prints a markdown table with ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def random_lora(shapes: dict[str, tuple[int, ...]], seed: int, rank: int = 32, conv_rank: int = 16):
    from lbm_registry.lora.format import LoRAFile, LoRALayer

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for m, shape in shapes.items():
        n = int(torch.tensor(shape[1:]).prod())
        r = min(conv_rank if len(shape) == 4 else rank, shape[0], n)
        down = torch.randn(r, *shape[1:], generator=g) / n**0.5
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.01
        layers[m] = LoRALayer(m, down.to(torch.bfloat16), up.to(torch.bfloat16), float(r))
    return LoRAFile(layers, {})


def _median(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def bench(name: str, denoiser: torch.nn.Module, latent: int, *, batch: int = 8, repeats: int = 3) -> list[tuple[str, str]]:
    from lbm_registry.lbm.model import weight_layers
    from lbm_registry.lbm.threads import one_thread
    from lbm_registry.lora.apply import merge_lora, unmerge_lora
    from lbm_registry.lora.format import write_lora
    from lbm_registry.registry.blobs import sha256_file
    from lbm_registry.serve.cache import LoRACache
    from lbm_registry.serve.multilora import MultiLoRA, factors_from_lora, plan_batch

    dev, dt = torch.device("cpu"), torch.float32
    shapes = {n: tuple(m.weight.shape) for n, m in weight_layers(denoiser).items()}
    with one_thread():
        loras = [random_lora(shapes, seed=i) for i in range(batch)]
    factors = [factors_from_lora(lf, f"lora{i}", device=dev, dtype=dt) for i, lf in enumerate(loras)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.full((batch,), 999.0)

    def run(xb, tb):
        return denoiser(xb, tb, encoder_hidden_states=None).sample

    multi = MultiLoRA(denoiser)
    mixed_plan = plan_batch([[(f, 1.0)] for f in factors])
    same_plan = plan_batch([[(factors[0], 1.0)]] * batch)

    def mixed():
        with multi.apply(mixed_plan):
            run(x, t)

    def same_lowrank():
        with multi.apply(same_plan):
            run(x, t)

    def per_request():
        for i, lf in enumerate(loras):
            merge_lora(denoiser, lf, 1.0)
            run(x[i:i + 1], t[i:i + 1])
            unmerge_lora(denoiser, lf, 1.0)

    run(x, t)  # warm-up
    base_s = _median(lambda: run(x, t), repeats)
    mixed_s = _median(mixed, repeats)
    per_req_s = _median(per_request, max(1, repeats - 1))
    same_s = _median(same_lowrank, repeats)
    t0 = time.perf_counter()
    merge_lora(denoiser, loras[0], 1.0)
    merge_s = time.perf_counter() - t0
    merged_s = _median(lambda: run(x, t), repeats)
    t0 = time.perf_counter()
    unmerge_lora(denoiser, loras[0], 1.0)
    unmerge_s = time.perf_counter() - t0
    multi.close()

    # Cache: first request for a LoRA (sha256 + read + to device) vs a cached one.
    with tempfile.TemporaryDirectory() as tmp:
        path = write_lora(loras[0], Path(tmp) / "l.safetensors", dtype=torch.bfloat16)
        from lbm_registry.lora.format import read_lora

        cache = LoRACache(4)

        def load():
            sha256_file(path)
            return factors_from_lora(read_lora(path), "k", device=dev, dtype=dt)

        t0 = time.perf_counter()
        cache.get("k", load)
        first_s = time.perf_counter() - t0
        hit_s = _median(lambda: cache.get("k", load), 100)
        file_mb = path.stat().st_size / 2**20
    fp32_mb = factors[0].nbytes / 2**20

    return [
        (f"{name}: batch of {batch}, no LoRA (one pass)", f"{base_s:.3f} s (1.00x)"),
        (f"**{name}: batch of {batch}, {batch} different LoRAs, mixed (one pass)**",
         f"**{mixed_s:.3f} s ({mixed_s / base_s:.2f}x of no-LoRA)**"),
        (f"{name}: the {batch} one after another, merge + 1-sample pass + unmerge each",
         f"{per_req_s:.3f} s ({per_req_s / mixed_s:.2f}x slower than mixed)"),
        (f"{name}: batch of {batch}, one LoRA for all: low-rank path / merged weights",
         f"{same_s:.3f} s / {merged_s:.3f} s (+ merge {merge_s:.3f} s, unmerge {unmerge_s:.3f} s)"),
        (f"{name}: first request for a new LoRA (sha256 + read + to device) / cached",
         f"{first_s * 1000:.0f} ms / {hit_s * 1e6:.0f} us"),
        (f"{name}: memory per cached LoRA (fp32 on device; file bf16)", f"{fp32_mb:.1f} MB ({file_mb:.1f} MB file)"),
    ]


def tiny_rows(repeats: int) -> list[tuple[str, str]]:
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import build_denoiser

    cfg = load_config("lbm-tiny")
    torch.manual_seed(0)
    den = build_denoiser(cfg).eval().requires_grad_(False)
    return bench("tiny 256 px", den, 256 // 8, repeats=repeats)


def full_rows(repeats: int, resolution: int) -> list[tuple[str, str]]:
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import build_denoiser

    cfg = load_config("lbm-relighting")
    t0 = time.perf_counter()
    with torch.device("meta"):
        den = build_denoiser(cfg)
    den = den.to_empty(device="cpu").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for p in den.parameters():   # synthetic weights at a trained model's scale
        p.normal_(0.0, 0.02 if p.ndim >= 2 else 0.01, generator=g)
    build_s = time.perf_counter() - t0
    rows = [("full-size denoiser: synthetic fp32 weights built in", f"{build_s:.0f} s")]
    return rows + bench(f"full {resolution} px", den, resolution // 8, repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--full-only", action="store_true")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    import os

    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    if not args.full_only:
        rows += tiny_rows(args.repeats)
    if not args.tiny_only:
        rows += full_rows(max(1, args.repeats - 2), args.resolution)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, load average {load:.1f} "
          f"on {os.cpu_count()} cores\n")
    print("| measurement | value |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
