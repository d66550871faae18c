"""Benchmark: LoRA extraction at full LBM size, ours vs the original scripts' method.

    .venv/bin/python benchmarks/extract.py            # full size (~10 GB of cache, ~15-25 min)
    .venv/bin/python benchmarks/extract.py --quick    # tiny twin, a sanity run (~1 min)

1. Generates (once, cached under benchmarks/.cache/) a synthetic LBM pair with the real
   denoiser shapes (configs/lbm-relighting.yaml, 2.4 B parameters, bf16 like real checkpoints,
   ~4.9 GB each): base random; tuned = base + per-layer deltas with a power-law spectrum
   (exponent 0.5-1.1, 128 components) plus a Gaussian noise floor, stored in bf16 (so the
   rounding of ``base + delta`` adds a second, realistic noise floor). Biases change a little too.
   Written tensor by tensor: neither model is ever whole in memory.
2. Runs, each in its own subprocess (wall time and peak RSS from ``os.wait4``):
   - ours: ``lbm-reg extract --rank 32 --conv-rank 16`` on all 792 layers, end to end, after
     reading both files once (page cache warm: the disk is not what is measured); in a fresh home
     the inputs' hashes run beside the extraction, and again in a registry that knows them;
   - ours at full rank in fp32 (``--rank 9999 --conv-rank 9999 --dtype fp32``): every layer must
     reconstruct to rel. error < 1e-5 (the ~14 GB output is deleted afterwards);
   - the original method on a sample of layers (one per distinct shape, the largest first):
     both models loaded whole (``safetensors.torch.load_file``), then per layer
     ``torch.linalg.svd(dW)`` (default ``full_matrices=True``, as kohya's
     extract_lora_from_models.py and the LBM scripts call it) and truncation; the same layers
     also get an exact thin SVD (``full_matrices=False``) for a fairer exact baseline and the
     exact truncation error. The full run is extrapolated from the per-shape times.
3. Prints a markdown table (and writes JSON with ``--json``).

Timings depend on what else runs on the machine: the 1-minute load average is printed with
every run. The benchmark never runs under pytest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
GEN_VERSION = "v1"
RANK, CONV_RANK = 32, 16


# -- synthetic pair ---------------------------------------------------------------------------
def _denoiser_shapes(config_path: Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import expected_shapes

    cfg = load_config(config_path)
    shapes = {k: v for k, v in expected_shapes(cfg).items() if k.startswith("denoiser.")}
    return dict(sorted(shapes.items())), cfg.to_dict()


def _tensor_pair(key: str, shape: tuple[int, ...], seed: int):
    """(base, tuned) for one key, both bf16, deterministic in (key, seed)."""
    import torch

    g = torch.Generator().manual_seed((zlib.crc32(key.encode()) * 7919 + seed) % 2**62)
    if len(shape) >= 2:
        m, n = shape[0], math.prod(shape[1:])
        std = min(0.05, 1.0 / math.sqrt(n))
        w = torch.randn(m, n, generator=g) * std
        r = min(128, m, n)
        exponent = (0.5, 0.8, 1.1)[zlib.crc32(key.encode()) % 3]
        s = torch.arange(1, r + 1, dtype=torch.float32) ** -exponent
        u = torch.randn(m, r, generator=g) / math.sqrt(m)
        v = torch.randn(n, r, generator=g) / math.sqrt(n)
        low = (u * s) @ v.T
        low *= 0.05 * float(w.norm()) / float(low.norm())          # the fine-tune moves W by ~5%
        noise = torch.randn(m, n, generator=g)
        noise *= 0.25 * float(low.norm()) / float(noise.norm())    # noise floor: 25% of the delta
        tuned = w + low + noise
        return w.reshape(shape).bfloat16(), tuned.reshape(shape).bfloat16()
    if key.endswith(".bias"):
        b = torch.randn(shape, generator=g) * 0.02
        return b.bfloat16(), (b + torch.randn(shape, generator=g) * 0.001).bfloat16()
    w = 1.0 + 0.05 * torch.randn(shape, generator=g)
    return w.bfloat16(), w.bfloat16()


def _header(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def generate_pair(config: Path, name: str, seed: int = 0) -> tuple[Path, Path]:
    """Write (once) ``<name>-base`` and ``<name>-tuned`` safetensors, streaming tensor by tensor."""
    import torch

    CACHE.mkdir(parents=True, exist_ok=True)
    base_path = CACHE / f"{name}-{GEN_VERSION}-base.safetensors"
    tuned_path = CACHE / f"{name}-{GEN_VERSION}-tuned.safetensors"
    done = CACHE / f"{name}-{GEN_VERSION}.done"
    if done.exists() and base_path.exists() and tuned_path.exists():
        return base_path, tuned_path
    shapes, cfg = _denoiser_shapes(config)
    need = 2 * sum(2 * math.prod(s) for s in shapes.values())
    free = shutil.disk_usage(CACHE).free
    if free < need * 1.1:
        sys.exit(f"need {need / 1e9:.1f} GB free under {CACHE} for the synthetic pair, have {free / 1e9:.1f} GB")
    meta = {"lbm_config": json.dumps(cfg), "format": "pt", "synthetic": f"benchmarks/extract.py {GEN_VERSION}"}
    t0 = time.perf_counter()
    tmp_b, tmp_t = base_path.with_suffix(".tmp"), tuned_path.with_suffix(".tmp")
    with tmp_b.open("wb") as fb, tmp_t.open("wb") as ft:
        head = _header(shapes, meta)
        fb.write(head)
        ft.write(head)
        for i, (key, shape) in enumerate(shapes.items()):
            b, t = _tensor_pair(key, shape, seed)
            fb.write(memoryview(b.reshape(-1).view(torch.uint8).numpy()))
            ft.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if i % 200 == 0:
                print(f"  generating {name}: {i}/{len(shapes)} tensors, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
    os.replace(tmp_b, base_path)
    os.replace(tmp_t, tuned_path)
    done.write_text(f"{time.perf_counter() - t0:.1f} s\n")
    return base_path, tuned_path


# -- measured subprocesses --------------------------------------------------------------------
def run_measured(cmd: list[str], stdout_path: Path | None = None) -> dict:
    """Run ``cmd``; wall seconds and this child's own peak RSS (``os.wait4``), not its siblings'."""
    load = os.getloadavg()[0]
    out = stdout_path.open("wb") if stdout_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, cwd=ROOT)
    err_chunks = []
    while True:   # drain stderr (progress bars) so the child never blocks on a full pipe
        chunk = proc.stderr.read(65536)
        if not chunk:
            break
        err_chunks.append(chunk)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if stdout_path:
        out.close()
    if proc.returncode != 0:
        tail = b"".join(err_chunks).decode(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed ({proc.returncode}):\n{tail}")
    return {"wall_s": wall, "max_rss_mb": usage.ru_maxrss / 1024, "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime, "load_before": load, "load_after": os.getloadavg()[0]}


def run_ours(base: Path, tuned: Path, out: Path, extra: list[str], tmp: Path,
             home: Path | None = None) -> tuple[dict, dict]:
    """``lbm-reg extract`` in a subprocess. Without ``home``, an empty one: no registry, so both
    inputs are hashed, as on a first run."""
    home = home or Path(tempfile.mkdtemp(prefix="home-", dir=tmp))
    cmd = [sys.executable, "-m", "lbm_registry.cli.main", "--home", str(home), "extract", "--base", str(base),
           "--tuned", str(tuned), "--output", str(out), "--json", *extra]
    js = tmp / "ours.json"
    m = run_measured(cmd, js)
    return m, json.loads(js.read_text())


def original_worker(args: argparse.Namespace) -> None:
    """The original scripts' method, on a sample of layers (runs in its own subprocess)."""
    import torch

    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.threads import SMALL_LAYER_NUMEL, single_thread_below
    from lbm_registry.lora.extract import factorize
    from lbm_registry.lora.svd import SVDSettings

    def load_whole(path: str) -> dict:
        # Every tensor copied into memory, like loading a state dict into a model. (safetensors'
        # load_file would hand back lazy views of a memory map and hide the cost.) Kept in bf16,
        # which is kinder than the scripts' fp32 models.
        reader = CheckpointReader(path)
        return {k: reader.read(k) for k in reader.keys()}

    t0 = time.perf_counter()
    base = load_whole(args.base)         # both models whole in memory, as the original scripts do
    tuned = load_whole(args.tuned)
    load_s = time.perf_counter() - t0
    rows = []
    for module in args.layers.split(","):
        key = f"denoiser.{module}.weight"
        rank = args.conv_rank if base[key].ndim == 4 else args.rank
        t = time.perf_counter()
        mat = (tuned[key].float() - base[key].float()).reshape(base[key].shape[0], -1)
        u, s, vh = torch.linalg.svd(mat)     # full_matrices=True (the default), as in the scripts
        r = min(rank, len(s))
        up = u[:, :r] @ torch.diag(s[:r])
        down = vh[:r]
        full_s = time.perf_counter() - t
        del u, vh, up, down
        t = time.perf_counter()
        torch.linalg.svd(mat, full_matrices=False)
        thin_s = time.perf_counter() - t
        # Our per-layer math on the same matrix in the same process: the fair per-layer ratio,
        # whatever else the machine is doing at the time.
        t = time.perf_counter()
        with single_thread_below(mat.numel(), SMALL_LAYER_NUMEL):   # as lbm-reg extract runs it
            f = factorize(mat, tuple(base[key].shape), rank, settings=SVDSettings(),
                          generator=SVDSettings().generator(module))
        ours_s = time.perf_counter() - t
        s2 = s.double() ** 2
        exact_err = math.sqrt(float(s2[r:].sum() / s2.sum()))
        rows.append({"module": module, "shape": list(base[key].shape), "rank": r, "original_s": full_s,
                     "thin_svd_s": thin_s, "ours_inproc_s": ours_s, "ours_inproc_error": f.rel_error,
                     "exact_error": exact_err})
        print(f"  original: {module} {tuple(base[key].shape)} {full_s:.1f} s", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps({"load_s": load_s, "layers": rows}))


