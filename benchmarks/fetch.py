"""Fetching a blob from the tracking server: ``lbm-reg pull`` against ``curl`` of the same artifact.

A real ``mlflow server`` (SQLite backend, ``--artifacts-destination`` a local folder) on
127.0.0.1 holds one registered version of ``--size-mb`` random bytes (1 GB by default). Each
round, in alternating order, ``curl`` downloads the weight artifact from the server's
``/api/2.0/mlflow-artifacts/artifacts/...`` endpoint (the URL our fetch reads) to a file, and
``lbm-reg pull`` fetches it into an empty home (streamed, sha256-checked, fsynced, renamed).
Reported: median wall time of each, the ratio, the fetch's own time (``pull --json`` seconds:
without Python start-up and the catalog lookup) and the peak RSS of the ``lbm-reg`` process
(``wait4``); also the registration's time and peak RSS (the upload streams: RSS does not grow
with the file). Targets: ratio <= 1.5, peak RSS < 200 MB.

    flock /work/coord/heavy.lock python benchmarks/fetch.py [--size-mb 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def _start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(folder / "server.log", "w")  # noqa: SIM115  (lives as long as the server)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}") from None
            time.sleep(0.5)
    raise SystemExit("mlflow server did not come up")


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def _popen_rss(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Like :func:`_run`, reaping the child with ``wait4`` to read its own peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode})")
    return wall, usage.ru_maxrss * 1024, out.decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("curl is not installed")
    folder = Path(tempfile.mkdtemp(prefix="lbm-bench-fetch-"))
    server = None
    try:
        server, uri = _start_server(folder)
        catalog = f"sqlite:///{folder / 'catalog.db'}"
        src = folder / "weights.safetensors"
        with open(src, "wb") as fh:
            for _ in range(args.size_mb):
                fh.write(os.urandom(1024 * 1024))
        size = src.stat().st_size
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
        reg = [_bin("lbm-reg"), "--home", str(folder / "home-a"), "--catalog-url", catalog, "--tracking-uri", uri]
        register_s, register_rss, _ = _popen_rss([sys.executable, "-c",
                        "import sys, pathlib; from lbm_registry.api import registry as R; "
                        "from lbm_registry.settings import WorkspaceSettings as S; "
                        "R.register_asset(pathlib.Path(sys.argv[1]), name='big', kind='model', "
                        "settings=S(home=pathlib.Path(sys.argv[2]), catalog_url=sys.argv[3], tracking_uri=sys.argv[4]))",
                        str(src), str(folder / "home-a"), catalog, uri], env)
        info = json.loads(subprocess.run(reg + ["show", "big", "--json"], check=True, capture_output=True,
                                         env=env).stdout)
        run = json.loads(urllib.request.urlopen(f"{uri}/api/2.0/mlflow/runs/get?run_id={info['mlflow']['run_id']}")
                         .read())["run"]["info"]["artifact_uri"]
        url = f"{uri}/api/2.0/mlflow-artifacts/artifacts/{run.split(':', 1)[1].strip('/')}/weights/{info['file_name']}"
        curl_s, pull_s, fetch_s, rss = [], [], [], []
        for i in range(args.rounds):
            for which in (("curl", "pull") if i % 2 == 0 else ("pull", "curl")):
                if which == "curl":
                    out = folder / "curl.out"
                    wall = _wall(["curl", "-sS", "-f", "-o", str(out), url])
                    assert out.stat().st_size == size
                    out.unlink()
                    curl_s.append(wall)
                else:
                    home = folder / f"home-b{i}"
                    wall, peak, out = _popen_rss([_bin("lbm-reg"), "--home", str(home), "--catalog-url", catalog,
                                                  "--tracking-uri", uri, "pull", "big", "--json"], env)
                    (blob,) = json.loads(out)["blobs"]
                    assert blob["status"] == "fetched"
                    pull_s.append(wall)
                    fetch_s.append(blob["seconds"])
                    rss.append(peak)
                    shutil.rmtree(home)
        load = os.getloadavg()[0]
        med = statistics.median
        rows = [
            ("curl (same URL)", med(curl_s), size / med(curl_s), 1.0, "-"),
            ("lbm-reg pull (whole command)", med(pull_s), size / med(pull_s), med(pull_s) / med(curl_s),
             f"{max(rss) / 2**20:.0f} MB"),
            ("  of which the fetch", med(fetch_s), size / med(fetch_s), med(fetch_s) / med(curl_s), "-"),
        ]
        print(f"fetch benchmark: {size / 2**20:.0f} MiB over loopback from 'mlflow server', {args.rounds} rounds, "
              f"median (load average {load:.1f}; registering it took {register_s:.1f} s incl. the streamed upload, "
              f"peak RSS {register_rss / 2**20:.0f} MB)")
        print(f"{'what':32} {'seconds':>8} {'MB/s':>8} {'x curl':>7} {'peak RSS':>9}")
        for name, s, bps, ratio, peak in rows:
            print(f"{name:32} {s:8.2f} {bps / 1e6:8.0f} {ratio:7.2f} {peak:>9}")
        ok = med(pull_s) / med(curl_s) <= 1.5 and max(rss) < 200 * 2**20
        print("targets (<= 1.5x curl, peak RSS < 200 MB):", "met" if ok else "NOT met")
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
