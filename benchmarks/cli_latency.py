"""CLI latency: every start-up target of issue 11, side by side with the interpreter baselines.

Each command runs as a fresh subprocess (what a user waits for), several times; the table gives
the median and min and the ratio to ``python -c "import torch"`` measured in the same run, and
checks each target:

- ``--help`` < 0.3 s; ``list``/``show`` < 0.7 s;
- ``init`` (existing workspace), ``alias set``, ``gc``, ``doctor`` < 1 s;
- ``import`` of the tiny base <= its sha256 time + 1 s (with the default ``--probe auto``: the
  probe picture is drawn by a background process afterwards, waited for untimed between runs and
  reported on its own);
- ``infer`` of one 256 px image with the tiny base <= ``python -c "import diffusers"`` + 1.5 s
  (the import of the three diffusers classes LBM is built from is shown too: diffusers' lazy
  ``import diffusers`` loads none of them, and their import alone pulls in its model zoo; the
  last row is ``infer`` minus that class import, the part of its time that is ours, as the
  median difference of runs of the two made back to back);
- usage and reference errors < 0.5 s.

    python benchmarks/cli_latency.py [--runs 5]

A temporary workspace is created first (a tiny LBM base, two LoRA-like versions). Numbers from a
machine others are using are not comparable: the script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def _time(cmd: list[str], runs: int, env: dict[str, str], expect_rc: int = 0,
          after: Callable[[int], None] | None = None) -> tuple[float, float]:
    """(median, min) wall time of ``runs`` runs after one warm-up; ``after(n)`` runs untimed
    after the n-th run (e.g. waiting for the background probe it started)."""
    samples = []
    for i in range(runs + 1):  # the first run warms the page cache and .pyc files
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode != expect_rc:
            sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}, expected {expect_rc}\n{proc.stderr[-2000:]}")
        if i:
            samples.append(dt)
        if after is not None:
            after(i + 1)
    return statistics.median(samples), min(samples)


def _paired_difference(a: list[str], b: list[str], runs: int, env: dict[str, str]) -> tuple[float, float, float]:
    """Median of ``time(b) - time(a)`` over ``runs`` pairs run back to back (after one warm-up
    pair), plus the medians of each: a slow drift of the machine (another tenant, clock
    boost) hits both sides of a pair alike, where two rows timed minutes apart can differ by
    more than the difference itself."""
    diffs, ta, tb = [], [], []
    for i in range(runs + 1):
        pair = []
        for cmd in (a, b):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            pair.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
        if i:
            ta.append(pair[0])
            tb.append(pair[1])
            diffs.append(pair[1] - pair[0])
    return statistics.median(diffs), statistics.median(ta), statistics.median(tb)


def _probes_done(home: Path, timeout: float = 900.0) -> Callable[[int], None]:
    """``import`` draws its probe picture in a background process (one line per version in
    <home>/logs/probe.log): wait for the n-th before timing anything else, so that no row is
    measured next to a running probe."""
    log = home / "logs" / "probe.log"

    def wait(n: int) -> None:
        deadline = time.time() + timeout
        while (log.read_text().count("\n") if log.exists() else 0) < n:
            if time.time() > deadline:
                sys.exit(f"background probe {n} did not finish in {timeout:.0f} s: {log}")
            time.sleep(0.2)

    return wait


def _workspace(home: Path, files: Path) -> dict[str, Path | str]:
    import numpy as np
    from safetensors.numpy import save_file

    from lbm_registry.api.assets.models import import_model
    from lbm_registry.api.registry import register_asset
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.loading import save_lbm
    from lbm_registry.lbm.model import build_model
    from lbm_registry.settings import WorkspaceSettings

    s = WorkspaceSettings(home=home)
    files.mkdir(parents=True, exist_ok=True)
    base_file = save_lbm(build_model(load_config("lbm-tiny"), seed=0), files / "tiny-base.safetensors")
    to_import = files / "tiny-base-copy.safetensors"
    shutil.copyfile(base_file, to_import)
    base = import_model(base_file, name="bench-base", kind="base", settings=s)
    layers = [{"module": f"m{j}", "kind": "linear", "shape": [320, 320], "rank": 32, "rel_error": 0.01,
               "energy": 0.9} for j in range(792)]
    for i in range(2):
        p = files / f"lora{i}.safetensors"
        save_file({"w": np.random.default_rng(i).standard_normal((256, 256)).astype("float32")}, str(p))
        register_asset(p, name="bench-lora", kind="lora", settings=s, lineage={"base": base},
                       facts={"rank": 32, "conv_rank": 16, "policy": "fixed", "alpha": 32.0, "mean_error": 0.01,
                              "max_error": 0.02, "layers": layers, "skipped": []})
    from PIL import Image

    image = files / "img.png"
    Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype("uint8")).save(image)
    return {"base_file": to_import, "image": image, "out": files / "out.png"}


def _sha_seconds(path: Path, runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "160"}
    tmp = Path(tempfile.mkdtemp(prefix="lbm-bench-"))
    load_before = os.getloadavg()
    try:
        home = tmp / "home"
        f = _workspace(home, tmp / "files")
        sha_s = _sha_seconds(Path(f["base_file"]), args.runs)
        lbm = _bin("lbm-reg")
        h = [lbm, "--home", str(home)]
        py = sys.executable
        # (name, command, expected exit code)
        commands: list[tuple[str, list[str], int]] = [
            ("python -c pass", [py, "-c", "pass"], 0),
            ('python -c "import torch"', [py, "-c", "import torch"], 0),
            ('python -c "import diffusers"', [py, "-c", "import diffusers"], 0),
            ("diffusers' LBM classes (UNet, VAE, scheduler)",
             [py, "-c", "from diffusers import UNet2DConditionModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler"], 0),
            ('python -c "import mlflow"', [py, "-c", "import mlflow"], 0),
            ("lbm-reg --help", [lbm, "--help"], 0),
            ("lbm-reg list", [*h, "list"], 0),
            ("lbm-reg show", [*h, "show", "bench-lora"], 0),
            ("lbm-reg init (existing)", [*h, "init"], 0),
            ("lbm-reg alias set", [*h, "alias", "set", "bench-lora@1", "prod"], 0),
            ("lbm-reg gc", [*h, "gc"], 0),
            ("lbm-reg doctor", [*h, "doctor"], 0),
            ("lbm-reg import (tiny base)", [*h, "import", str(f["base_file"]), "--name", "bench-import",
                                            "--kind", "base", "--allow-duplicate"], 0),
            ("lbm-reg infer (tiny, 256 px)", [*h, "infer", "bench-base", "--source", str(f["image"]),
                                              "--output", str(f["out"])], 0),
            ("usage error (--rank abc)", [*h, "extract", "--base", "x", "--tuned", "y", "--rank", "abc"], 2),
            ("reference error (show nope)", [*h, "show", "nope"], 2),
            ("base create --dtype int4", [*h, "base", "create", "--config", "lbm-tiny", "--output",
                                          str(tmp / "x.safetensors"), "--dtype", "int4"], 2),
            ("import, name of another kind", [*h, "import", str(f["base_file"]), "--name", "bench-lora",
                                              "--kind", "model"], 2),
            ("extract, unknown --base", [*h, "extract", "--base", "nope", "--tuned", "bench-base", "-o",
                                         str(tmp / "x.safetensors")], 2),
        ]
        results = {name: _time(cmd, args.runs, env, rc, after=_probes_done(home) if name.startswith("lbm-reg import")
                               else None) for name, cmd, rc in commands}
        classes_cmd = next(cmd for name, cmd, _ in commands if name.startswith("diffusers' LBM classes"))
        infer_cmd = next(cmd for name, cmd, _ in commands if name.startswith("lbm-reg infer"))
        ours, classes_pair, infer_pair = _paired_difference(classes_cmd, infer_cmd, args.runs, env)
        probe_log = (home / "logs" / "probe.log").read_text().splitlines()
        probe_s = statistics.median(float(line.rsplit("(", 1)[1].split()[0]) for line in probe_log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    base = results['python -c "import torch"'][0]
    diffusers_s = results['python -c "import diffusers"'][0]
    targets = {
        "lbm-reg --help": ("< 0.3 s", 0.3), "lbm-reg list": ("< 0.7 s", 0.7), "lbm-reg show": ("< 0.7 s", 0.7),
        "lbm-reg init (existing)": ("< 1 s", 1.0), "lbm-reg alias set": ("< 1 s", 1.0),
        "lbm-reg gc": ("< 1 s", 1.0), "lbm-reg doctor": ("< 1 s", 1.0),
        "lbm-reg import (tiny base)": (f"<= sha256 {sha_s:.3f} s + 1 s", sha_s + 1.0),
        "lbm-reg infer (tiny, 256 px)": ("<= import diffusers + 1.5 s", diffusers_s + 1.5),
    }
    for name in results:
        if "error" in name or name.startswith(("base create", "import, ", "extract, ")):
            targets[name] = ("< 0.5 s", 0.5)
    print(f"CLI latency, median/min of {args.runs} runs, cpus {os.cpu_count()}, load average "
          f"{load_before[0]:.1f} before / {load_after[0]:.1f} after\n")
    print('| command | median (s) | min (s) | vs `import torch` | target |')
    print("|---|---:|---:|---:|---|")
    for name, (med, low) in results.items():
        text, limit = targets.get(name, ("", None))
        verdict = "" if limit is None else f"{text} " + ("ok" if med <= limit else "**missed**")
        print(f"| `{name}` | {med:.3f} | {low:.3f} | {med / base:.2f}x | {verdict} |")
    print(f"| `infer` minus diffusers' LBM classes, paired runs (what is ours) | {ours:.3f} | — | — | "
          f"<= 1.5 s {'ok' if ours <= 1.5 else '**missed**'} |")
    print(f"\nPaired runs (class import, then `infer`, back to back, {args.runs} pairs): medians "
          f"{classes_pair:.3f} s and {infer_pair:.3f} s, median difference {ours:.3f} s.")
    print(f"\n`import`'s probe picture, drawn afterwards in the background: median {probe_s:.1f} s "
          f"({len(probe_log)} probes; every one attached: {all('attached probe.png' in x for x in probe_log)})")


if __name__ == "__main__":
    main()