def pick_sample(layers: list[dict], n: int) -> list[dict]:
    """One layer per distinct shape, the shapes holding the most parameters first (n at most)."""
    by_shape: dict[tuple, list[dict]] = {}
    for r in layers:
        by_shape.setdefault(tuple(r["shape"]), []).append(r)
    order = sorted(by_shape, key=lambda s: -len(by_shape[s]) * math.prod(s))
    biggest = max(by_shape, key=math.prod)
    chosen = [biggest] + [s for s in order if s != biggest][: n - 1]
    return [by_shape[s][0] for s in chosen]


def extrapolate(all_layers: list[dict], measured: dict[tuple, float]) -> float:
    """Sum of per-layer times over all layers: measured per shape, else a fit of
    log t = a + b log(m * n * min(m, n)) over the measured shapes."""
    import numpy as np

    pts = [(math.log(s[0] * math.prod(s[1:]) * min(s[0], math.prod(s[1:]))), math.log(max(t, 1e-6)))
           for s, t in measured.items()]
    b, a = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1) if len(pts) > 1 else (1.0, pts[0][1])
    total = 0.0
    for r in all_layers:
        s = tuple(r["shape"])
        if s in measured:
            total += measured[s]
        else:
            m, n = s[0], math.prod(s[1:])
            total += math.exp(a + b * math.log(m * n * min(m, n)))
    return total


