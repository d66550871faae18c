"""Serving benchmark: a batch of 8 requests for 8 different LoRAs, side by side in one run.

    .venv/bin/python benchmarks/serve.py --tiny-only
    flock /tmp/lbm-heavy.lock .venv/bin/python benchmarks/serve.py --full-only   # ~14 GB RAM
    .venv/bin/python benchmarks/serve.py --tiny-only --loads --compile        # + LoRA loads, torch.compile

For the tiny twin (256 px) and the full-size LBM denoiser (512 px, synthetic random weights,
fp32 on CPU) it times one denoiser pass of 8 samples:

- **mixed**: 8 different rank-32/16 LoRAs in one pass (``serve.multilora``: ``W x`` once, each
  sample's low-rank path), on the **loop** path (per LoRA, two small matmuls on its rows) and
  on the **batched** path (per layer, the factors stacked, one bmm down and one up); and the
  same for batches of 1, 2 and 4 distinct LoRAs (this sets the auto rule,
  ``multilora.BATCHED_MIN_DISTINCT``);
- **no LoRA**: the same batch on the bare base;
- **merge per request**: the 8 one after another, each with merge, a 1-sample pass, unmerge
  (what a server that swaps one adapter at a time does);
- **one LoRA for all 8**: the low-rank path vs the weights merged once (is merging worth it?).

Plus loading a LoRA not yet cached: inline as before (sha256 of the file, then read it, then
convert) against the loader's one pass (read and hash together, views of the buffer), and a
cached hit. ``--loads`` adds the engine-level figure: the first request for a new (large,
full-rank) LoRA while 8 clients keep the tiny server busy, loads inline (before) vs on the loader
thread (after), and the warm requests' latency while it loads. ``--compile`` times
``torch.compile`` of the tiny denoiser, bare and with the batched mixed-LoRA hooks. The VAE is
left out of the pass timings: it costs the same in every variant. Prints markdown tables.
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


def device_check() -> object:
    """benchmarks/device_check.py as a module (the engine-level load benchmark lives there)."""
    import importlib.util
    import sys

    key = "lbm_bench_device_check"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name("device_check.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


@torch.no_grad()
def bench(name: str, denoiser: torch.nn.Module, latent: int, *, batch: int = 8, repeats: int = 3) -> list[tuple[str, str]]:
    from lbm_registry.lbm.model import weight_layers
    from lbm_registry.lbm.threads import one_thread
    from lbm_registry.lora.apply import merge_lora, unmerge_lora
    from lbm_registry.lora.format import write_lora
    from lbm_registry.registry.blobs import sha256_file
    from lbm_registry.serve.cache import LoRACache
    from lbm_registry.serve.loader import LoRALoader, LoRASource
    from lbm_registry.serve.multilora import MultiLoRA, batched_is_faster, factors_from_lora, plan_batch

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
    same_plan = plan_batch([[(factors[0], 1.0)]] * batch)

    def mixed_with(distinct: int, mode: str):
        plan = plan_batch([[(factors[i * distinct // batch], 1.0)] for i in range(batch)])

        def go():
            multi.mode = mode
            with multi.apply(plan):
                run(x, t)
        return go

    def same_lowrank():
        multi.mode = "loop"
        with multi.apply(same_plan):
            run(x, t)

    def per_request():
        for i, lf in enumerate(loras):
            merge_lora(denoiser, lf, 1.0)
            run(x[i:i + 1], t[i:i + 1])
            unmerge_lora(denoiser, lf, 1.0)

    run(x, t)  # warm-up
    base_s = _median(lambda: run(x, t), repeats)
    sweep = {}
    for distinct in (batch, 4, 2, 1):
        for mode in ("loop", "batched"):
            sweep[distinct, mode] = _median(mixed_with(distinct, mode), repeats)
    auto = "batched" if batched_is_faster("cpu", batch) else "loop"
    mixed_s = sweep[batch, auto]
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

    # Cache: first request for a LoRA, inline as before (sha256, then read, then convert) vs the
    # loader's one pass (read + hash together, views of the buffer), vs a cached one.
    with tempfile.TemporaryDirectory() as tmp:
        path = write_lora(loras[0], Path(tmp) / "l.safetensors", dtype=torch.bfloat16)
        from lbm_registry.lora.format import read_lora

        sha = sha256_file(path)

        def old_load():
            if sha256_file(path) != sha:
                raise RuntimeError("sha256 mismatch")
            return read_lora(path)

        src = LoRASource("l", sha, old_load, path.stat().st_size, path)
        firsts = {}
        for label, threads in (("inline", 0), ("loader", 1)):
            loader = LoRALoader(dev, dt, threads=threads)
            ts = []
            for _ in range(3):
                cache = LoRACache(4)
                t0 = time.perf_counter()
                cache.get(sha, lambda loader=loader: loader.load(src))
                ts.append(time.perf_counter() - t0)
            loader.close()
            firsts[label] = statistics.median(ts)
        hit_s = _median(lambda: cache.get(sha, lambda: None), 100)
        file_mb = path.stat().st_size / 2**20
    fp32_mb = factors[0].nbytes / 2**20
    sweep_text = "; ".join(f"{d}: {sweep[d, 'loop']:.3f} / {sweep[d, 'batched']:.3f} s"
                           for d in (1, 2, 4, batch))

    return [
        (f"{name}: batch of {batch}, no LoRA (one pass)", f"{base_s:.3f} s (1.00x)"),
        (f"**{name}: batch of {batch}, {batch} different LoRAs, mixed (one pass, {auto} path: the auto rule)**",
         f"**{mixed_s:.3f} s ({mixed_s / base_s:.2f}x of no-LoRA)**"),
        (f"{name}: batch of {batch}, distinct LoRAs -> loop / batched path", sweep_text),
        (f"{name}: the {batch} one after another, merge + 1-sample pass + unmerge each",
         f"{per_req_s:.3f} s ({per_req_s / mixed_s:.2f}x slower than mixed)"),
        (f"{name}: batch of {batch}, one LoRA for all: low-rank path / merged weights",
         f"{same_s:.3f} s / {merged_s:.3f} s (+ merge {merge_s:.3f} s, unmerge {unmerge_s:.3f} s)"),
        (f"{name}: loading a new LoRA: inline (sha256, read, convert) / loader (one pass) / cached",
         f"{firsts['inline'] * 1000:.0f} ms / {firsts['loader'] * 1000:.0f} ms / {hit_s * 1e6:.0f} us"),
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


def loads_rows() -> list[tuple[str, str]]:
    """The first request for a new full-rank LoRA of the tiny twin while 8 clients keep the
    server busy (256 px, fp32, CPU): loads inline as before vs on the loader thread."""
    from dataclasses import replace

    from lbm_registry.lbm.model import weight_layers

    dc = device_check()
    spec = replace(dc.TINY, image_hw=(256, 256), batch=8, rank=9999, conv_rank=9999, base_resolution=None,
                   dtype="fp32")
    dev = torch.device("cpu")
    model, _ = dc.build_model_on(spec.config, dev, torch.float32)
    shapes = {n: tuple(m.weight.shape) for n, m in weight_layers(model.denoiser).items()}
    res: dict = {}
    dc.engine_loads(spec, model, dev, torch.float32, shapes, dc.Budget(3600), res)
    rows = []
    for mode, label in (("inline", "before (inline: sha256, read, convert in the request)"),
                        ("loader", "after (loader thread: one pass)")):
        x = res[mode]
        rows.append((f"tiny 256 px server, new {res['file_mb']:.0f} MB LoRA, {label}: first request idle / "
                     f"cached / **with 8 busy clients**",
                     f"{x['idle_first_s']:.3f} s / {x['idle_cached_s']:.3f} s / **{x['busy_first_s']:.3f} s**"))
        rows.append((f"tiny 256 px server, {label}: warm requests' median latency before / during the load",
                     f"{x['warm_median_s']:.3f} s / "
                     f"{x['warm_during_load_median_s'] or float('nan'):.3f} s ({x['warm_during_load_n']} during)"))
    return rows


@torch.no_grad()
def compile_rows(repeats: int) -> list[tuple[str, str]]:
    """torch.compile of the tiny denoiser on CPU, bare and with the batched mixed-LoRA hooks."""
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import build_denoiser, weight_layers
    from lbm_registry.serve.multilora import MultiLoRA, factors_from_lora, plan_batch

    torch.manual_seed(0)
    den = build_denoiser(load_config("lbm-tiny")).eval().requires_grad_(False)
    shapes = {n: tuple(m.weight.shape) for n, m in weight_layers(den).items()}
    factors = [factors_from_lora(random_lora(shapes, seed=i), f"l{i}", device="cpu", dtype=torch.float32)
               for i in range(8)]
    x, t = torch.randn(8, 4, 32, 32), torch.full((8,), 999.0)
    multi = MultiLoRA(den, mode="batched")
    plans = [plan_batch([[(f, 1.0)] for f in order]) for order in (factors, factors[::-1])]

    def call(model, plan=None):
        with multi.apply(plan):
            return model(x, t, encoder_hidden_states=None).sample

    rows = []
    compiled = torch.compile(den)
    for label, plan in (("bare", None), ("8 LoRAs, batched path", plans[0])):
        eager = _median(lambda plan=plan: call(den, plan), repeats)
        t0 = time.perf_counter()
        call(compiled, plan)
        first = time.perf_counter() - t0
        steady = _median(lambda plan=plan: call(compiled, plan), repeats)
        rows.append((f"torch.compile, tiny 256 px batch of 8, {label}: eager / compiled (first call)",
                     f"{eager:.3f} s / {steady:.3f} s ({first:.1f} s)"))
    t0 = time.perf_counter()
    call(compiled, plans[1])
    rows.append(("torch.compile: the next batch with other LoRAs (a new plan)", f"{time.perf_counter() - t0:.1f} s"))
    multi.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--full-only", action="store_true")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--loads", action="store_true", help="also the busy-server LoRA load benchmark (tiny)")
    ap.add_argument("--compile", action="store_true", help="also torch.compile of the tiny denoiser")
    args = ap.parse_args()
    import os

    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    rows = []
    if not args.full_only:
        rows += tiny_rows(args.repeats)
    if not args.tiny_only:
        rows += full_rows(max(1, args.repeats - 2), args.resolution)
    if args.loads:
        rows += loads_rows()
    if args.compile:
        rows += compile_rows(args.repeats)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, load average {load_before:.1f} "
          f"before and {load:.1f} after, on {os.cpu_count()} cores\n")
    print("| measurement | value |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
