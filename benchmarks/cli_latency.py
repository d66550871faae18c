"""CLI latency: ``lbm-reg --help/list/show`` against ``mlflow --help`` and ``import mlflow``.

Each command runs as a fresh subprocess (what a user waits for), several times; the table
reports the median and the ratio to ``python -c "import mlflow"`` measured in the same run.
Budgets: ``--help`` < 0.3 s, ``list``/``show`` < 0.7 s.

    python benchmarks/cli_latency.py [--runs 7] [--home DIR]

Without ``--home`` a temporary workspace with one base and two LoRA versions is created first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGETS = {"lbm-reg --help": 0.3, "lbm-reg list": 0.7, "lbm-reg show": 0.7}


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def _time(cmd: list[str], runs: int, env: dict[str, str]) -> tuple[float, float]:
    samples = []
    subprocess.run(cmd, env=env, capture_output=True, check=True)  # warm the page cache / .pyc
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), min(samples)


def _demo_workspace(home: Path) -> str:
    import numpy as np
    from safetensors.numpy import save_file

    from lbm_registry.api.registry import register_asset
    from lbm_registry.registry.settings import WorkspaceSettings

    s = WorkspaceSettings(home=home)
    files = home.parent / "files"
    files.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(3):
        p = files / f"w{i}.safetensors"
        save_file({"w": np.random.default_rng(i).standard_normal((256, 256)).astype("float32")}, str(p))
        paths.append(p)
    base = register_asset(paths[0], name="bench-base", kind="base", settings=s)
    layers = [{"module": f"m{j}", "kind": "linear", "shape": [320, 320], "rank": 32, "rel_error": 0.01,
               "energy": 0.9} for j in range(792)]
    for p in paths[1:]:
        register_asset(p, name="bench-lora", kind="lora", settings=s, lineage={"base": base},
                       facts={"rank": 32, "conv_rank": 16, "policy": "fixed", "alpha": 32.0, "mean_error": 0.01,
                              "max_error": 0.02, "layers": layers, "skipped": []})
    return "bench-lora"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--home", type=Path, default=None, help="existing workspace (default: a temporary one)")
    ap.add_argument("--ref", default=None, help="REF for 'show' (default: the newest asset)")
    args = ap.parse_args()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "160"}
    tmp = None
    if args.home is None:
        tmp = Path(tempfile.mkdtemp(prefix="lbm-bench-"))
        home = tmp / "home"
        ref = _demo_workspace(home)
    else:
        home = args.home
        ref = args.ref
        if ref is None:
            from lbm_registry.api.registry import list_assets
            from lbm_registry.registry.settings import WorkspaceSettings

            rows = list_assets(WorkspaceSettings(home=home.absolute()))
            if not rows:
                sys.exit(f"no assets in {home}: pass --ref or use an empty --home for a demo workspace")
            ref = rows[-1]["ref"]
    lbm = _bin("lbm-reg")
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "lbm-reg --help": [lbm, "--help"],
        "lbm-reg list": [lbm, "--home", str(home), "list"],
        "lbm-reg show": [lbm, "--home", str(home), "show", ref],
        "lbm-reg show --json": [lbm, "--home", str(home), "show", ref, "--json"],
        "mlflow --help": [_bin("mlflow"), "--help"],
        'python -c "import mlflow"': [sys.executable, "-c", "import mlflow"],
    }
    try:
        results = {name: _time(cmd, args.runs, env) for name, cmd in commands.items()}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ref_time = results['python -c "import mlflow"'][0]
    print(f"CLI latency, median of {args.runs} runs (cpus: {os.cpu_count()})\n")
    print("| command | median (s) | min (s) | vs `import mlflow` | budget |")
    print("|---|---:|---:|---:|---|")
    for name, (med, low) in results.items():
        budget = BUDGETS.get(name)
        verdict = "" if budget is None else (f"< {budget} s " + ("ok" if med < budget else "**over**"))
        print(f"| `{name}` | {med:.3f} | {low:.3f} | {med / ref_time:.2f}x | {verdict} |")


if __name__ == "__main__":
    main()