def warm_page_cache(*paths: Path) -> float:
    """Read the files once so the runs measure our work, not this machine's disk (~1 GB/s here:
    a cold 9.7 GB pair adds ~10 s to any first read, ours or the original scripts'). Seconds taken."""
    t0 = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t0


def _run_all_ours(args: argparse.Namespace, base: Path, tuned: Path, tmp: Path, results: dict) -> dict:
    results["page_cache_warmup_s"] = warm_page_cache(base, tuned)
    print("ours, rank 32/16 ...", file=sys.stderr, flush=True)
    ours_m, ours = run_ours(base, tuned, tmp / "ours.safetensors", [], tmp)
    results["ours"] = {**ours_m, "engine_s": ours["seconds"], "size_bytes": ours["size_bytes"],
                       "mean_error": ours["mean_error"], "max_error": ours["max_error"],
                       "layers": ours["layers_extracted"], "skipped": len(ours["skipped"]),
                       "timings": ours.get("timings", {}),
                       "layer_compute_s": sum(r["seconds"] for r in ours["layers"]),
                       "methods": _count(r["method"] for r in ours["layers"])}
    (tmp / "ours.safetensors").unlink()

    # Again with a registry workspace whose hash cache already knows both files (the usual
    # case: registered models, or files seen before).
    home = tmp / "registry"
    run_measured([sys.executable, "-m", "lbm_registry.cli.main", "--home", str(home), "init"])
    run_ours(base, tuned, tmp / "warm.safetensors", [], tmp, home)
    print("ours, rank 32/16, hashes cached ...", file=sys.stderr, flush=True)
    warm_m, warm = run_ours(base, tuned, tmp / "warm.safetensors", [], tmp, home)
    results["ours_cached_hashes"] = {**warm_m, "engine_s": warm["seconds"], "timings": warm.get("timings", {})}
    (tmp / "warm.safetensors").unlink()

    if not args.no_full_rank:
        need = 4 * sum(min(r["shape"][0], math.prod(r["shape"][1:])) *
                       (r["shape"][0] + math.prod(r["shape"][1:])) for r in ours["layers"])
        if shutil.disk_usage(tmp).free > 2.2 * need:
            print(f"ours, full rank fp32 ({need / 1e9:.1f} GB output) ...", file=sys.stderr, flush=True)
            fr_m, fr = run_ours(base, tuned, tmp / "full.safetensors",
                                ["--rank", "9999", "--conv-rank", "9999", "--dtype", "fp32"], tmp)
            results["full_rank"] = {**fr_m, "max_error": fr["max_error"], "size_bytes": fr["size_bytes"],
                                    "engine_s": fr["seconds"]}
            (tmp / "full.safetensors").unlink()
        else:
            results["full_rank"] = {"skipped": f"needs {2.2 * need / 1e9:.0f} GB free disk"}
    results["ours_layers"] = [{k: r[k] for k in ("module", "shape", "seconds", "rel_error", "method")}
                              for r in ours["layers"]]
    return ours


