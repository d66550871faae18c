"""Training benchmark: the memory and speed levers of ``lbm-reg train``, side by side in one run.

    .venv/bin/python benchmarks/train.py                 # everything (full size needs ~13 GB of RAM)
    .venv/bin/python benchmarks/train.py --tiny-only     # cached latents and 1 vs 2 processes only
    .venv/bin/python benchmarks/train.py --full-only --full-steps 2

1. **Full-size denoiser** (2.43 B parameters, synthetic weights: the shape is what costs), CPU,
   fp32, 256 px (32 x 32 latents), batch 1, a rank-32 / conv-rank-16 LoRA on all 792 layers:
   seconds per optimizer step and peak RSS with and without the UNet's gradient checkpointing.
   Each variant runs in its own process; the activation memory is the peak RSS during the
   steps minus the RSS just before the first one (weights, LoRA, its gradients and AdamW state
   are all allocated by then: one warm-up step runs first; glibc is told to return freed memory,
   so RSS follows live memory).
2. **Cached vs uncached latents** on the tiny twin (the real trainer; 16 pairs at 64 px, batch 4):
   seconds per step once the cache is warm (epochs after the first).
3. **1 vs 2 processes** on the tiny twin (the real ``--num-processes`` path, gloo): the same
   global batch (1 x 8 vs 2 x 4), wall time of a short and a longer run, and the per-step time
   from their difference (so start-up is not counted as training).

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# -- 1. full size -------------------------------------------------------------------------------
def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakRSS:
    """Samples RSS every 5 ms in a thread (ru_maxrss would include the model build's peak)."""

    def __init__(self) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _trim() -> None:
    """Hand freed heap back to the OS so RSS measures live memory (glibc keeps it otherwise)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def full_size_worker(checkpointing: bool, steps: int, resolution: int) -> dict:
    """One variant, in this (fresh) process. Synthetic weights: deterministic small normals."""
    import torch

    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import build_model
    from lbm_registry.train.inject import inject_lora, new_lora_file

    torch.manual_seed(0)
    lbm = load_config(ROOT / "configs" / "lbm-relighting.yaml")
    with torch.device("meta"):
        from lbm_registry.lbm.model import build_denoiser

        denoiser = build_denoiser(lbm)
    denoiser = denoiser.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.normal_(0.0, 0.02, generator=g)
        for b in denoiser.buffers():
            b.zero_()
    denoiser.requires_grad_(False)
    meta = build_model(lbm, meta=True).denoiser
    lora = new_lora_file(meta, rank=32, conv_rank=16, targets=["*"], seed=0)
    for layer in lora.layers.values():  # a trained-looking LoRA (up = 0 would make grads trivial)
        layer.up.normal_(0.0, 1e-3, generator=g)
    injection = inject_lora(denoiser, lora)
    injection.set_trainable(["*"])
    params = list(injection.trainable_parameters())
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    side = resolution // 8
    x = torch.randn(1, 4, side, side, generator=g)
    v = torch.randn(1, 4, side, side, generator=g)
    t = torch.tensor([500.0])

    def step() -> None:
        out = denoiser(x, t, encoder_hidden_states=None).sample
        loss = torch.nn.functional.mse_loss(out.float(), v)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not activations

    step()  # warm-up: allocates gradients and AdamW state
    _trim()
    before = _rss()
    times = []
    with _PeakRSS() as peak:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {"checkpointing": checkpointing, "s_per_step": sorted(times)[len(times) // 2],
            "rss_before_gb": before / 1e9, "peak_gb": peak.peak / 1e9, "activations_gb": (peak.peak - before) / 1e9,
            "lora_params": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


def full_size(steps: int, resolution: int) -> list[str]:
    rows = []
    for checkpointing in (False, True):
        out = subprocess.run([sys.executable, __file__, "--_full-worker", str(int(checkpointing)),
                              "--full-steps", str(steps), "--resolution", str(resolution)],
                             capture_output=True, text=True,
                             # a fixed mmap threshold: freed activations go back to the OS at once,
                             # so RSS follows live memory rather than glibc's high-water mark
                             env={**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"})
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    off, on = rows
    lines = [f"**Full-size denoiser, CPU fp32, {resolution} px, batch 1, rank 32/16 LoRA on all 792 layers "
             f"({off['lora_params'] / 1e6:.0f} M trainable), median of {steps} steps after a warm-up**", "",
             "| | s / step | peak RSS | RSS before the step | activation memory (peak - before) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        name = "gradient checkpointing" if r["checkpointing"] else "no checkpointing"
        lines.append(f"| {name} | {r['s_per_step']:.1f} | {r['peak_gb']:.2f} GB | {r['rss_before_gb']:.2f} GB | "
                     f"{r['activations_gb']:.2f} GB |")
    lines += ["", f"checkpointing: activation memory / {off['activations_gb'] / max(on['activations_gb'], 1e-9):.1f}, "
              f"time x {on['s_per_step'] / off['s_per_step']:.2f}"]
    return lines


# -- 2. and 3. tiny twin ------------------------------------------------------------------------
def _tiny_setup(root: Path) -> dict:
    import torch

    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.loading import save_lbm
    from lbm_registry.lbm.model import build_model
    from lbm_registry.train.synth import write_synth_shards

    tiny = load_config(ROOT / "configs" / "lbm-tiny.yaml")
    base = save_lbm(build_model(tiny, seed=0), root / "base.safetensors")
    shards = write_synth_shards(root / "data", 16, resolution=64, seed=1, shard_size=8, prefix="train")
    del torch
    return {"base": str(base), "train_shards": [str(p) for p in shards], "validation_shards": [],
            "new_lora": {"rank": 8, "conv_rank": 4}, "trainable_lora_modules": ["*"], "resolution": 64,
            "num_sample_images": 0, "mlflow": False, "device": "cpu", "checkpoint_interval": 10_000,
            "validation_interval": 10_000, "learning_rate": 1e-3}


def cached_latents(root: Path, common: dict) -> list[str]:
    import torch

    from lbm_registry.api.train import build_lora_trainer
    from lbm_registry.settings import WorkspaceSettings
    from lbm_registry.train.config import train_config_from_dict

    torch.set_num_threads(1)  # tiny ops: thread hand-off dominates, and the machine may be shared
    results = {}
    for mode in ("no", "memory"):
        cfg = train_config_from_dict({**common, "batch_size": 4, "max_steps": 8, "cache_latents": mode,
                                      "output_dir": str(root / f"cache-{mode}-{time.time_ns()}")})
        trainer, _ = build_lora_trainer(cfg, settings=WorkspaceSettings.resolve(home=root / "home"), progress=False)
        stamps: list[tuple[int, float]] = []
        real = trainer.optimizer_step

        def timed(micros, _real=real, _stamps=stamps, _trainer=trainer):
            out = _real(micros)
            _stamps.append((_trainer.state.epoch, time.perf_counter()))
            return out

        trainer.optimizer_step = timed
        t0 = time.perf_counter()
        trainer.fit()
        times = [b - a for (_, a), (_, b) in zip([(0, t0), *stamps[:-1]], stamps, strict=True)]
        # 16 pairs / 4 = 4 steps per epoch: steps 2..4 are the first epoch (step 1 also warms up),
        # steps 5..8 the second, with the cache warm
        results[mode] = (statistics.median(times[1:4]), statistics.median(times[4:]))
    no, mem = results["no"], results["memory"]
    return ["**Cached latents, tiny twin, 64 px, batch 4, 1 thread (real trainer, 8 steps = 2 epochs, "
            "medians)**", "",
            "| | first epoch, s / step | second epoch, s / step |", "| --- | --- | --- |",
            f"| `cache_latents: no` | {no[0]:.3f} | {no[1]:.3f} |",
            f"| `cache_latents: memory` | {mem[0]:.3f} | {mem[1]:.3f} ({no[1] / mem[1]:.2f}x faster) |"]


def processes(root: Path, common: dict) -> list[str]:
    from lbm_registry.api.train import train_lora
    from lbm_registry.settings import WorkspaceSettings
    from lbm_registry.train.config import train_config_from_dict

    settings = WorkspaceSettings.resolve(home=root / "home")
    walls: dict[tuple[int, int], float] = {}
    short, long = 4, 28   # the difference (24 steps) is what is timed: start-up (~15 s) cancels out
    for steps in (short, long):
        for n in (1, 2):
            cfg = train_config_from_dict({**common, "batch_size": 8 // n, "num_processes": n, "max_steps": steps,
                                          "output_dir": str(root / f"proc-{n}-{steps}")})
            t0 = time.perf_counter()
            if n == 1:  # the same command line a user runs, in its own process like the workers
                spec = root / f"cfg-{n}-{steps}.json"
                spec.write_text(json.dumps(cfg.to_dict()))
                subprocess.run([sys.executable, __file__, "--_single-worker", str(spec), str(settings.home)],
                               check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            else:
                train_lora(cfg, settings=settings, progress=False)
            walls[(n, steps)] = time.perf_counter() - t0
    lines = ["**1 vs 2 processes, tiny twin, 64 px, global batch 8 (1 x 8 vs 2 x 4, gloo), 2 CPU cores**", "",
             f"| | wall, {short} steps | wall, {long} steps | s / step (difference / {long - short}) | samples / s |",
             "| --- | --- | --- | --- | --- |"]
    per = {n: (walls[(n, long)] - walls[(n, short)]) / (long - short) for n in (1, 2)}
    for n in (1, 2):
        lines.append(f"| {n} process{'es' if n > 1 else ''} | {walls[(n, short)]:.1f} s | {walls[(n, long)]:.1f} s | "
                     f"{per[n]:.2f} | {8 / per[n]:.1f} |")
    lines += ["", f"2 processes: throughput x {per[1] / per[2]:.2f} of one process"]
    return lines


def _single_worker(spec: str, home: str) -> None:
    from lbm_registry.api.train import train_lora
    from lbm_registry.settings import WorkspaceSettings
    from lbm_registry.train.config import train_config_from_dict

    train_lora(train_config_from_dict(json.loads(Path(spec).read_text())),
               settings=WorkspaceSettings.resolve(home=home), progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--full-only", action="store_true")
    ap.add_argument("--full-steps", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--_full-worker", dest="full_worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_single-worker", dest="single_worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.full_worker is not None:
        print(json.dumps(full_size_worker(bool(args.full_worker), args.full_steps, args.resolution)))
        return
    if args.single_worker is not None:
        _single_worker(*args.single_worker)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    load = os.getloadavg()[0]
    print(f"(machine: {os.cpu_count()} cores, load average {load:.1f} at the start)\n")
    if not args.full_only:
        with tempfile.TemporaryDirectory() as tmp:
            common = _tiny_setup(Path(tmp))
            print("\n".join(cached_latents(Path(tmp), common)) + "\n", flush=True)
            print("\n".join(processes(Path(tmp), common)) + "\n", flush=True)
    if not args.tiny_only:
        print("\n".join(full_size(args.full_steps, args.resolution)))
    print(f"\n(load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
