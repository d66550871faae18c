"""``lbm-reg ui`` against the ``mlflow server`` it replaced: time to the first page, processes, memory,
and what is left running after SIGTERM, side by side on one workspace.

    python benchmarks/ui_startup.py [--home DIR] [--runs 2]

Each server is started as a user would start it (``lbm-reg ui``; ``mlflow server`` with the options
``lbm-reg ui`` used to pass, i.e. its default 4 workers and job execution), timed until the UI's
index page and the model registry's first REST answer are served, measured (processes under it and
their total RSS), then stopped with SIGTERM; processes of its tree still alive 15 s later are
counted (and then killed). Without ``--home`` a fresh workspace with one version is made. Numbers
from a machine others are using are not comparable: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _tree(pid: int) -> list[psutil.Process]:
    try:
        me = psutil.Process(pid)
        return [me, *me.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def measure(cmd: list[str], port: int) -> dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    base = f"http://127.0.0.1:{port}"
    seen: set[int] = set()
    try:
        while not (_up(f"{base}/") and _up(f"{base}/ajax-api/2.0/mlflow/registered-models/search?max_results=1")):
            if proc.poll() is not None or time.perf_counter() - t0 > 600:
                raise RuntimeError(f"{cmd[:4]} did not come up")
            seen |= {p.pid for p in _tree(proc.pid)}
            time.sleep(0.2)
        first_page = time.perf_counter() - t0
        time.sleep(5)  # what it settles at (job processes start after the web server)
        tree = _tree(proc.pid)
        seen |= {p.pid for p in tree}
        rss = sum(p.memory_info().rss for p in tree if p.is_running())
        n = len(tree)
        proc.send_signal(signal.SIGTERM)
        time.sleep(15)
        alive = [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    finally:
        for p in _tree(proc.pid):
            p.kill()
        for pid in seen:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        proc.wait(30)
    return {"first_page_s": first_page, "processes": n, "rss_mb": rss / 1e6, "left_after_sigterm": len(alive)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from lbm_registry.api.registry import init_workspace, register_asset
    from lbm_registry.settings import WorkspaceSettings

    print(f"load average before: {os.getloadavg()}")
    home = args.home
    if home is None:
        home = Path(tempfile.mkdtemp(prefix="ui-bench-")) / "home"
        s = WorkspaceSettings.resolve(home)
        init_workspace(s)
        w = home.parent / "w.safetensors"
        import numpy as np
        from safetensors.numpy import save_file

        save_file({"x": np.zeros((4, 4), dtype=np.float32)}, str(w))
        register_asset(w, name="bench-base", kind="base", settings=s)
    s = WorkspaceSettings.resolve(home)
    rows: dict[str, list[dict[str, float]]] = {"lbm-reg ui": [], "mlflow server (before)": []}
    for _ in range(args.runs):
        for name in rows:
            port = _free_port()
            if name == "lbm-reg ui":
                cmd = [sys.executable, "-m", "lbm_registry.cli.main", "--home", str(home), "ui", "--port", str(port)]
            else:
                cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", s.effective_tracking_uri,
                       "--default-artifact-root", (home / "artifacts").as_uri(), "--host", "127.0.0.1",
                       "--port", str(port)]
            rows[name].append(measure(cmd, port))
    ours = statistics.median(r["first_page_s"] for r in rows["lbm-reg ui"])
    print(f"{'server':<24} {'first page s':>12} {'ratio':>6} {'processes':>9} {'RSS MB':>8} {'left after SIGTERM':>18}")
    for name, runs in rows.items():
        med = statistics.median(r["first_page_s"] for r in runs)
        print(f"{name:<24} {med:>12.1f} {med / ours:>6.1f} {max(r['processes'] for r in runs):>9.0f} "
              f"{statistics.median(r['rss_mb'] for r in runs):>8.0f} {max(r['left_after_sigterm'] for r in runs):>18.0f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
