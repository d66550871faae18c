"""Activation-aware extraction (``extract --calibrate``) against plain SVD, side by side.

    .venv/bin/python benchmarks/extract.py --aware        # tiny twin, a genuinely trained fine-tune
    .venv/bin/python benchmarks/extract.py --aware-full   # full size, synthetic weights: time and memory

``--aware`` (the function, at equal bytes):
1. Builds (once, cached under ``benchmarks/.cache/tiny-aware-<v>/``) the tiny twin's seeded base and
   a full fine-tune of ALL its denoiser weights on synthetic relighting pairs
   (:func:`lbm_registry.api.train.finetune_full`, AdamW, bridge-matching loss): a real training
   delta, not a synthetic low-rank one. Three disjoint synthetic sets: training (seed 0),
   calibration (seed 1), held-out (seed 2).
2. For ranks 4/2, 8/4 and 16/8: a plain extraction and a calibrated one (same ranks, so the same
   file size), both bf16; each validated on the HELD-OUT images (``heldout_check``: tuned, base
   and base + LoRA translate each image as inference does; functional error on the denoiser
   outputs, PSNR of the decoded outputs against the tuned model's).
3. At 8/4 also: calibration on the base model instead of the tuned one, the damping swept,
   diagonal statistics only, the calibrated LoRA measured on its own calibration images (the
   gap to held-out is what a benchmark on calibration data would overstate), and ``--budget`` at
   the plain file's size.

``--aware-full`` (cost, full-size LBM, synthetic pair of benchmarks/extract.py, the tuned file with a
seeded VAE added once, cached as ``lbm-relighting-<v>-tuned-vae.safetensors``), each in its own
subprocess: plain ``extract --rank 32 --conv-rank 16``; ``--calibrate`` on a few small images
(forward passes included; statistics written with ``--stats-output``); and the same
extraction again reusing those statistics (``--calibration-stats FILE``: the extraction alone).
Wall time and peak RSS per run, load average before each.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
AWARE_VERSION = "v1"
RESOLUTION = 64            # training, calibration and held-out images (the tiny twin trains fast at 64 px)
FINETUNE_STEPS = 200
FINETUNE_LR = 2e-4
CALIBRATION_IMAGES = 32
HELDOUT_IMAGES = 16
RANKS = ((4, 2), (8, 4), (16, 8))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


def tiny_setup() -> dict[str, Path]:
    """The cached tiny base, its trained fine-tune and the three synthetic image sets."""
    from lbm_registry.api.train import finetune_full, synth_data
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.loading import save_lbm
    from lbm_registry.lbm.model import build_model

    folder = CACHE / f"tiny-aware-{AWARE_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config(ROOT / "configs" / "lbm-tiny.yaml")
    base = folder / "base.safetensors"
    if not base.exists():
        save_lbm(build_model(cfg, seed=0), base)
    sets = {}
    for name, seed, n in (("train", 0, 64), ("calibration", 1, CALIBRATION_IMAGES), ("heldout", 2, HELDOUT_IMAGES)):
        d = folder / name
        if not (d / ".done").exists():
            synth_data(d, n, resolution=128, seed=seed, prefix=name)
            (d / ".done").write_text("ok\n")
        sets[name] = d
    tuned = folder / f"tuned-{FINETUNE_STEPS}.safetensors"
    if not tuned.exists():
        _log(f"full fine-tune of the tiny twin, {FINETUNE_STEPS} steps")
        t0 = time.perf_counter()
        finetune_full(base, cfg, [str(p) for p in sorted(sets["train"].glob("*.tar"))], steps=FINETUNE_STEPS,
                      lr=FINETUNE_LR, output=tuned, resolution=RESOLUTION, batch_size=4, device="cpu", seed=0)
        (folder / f"tuned-{FINETUNE_STEPS}.seconds").write_text(f"{time.perf_counter() - t0:.0f}\n")
    return {"base": base, "tuned": tuned, **sets}


def _heldout(setup: dict[str, Path], lora_path: Path, which: str = "heldout") -> dict:
    from lbm_registry.api.assets.calibration import image_tensor, list_inputs, take
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lora.format import read_lora
    from lbm_registry.lora.validate import heldout_check

    cfg = load_config(ROOT / "configs" / "lbm-tiny.yaml")
    n = HELDOUT_IMAGES if which == "heldout" else CALIBRATION_IMAGES
    chosen, _ = take(list_inputs([str(setup[which])]), n)
    xs = [image_tensor(data, item.label, cfg, RESOLUTION) for item, data in chosen]
    hc = heldout_check(setup["base"], setup["tuned"], read_lora(lora_path), cfg, xs)
    return {"functional_error": hc.functional_error, "base_error": hc.base_error, "recovered": hc.recovered,
            "psnr": hc.psnr, "base_psnr": hc.base_psnr, "images": hc.images}


def full_size_diag_groups() -> set[str]:
    """Module names whose statistic the default 3 GB rule makes diagonal at FULL LBM size."""
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import build_model, weight_layers
    from lbm_registry.lora.calibrate import DEFAULT_MEMORY, StatsCollector, input_dim, plan_modes, probe_input

    tiny = build_model(load_config(ROOT / "configs" / "lbm-tiny.yaml"), seed=0)
    col = StatsCollector(tiny.denoiser, weight_layers(tiny.denoiser))
    with col:
        x, s = probe_input(tiny)
        col.discover(lambda: tiny.velocity(x, s))
    full = weight_layers(build_model(load_config(ROOT / "configs" / "lbm-relighting.yaml"), meta=True).denoiser)
    modes = plan_modes({g: input_dim(full[g]) for g in col.members}, DEFAULT_MEMORY)
    return {m for g, mode in modes.items() if mode == "diag" for m in col.members[g]}


def restrict_stats(src: Path, dest: Path, to_diag) -> Path:
    """A copy of a statistics file whose groups ``to_diag(member names)`` keep only their diagonal."""
    import torch

    from lbm_registry.lora.calibrate import CalibrationStats, GroupStats, StatsFile

    stats = StatsFile(src).load()
    groups = {}
    for g, gs in stats.groups.items():
        if gs.mode == "full" and to_diag(gs.members):
            gs = GroupStats(gs.members, "diag", gs.n, torch.diagonal(gs.moment).clone())
        groups[g] = gs
    return CalibrationStats(groups, stats.info).save(dest)


def run_tiny(json_out: Path | None) -> dict:
    import torch

    from lbm_registry.api.assets.lora import extract
    from lbm_registry.settings import WorkspaceSettings

    # One thread: the tiny twin's ops are small, and on a shared machine two OpenMP threads spin
    # against each other (see lbm_registry/lbm/threads.py): 10x the CPU time for the same work.
    torch.set_num_threads(1)
    setup = tiny_setup()
    results: dict = {"model": "lbm-tiny", "finetune_steps": FINETUNE_STEPS, "lr": FINETUNE_LR,
                     "resolution": RESOLUTION, "calibration_images": CALIBRATION_IMAGES,
                     "heldout_images": HELDOUT_IMAGES, "rows": [], "extras": []}
    with tempfile.TemporaryDirectory(prefix="lbm-aware-", dir=CACHE) as tmpdir:
        tmp = Path(tmpdir)
        settings = WorkspaceSettings.resolve(home=tmp / "home")
        stats = tmp / "stats.safetensors"

        def run(name: str, **opts) -> dict:
            out = tmp / f"{name}.safetensors"
            t0 = time.perf_counter()
            rep = extract(str(setup["base"]), str(setup["tuned"]), output=out, settings=settings, **opts)
            secs = time.perf_counter() - t0
            row = {"name": name, "size_bytes": rep.result.size_bytes, "seconds": secs,
                   "weight_error": rep.result.mean_error, "timings": rep.timings}
            if rep.calibration:
                row.update(calib_out_error=rep.calibration["mean_out_error"],
                           calib_plain_out_error=rep.calibration["mean_plain_out_error"],
                           outcome=rep.calibration["outcome"], modes=rep.calibration["modes"])
            row["heldout"] = _heldout(setup, out)
            _log(f"{name}: held-out functional error {row['heldout']['functional_error']:.4f}, "
                 f"PSNR {row['heldout']['psnr']:.2f} dB, {row['size_bytes']} bytes")
            row["path"] = out
            return row

        first = True
        for r, c in RANKS:
            plain = run(f"plain-{r}-{c}", rank=r, conv_rank=c)
            if first:
                cal = run(f"calibrated-{r}-{c}", rank=r, conv_rank=c, calibrate=[str(setup["calibration"])],
                          calibration_samples=CALIBRATION_IMAGES, calibration_resolution=RESOLUTION,
                          stats_output=stats)
                first = False
            else:
                cal = run(f"calibrated-{r}-{c}", rank=r, conv_rank=c, calibration_stats=str(stats))
            results["rows"].append({"ranks": f"{r}/{c}", "plain": _clean(plain), "calibrated": _clean(cal),
                                    "gain": 1 - cal["heldout"]["functional_error"] / plain["heldout"]["functional_error"]})
            if r == 8:
                plain84, cal84 = plain, cal
            if json_out:
                json_out.write_text(json.dumps(results, indent=1, default=str))

        # extras at 8/4
        extras = results["extras"]
        own = _heldout(setup, cal84["path"], "calibration")
        extras.append({"what": "calibrated 8/4 measured on its own calibration images", **own})
        base_stats = tmp / "base-stats.safetensors"
        row = run("calibrated-base-model-8-4", rank=8, conv_rank=4, calibrate=[str(setup["calibration"])],
                  calibration_samples=CALIBRATION_IMAGES, calibration_resolution=RESOLUTION,
                  stats_output=base_stats, calibration_model="base")
        extras.append({"what": "calibration run on the BASE model, 8/4", **_clean(row)})
        for damping in (0.001, 0.1, 1.0):
            row = run(f"calibrated-damping-{damping}", rank=8, conv_rank=4, calibration_stats=str(stats),
                      damping=damping)
            extras.append({"what": f"damping {damping:g} (default 0.01), 8/4", **_clean(row)})
        diag_full = full_size_diag_groups()
        variants = (
            ("diagonal statistics everywhere", lambda ms: True),
            ("diagonal for the layers the full-size 3 GB rule makes diagonal (ff.net.2, 3x3 convs of 640+ "
             "input channels)", lambda ms: any(m in diag_full for m in ms)),
            ("diagonal for every conv, full for the linear layers", lambda ms: any("conv" in m for m in ms)),
            ("diagonal for every linear layer, full for the convs", lambda ms: not any("conv" in m for m in ms)),
        )
        for i, (what, pred) in enumerate(variants):
            path = restrict_stats(stats, tmp / f"variant{i}.safetensors", pred)
            row = run(f"calibrated-variant{i}", rank=8, conv_rank=4, calibration_stats=str(path))
            extras.append({"what": f"{what}, 8/4", **_clean(row)})
        budget = plain84["size_bytes"]
        for name, opts in (("plain-budget", {}), ("calibrated-budget", {"calibration_stats": str(stats)})):
            row = run(name, budget=budget, **opts)
            extras.append({"what": f"{name} at {budget} bytes", **_clean(row)})
        results["plain_8_4"] = _clean(plain84)
    if json_out:
        json_out.write_text(json.dumps(results, indent=1, default=str))
    return results


def _clean(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "path"}


def markdown_tiny(r: dict) -> str:
    lines = [f"### Activation-aware extraction: tiny twin, full fine-tune ({r['finetune_steps']} AdamW steps, "
             f"lr {r['lr']:g}), {r['heldout_images']} held-out images at {r['resolution']} px, "
             f"{r['calibration_images']} calibration images", "",
             "| ranks | file (both) | held-out functional error, plain | calibrated | gain | PSNR vs tuned, plain "
             "| calibrated | base alone | per-layer output error on calibration stats, plain -> calibrated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        p, c = row["plain"], row["calibrated"]
        same = "same" if p["size_bytes"] == c["size_bytes"] else f"{p['size_bytes']} vs {c['size_bytes']}"
        lines.append(f"| {row['ranks']} | {p['size_bytes'] / 1e6:.2f} MB ({same}) | {p['heldout']['functional_error']:.4f} "
                     f"| **{c['heldout']['functional_error']:.4f}** | **{row['gain']:.1%}** | {p['heldout']['psnr']:.2f} dB "
                     f"| **{c['heldout']['psnr']:.2f} dB** | {p['heldout']['base_psnr']:.2f} dB "
                     f"| {c['calib_plain_out_error']:.3f} -> {c['calib_out_error']:.3f} |")
    base_err = r["rows"][0]["plain"]["heldout"]["base_error"]
    lines += ["", f"Base alone vs tuned on the held-out images: functional error {base_err:.4f}.", "",
              "| variant (8/4) | held-out functional error | PSNR | file |", "|---|---|---|---|"]
    p = r.get("plain_8_4")
    if p:
        lines.append(f"| plain SVD | {p['heldout']['functional_error']:.4f} | {p['heldout']['psnr']:.2f} dB "
                     f"| {p['size_bytes']} B |")
    for e in r["extras"]:
        h = e.get("heldout", e)
        size = f"{e['size_bytes']} B" if "size_bytes" in e else ""
        lines.append(f"| {e['what']} | {h['functional_error']:.4f} | {h['psnr']:.2f} dB | {size} |")
    return "\n".join(lines)


# -- full size --------------------------------------------------------------------------------
def tuned_with_vae(tuned: Path, config: Path) -> Path:
    """(Once, cached) the synthetic tuned checkpoint plus a seeded VAE: ``--calibrate`` runs the
    whole model (VAE encode, then the sampler), so it refuses benchmarks/extract.py's pair, which
    holds the denoiser alone. The denoiser bytes are copied unchanged; the VAE's values only set
    what the forward passes compute, not what they cost."""
    import struct

    import torch
    from extract import GEN_VERSION, _tensor_pair  # noqa: E402  (benchmarks/extract.py)

    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import expected_shapes

    dest = CACHE / f"lbm-relighting-{GEN_VERSION}-tuned-vae.safetensors"
    if dest.exists():
        return dest
    vae = {k: v for k, v in sorted(expected_shapes(load_config(config)).items()) if k.startswith("vae.")}
    with tuned.open("rb") as src:
        n = struct.unpack("<Q", src.read(8))[0]
        header = json.loads(src.read(n))
        offset = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        for key, shape in vae.items():
            nbytes = 2 * int(torch.Size(shape).numel())
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = dest.with_suffix(".tmp")
        with tmp.open("wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            while chunk := src.read(64 << 20):
                out.write(chunk)
            for key, shape in vae.items():
                out.write(memoryview(_tensor_pair(key, tuple(shape), 0)[0].reshape(-1).view(torch.uint8).numpy()))
    os.replace(tmp, dest)
    return dest


def run_full(json_out: Path | None, images: int = 2, resolution: int = 256) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from extract import generate_pair, run_ours, warm_page_cache  # noqa: E402  (benchmarks/extract.py)

    from lbm_registry.api.train import synth_data

    base, tuned = generate_pair(ROOT / "configs" / "lbm-relighting.yaml", "lbm-relighting")
    # all three runs on the same pair (the tuned file with a VAE), so they hash the same bytes
    tuned = tuned_with_vae(tuned, ROOT / "configs" / "lbm-relighting.yaml")
    results: dict = {"model": "lbm-relighting", "images": images, "resolution": resolution, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="lbm-aware-full-", dir=CACHE) as tmpdir:
        tmp = Path(tmpdir)
        data = synth_data(tmp / "calib", images, resolution=resolution, seed=1)
        stats = tmp / "stats.safetensors"
        results["page_cache_warmup_s"] = warm_page_cache(base, tuned)   # the disk is not what is measured
        _log("plain rank 32/16")
        m, out = run_ours(base, tuned, tmp / "plain.safetensors", [], tmp)
        results["plain"] = {**m, "extract_s": out["seconds"], "size_bytes": out["size_bytes"]}
        (tmp / "plain.safetensors").unlink()
        _log("calibrated rank 32/16 (forward passes included)")
        m, out = run_ours(base, tuned, tmp / "cal.safetensors",
                          ["--calibrate", data["shards"][0], "--calibration-samples", str(images),
                           "--calibration-resolution", str(resolution), "--stats-output", str(stats)], tmp)
        results["calibrated"] = {**m, "extract_s": out["seconds"], "timings": out.get("timings", {}),
                                 "calibration": {k: v for k, v in (out.get("calibration") or {}).items()
                                                 if k != "images"}, "size_bytes": out["size_bytes"],
                                 "stats_bytes": stats.stat().st_size}
        (tmp / "cal.safetensors").unlink()
        _log("calibrated rank 32/16, statistics reused (extraction alone)")
        m, out = run_ours(base, tuned, tmp / "reuse.safetensors", ["--calibration-stats", str(stats)], tmp)
        results["reused"] = {**m, "extract_s": out["seconds"], "timings": out.get("timings", {}),
                             "outcome": (out.get("calibration") or {}).get("outcome")}
        if json_out:
            json_out.write_text(json.dumps(results, indent=1, default=str))
    return results


def markdown_full(r: dict) -> str:
    p, c, u = r["plain"], r["calibrated"], r["reused"]
    cal_s = c["timings"].get("calibrate_s", 0.0)
    lines = [f"### Calibrated extraction at full size (synthetic pair, rank 32/16, {r['images']} calibration images "
             f"at {r['resolution']} px, {r['cpus']} CPUs)", "",
             "| run | wall | of which calibration (model load + forward passes) | extraction | peak RSS | load avg before |",
             "|---|---|---|---|---|---|",
             f"| plain | {p['wall_s']:.1f} s | — | {p['extract_s']:.1f} s | {p['max_rss_mb'] / 1024:.2f} GB "
             f"| {p['load_before']:.1f} |",
             f"| --calibrate | {c['wall_s']:.1f} s | {cal_s:.1f} s | {c['extract_s']:.1f} s "
             f"| {c['max_rss_mb'] / 1024:.2f} GB | {c['load_before']:.1f} |",
             f"| --calibration-stats (reused) | {u['wall_s']:.1f} s | — | {u['extract_s']:.1f} s "
             f"| {u['max_rss_mb'] / 1024:.2f} GB | {u['load_before']:.1f} |",
             "",
             f"Calibrated extraction / plain: {(c['wall_s'] - cal_s) / p['wall_s']:.2f}x wall without the calibration "
             f"step, {u['wall_s'] / p['wall_s']:.2f}x with reused statistics; extraction peak RSS "
             f"{u['max_rss_mb'] / p['max_rss_mb']:.2f}x plain. Statistics file {c['stats_bytes'] / 1e9:.2f} GB "
             f"({c['calibration'].get('modes')}).",
             f"Per layer: {u.get('outcome')}"]
    return "\n".join(lines)