# -- main -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny twin instead of the full-size model")
    ap.add_argument("--sample", type=int, default=24, help="layers for the original method (one per shape)")
    ap.add_argument("--no-full-rank", action="store_true", help="skip the full-rank fp32 run")
    ap.add_argument("--no-original", action="store_true", help="skip the original method")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--reuse", type=Path, help="take the 'ours' runs from this earlier --json output")
    ap.add_argument("--aware", action="store_true",
                    help="activation-aware vs plain on a trained tiny fine-tune (benchmarks/extract_aware.py)")
    ap.add_argument("--aware-full", action="store_true", help="calibrated extraction's cost at full size")
    ap.add_argument("--_original", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--tuned", help=argparse.SUPPRESS)
    ap.add_argument("--layers", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=RANK, help=argparse.SUPPRESS)
    ap.add_argument("--conv-rank", type=int, default=CONV_RANK, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._original:
        original_worker(args)
        return
    if args.aware or args.aware_full:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import extract_aware

        if args.aware:
            print(extract_aware.markdown_tiny(extract_aware.run_tiny(args.json)))
        if args.aware_full:
            print(extract_aware.markdown_full(extract_aware.run_full(args.json)))
        return

    config = ROOT / "configs" / ("lbm-tiny.yaml" if args.quick else "lbm-relighting.yaml")
    name = "tiny" if args.quick else "lbm-relighting"
    print(f"synthetic pair ({name}) ...", file=sys.stderr, flush=True)
    base, tuned = generate_pair(config, name)
    pair_gb = (base.stat().st_size + tuned.stat().st_size) / 1e9
    results: dict = {"model": name, "pair_gb": pair_gb, "cpus": os.cpu_count()}

    with tempfile.TemporaryDirectory(prefix="lbm-bench-", dir=CACHE) as tmpdir:
        tmp = Path(tmpdir)
        if args.reuse:
            old = json.loads(args.reuse.read_text())
            results.update({k: old[k] for k in ("ours", "ours_cached_hashes", "full_rank", "ours_layers") if k in old})
            ours = {"layers": old["ours_layers"]}
        else:
            ours = _run_all_ours(args, base, tuned, tmp, results)
            if args.json:   # keep what we have: the original method takes a while
                args.json.write_text(json.dumps(results, indent=1))

        if not args.no_original:
            sample = pick_sample(ours["layers"], args.sample)
            out = tmp / "original.json"
            print(f"original method on {len(sample)} layers ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_original", "--base", str(base), "--tuned",
                   str(tuned), "--layers", ",".join(r["module"] for r in sample), "--out", str(out)]
            orig_m = run_measured(cmd)
            orig = json.loads(out.read_text())
            ours_by = {r["module"]: r for r in ours["layers"]}
            rows = []
            for o in orig["layers"]:
                mine = ours_by[o["module"]]
                rows.append({**o, "ours_s": mine["seconds"], "ours_error": mine["rel_error"],
                             "ours_method": mine["method"], "speedup": o["original_s"] / max(o["ours_inproc_s"], 1e-9),
                             "thin_speedup": o["thin_svd_s"] / max(o["ours_inproc_s"], 1e-9),
                             "error_ratio": mine["rel_error"] / o["exact_error"] if o["exact_error"] else 1.0})
            measured = {tuple(r["shape"]): r["original_s"] for r in rows}
            thin = {tuple(r["shape"]): r["thin_svd_s"] for r in rows}
            results["original"] = {**orig_m, "load_s": orig["load_s"], "sample": rows,
                                   "svd_total_s_extrapolated": extrapolate(ours["layers"], measured),
                                   "thin_total_s_extrapolated": extrapolate(ours["layers"], thin)}
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def markdown(r: dict) -> str:
    o = r["ours"]
    lines = [f"### LoRA extraction: {r['model']} ({r['pair_gb']:.1f} GB bf16 pair, {r['cpus']} CPUs)", "",
             "| | ours | original method | |", "|---|---|---|---|"]
    orig = r.get("original")
    if orig:
        total = orig["load_s"] + orig["svd_total_s_extrapolated"]
        lines.append(f"| rank 32/16, all 792 layers, end to end | **{o['wall_s']:.1f} s** (extraction {o['engine_s']:.1f} s; "
                     f"load avg {o['load_before']:.1f}) | {total:,.0f} s extrapolated (load {orig['load_s']:.0f} s "
                     f"+ SVDs; {len(orig['sample'])} layers measured) | **{total / o['wall_s']:.0f}x** |")
        w = r.get("ours_cached_hashes")
        if w:
            lines.append(f"| same, input hashes already known (registry) | **{w['wall_s']:.1f} s** (extraction "
                         f"{w['engine_s']:.1f} s; load avg {w['load_before']:.1f}) | | |")
        lines.append(f"| peak RSS | **{o['max_rss_mb'] / 1024:.2f} GB** | {orig['max_rss_mb'] / 1024:.1f} GB "
                     f"(both models in memory) | {orig['max_rss_mb'] / o['max_rss_mb']:.0f}x |")
        sp = sorted(x["speedup"] for x in orig["sample"])
        tsp = sorted(x["thin_speedup"] for x in orig["sample"])
        lines.append(f"| per layer (same process, back to back): speed-up vs full SVD | median "
                     f"{sp[len(sp) // 2]:.0f}x, min {sp[0]:.0f}x | | |")
        lines.append(f"| per layer: speed-up vs exact thin SVD | median {tsp[len(tsp) // 2]:.0f}x, min {tsp[0]:.1f}x "
                     f"| (thin SVD, all layers: {orig['thin_total_s_extrapolated']:.0f} s extrapolated) | |")
        er = [x["error_ratio"] for x in orig["sample"]]
        lines.append(f"| rel. error / exact truncation error (sampled) | max {max(er):.4f}, mean "
                     f"{sum(er) / len(er):.4f} (bf16 factors) | 1 (by definition) | |")
    else:
        lines.append(f"| rank 32/16, all 792 layers, end to end | {o['wall_s']:.1f} s | | |")
        lines.append(f"| peak RSS | {o['max_rss_mb'] / 1024:.2f} GB | | |")
    lines.append(f"| mean / max rel. error, rank 32/16 | {o['mean_error']:.4f} / {o['max_error']:.4f} | | |")
    lines.append(f"| LoRA size (bf16) | {o['size_bytes'] / 1e6:.0f} MB | | |")
    fr = r.get("full_rank")
    if fr and "skipped" not in fr:
        lines.append(f"| full rank, fp32: max rel. error | **{fr['max_error']:.1e}** ({fr['wall_s']:.0f} s, "
                     f"{fr['max_rss_mb'] / 1024:.2f} GB RSS, {fr['size_bytes'] / 1e9:.1f} GB file) | | |")
    elif fr:
        lines.append(f"| full rank, fp32 | skipped: {fr['skipped']} | | |")
    if orig:
        lines += ["", "| sampled layer | shape | original (full SVD) | thin SVD | ours, same process | ours, in "
                  "the 792-layer run | speed-up | exact err | ours err |", "|---|---|---|---|---|---|---|---|---|"]
        for x in orig["sample"]:
            lines.append(f"| {x['module']} | {'x'.join(map(str, x['shape']))} | {x['original_s']:.2f} s | "
                         f"{x['thin_svd_s']:.2f} s | {x['ours_inproc_s'] * 1000:.0f} ms | {x['ours_s'] * 1000:.0f} ms "
                         f"({x['ours_method']}) | {x['speedup']:.0f}x | {x['exact_error']:.4f} | {x['ours_error']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
