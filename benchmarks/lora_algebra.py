"""Benchmark: LoRA algebra and import at full LBM size, side by side in one run.

    .venv/bin/python benchmarks/lora_algebra.py           # full size (~1.5 GB temp files, a few minutes)
    .venv/bin/python benchmarks/lora_algebra.py --quick   # tiny twin, a sanity run

1. Writes a synthetic rank-64 bf16 LoRA with the real denoiser shapes (configs/lbm-relighting.yaml,
   all 792 layers; rank capped by each layer's smaller side), random factors.
2. Times, on the same file:
   - read + write: every tensor read (``read_lora``, materialised) and written again (``write_lora``);
   - resize to rank 32 from the factors alone (``resize_lora``: QR + r x r SVD, errors included);
   - the dense route on a sample of layers (one per distinct shape): ``up @ down`` then
     ``torch.linalg.svd(full_matrices=False)`` and truncation, against the factor route on the
     same layers; the ratio is per sample, and the full dense run is extrapolated per shape.
3. Import of a full-size kohya file (``export --format kohya`` of the same LoRA), by phase:
   read + architecture check, sha256 of the source (what the duplicate check and the record
   need), conversion to our file, sha256 of the result (what registration hashes), so the
   share of hashing is visible. MLflow mirroring is not included (see benchmarks/cli_latency.py).

Timings depend on what else runs on the machine: the 1-minute load average is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shapes_of(config: str) -> dict[str, tuple[int, ...]]:
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.unet_shapes import denoiser_shapes

    table = denoiser_shapes(load_config(config).denoiser)
    assert table is not None
    return {k[: -len(".weight")]: tuple(v) for k, v in table.items() if k.endswith(".weight") and len(v) >= 2}


def synth_lora(shapes: dict[str, tuple[int, ...]], rank: int, dest: Path) -> Path:
    import torch

    from lbm_registry.lora.format import LoRALayer, LoRAWriter

    g = torch.Generator().manual_seed(0)
    with LoRAWriter(dest, torch.bfloat16) as w:
        for m, s in shapes.items():
            n = math.prod(s[1:])
            r = min(rank, s[0], n)
            down = (torch.randn(r, n, generator=g) / math.sqrt(n)).reshape(r, *s[1:])
            up = torch.randn(s[0], r, generator=g) * 0.01
            if len(s) == 4:
                up = up.reshape(s[0], r, 1, 1)
            w.add(LoRALayer(m, down, up, float(r)))
        return w.finish({"base_sha256": "00" * 32, "base_config": "lbm-relighting"})


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny twin instead of full size")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dense-shapes", type=int, default=0,
                    help="dense route on this many distinct shapes (largest, then spread out); 0 = all")
    args = ap.parse_args()
    import torch

    from lbm_registry.api.assets.lora_import import write_native
    from lbm_registry.lora.algebra import Term, factored_svd, resize_lora
    from lbm_registry.lora.convert import check_against_base, read_foreign
    from lbm_registry.lora.export import write_kohya
    from lbm_registry.lora.format import read_lora, write_lora
    from lbm_registry.lora.ranks import RankPolicy
    from lbm_registry.registry.blobs import sha256_file

    config = "configs/lbm-tiny.yaml" if args.quick else "configs/lbm-relighting.yaml"
    shapes = shapes_of(str(ROOT / config))
    tmp = Path(tempfile.mkdtemp(prefix="lbm-bench-algebra-", dir=os.environ.get("LBM_BENCH_TMP")))
    res: dict[str, object] = {"config": config, "layers": len(shapes), "load_1min": os.getloadavg()[0],
                              "threads": torch.get_num_threads()}
    try:
        src, t_synth = timed(synth_lora, shapes, 64, tmp / "r64.safetensors")
        res["file_mb"] = src.stat().st_size / 1e6
        res["synth_s"] = t_synth

        def read_write() -> None:
            lora = read_lora(src)
            for la in lora.layers.values():   # materialise (read_lora maps the file lazily)
                la.down = la.down.clone()
                la.up = la.up.clone()
            write_lora(lora, tmp / "copy.safetensors", dtype=torch.bfloat16)

        print(f"synthetic rank-64 file: {res['file_mb']:.0f} MB in {t_synth:.1f} s", flush=True)
        _, res["read_write_s"] = timed(read_write)
        print(f"read + write: {res['read_write_s']:.2f} s", flush=True)
        lora = read_lora(src)
        out, res["resize_s"] = timed(resize_lora, lora, tmp / "r32.safetensors",
                                     policy=RankPolicy.from_options(rank=32, conv_rank=32), dtype="bf16")
        res["resize_mean_error"] = out.mean_error
        res["resize_vs_read_write"] = res["resize_s"] / res["read_write_s"]
        print(f"resize 64 -> 32: {res['resize_s']:.2f} s", flush=True)

        # dense route vs factor route on one layer per distinct shape
        by_shape: dict[tuple[int, ...], str] = {}
        for m, s in shapes.items():
            by_shape.setdefault(s, m)
        count = {s: sum(1 for v in shapes.values() if v == s) for s in by_shape}
        dense_t = factor_t = dense_full_est = 0.0
        ordered = sorted(by_shape.items(), key=lambda kv: -math.prod(kv[0]))
        if args.dense_shapes and args.dense_shapes < len(ordered):
            step = len(ordered) / args.dense_shapes
            ordered = [ordered[int(i * step)] for i in range(args.dense_shapes)]
        by_shape = dict(ordered)
        for s, m in ordered:
            up, down = Term(lora.layers[m]).matrices()
            t = time.perf_counter()
            u, sv, vh = factored_svd(up, down)
            _ = (u[:, :32] * sv[:32].sqrt(), sv[:32].sqrt()[:, None] * vh[:32])
            ft = time.perf_counter() - t
            t = time.perf_counter()
            dense = up @ down
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            _ = (U[:, :32] * S[:32].sqrt(), S[:32].sqrt()[:, None] * Vh[:32])
            dt = time.perf_counter() - t
            factor_t += ft
            dense_t += dt
            dense_full_est += dt * count[s]
            print(f"  shape {s}: factor {ft * 1e3:.1f} ms, dense {dt * 1e3:.0f} ms", flush=True)
        res["sample_layers"] = len(by_shape)
        res["sample_factor_s"] = factor_t
        res["sample_dense_s"] = dense_t
        res["dense_over_factor"] = dense_t / factor_t
        res["dense_all_layers_est_s"] = dense_full_est
        res["dense_est_note"] = "sampled shapes only" if args.dense_shapes else "all shapes"

        # import of a kohya file, by phase
        kohya = tmp / "kohya.safetensors"
        write_kohya(lora, kohya)
        res["kohya_mb"] = kohya.stat().st_size / 1e6
        t0 = time.perf_counter()
        foreign = read_foreign(kohya, shapes)
        check_against_base(foreign, shapes)
        res["import_read_check_s"] = time.perf_counter() - t0
        _, res["import_hash_source_s"] = timed(sha256_file, kohya)
        policy = RankPolicy.from_options()
        _, res["import_convert_write_s"] = timed(write_native, foreign, shapes, None, tmp / "native.safetensors",
                                                 policy, {"base_sha256": "00" * 32})
        _, res["import_hash_result_s"] = timed(sha256_file, tmp / "native.safetensors")
        total = sum(float(res[k]) for k in ("import_read_check_s", "import_hash_source_s", "import_convert_write_s",
                                            "import_hash_result_s"))
        res["import_total_s"] = total
        res["import_hash_share"] = (float(res["import_hash_source_s"]) + float(res["import_hash_result_s"])) / total
        # the writer also hashes the tensor bytes as it writes them (ModelSpec hash_sha256): about
        # one more pass over the result's bytes, estimated by the result's own hash time
        res["import_hash_share_with_writer"] = (float(res["import_hash_source_s"])
                                                + 2 * float(res["import_hash_result_s"])) / total
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(f"## LoRA algebra benchmark ({config}, {res['layers']} layers, rank 64 bf16 {res['file_mb']:.0f} MB; "
          f"load {res['load_1min']:.1f}, {res['threads']} threads)")
    print("| step | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| read + write the rank-64 file | {res['read_write_s']:.2f} | 1.00 |")
    print(f"| resize 64 -> 32 (factors: r x r Grams + core SVD) | {res['resize_s']:.2f} | {res['resize_vs_read_write']:.2f} "
          "x read+write |")
    print(f"| {res['sample_layers']} sample layers (one per shape), factor route | {res['sample_factor_s']:.3f} | 1 |")
    print(f"| same layers, dense route (up @ down + thin SVD) | {res['sample_dense_s']:.2f} | "
          f"{res['dense_over_factor']:.0f} x slower |")
    print(f"| dense route, all layers (extrapolated per shape) | {res['dense_all_layers_est_s']:.0f} | |")
    print(f"| import kohya ({res['kohya_mb']:.0f} MB): read + check | {res['import_read_check_s']:.2f} | |")
    print(f"| import: sha256 of the source | {res['import_hash_source_s']:.2f} | |")
    print(f"| import: convert + write native | {res['import_convert_write_s']:.2f} | |")
    print(f"| import: sha256 of the result (registration) | {res['import_hash_result_s']:.2f} | |")
    print(f"| import total (hashing {res['import_hash_share']:.0%}; with the writer's tensor-bytes hash "
          f"~{res['import_hash_share_with_writer']:.0%}) | {res['import_total_s']:.2f} | |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
