"""Regenerate docs/mlflow-version-page.png: a version page of a demo workspace, as MLflow shows it.

    make demo && make screenshot            # or:
    python docs/screenshot.py --home demo-home [--ref relight@1] [--out docs/mlflow-version-page.png]

Starts ``lbm-reg ui``'s server on a free port of 127.0.0.1 (one process, stopped at the end), opens
the version page in headless Chromium (a fresh profile: what a first visit shows) and saves the
screenshot. Chromium: ``--chromium PATH``, else ``$LBM_REG_CHROMIUM``, else ``chromium`` /
``chromium-browser`` / ``google-chrome`` on PATH. Nothing is fetched from outside this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def find_chromium(given: str | None) -> str:
    for cand in (given, os.environ.get("LBM_REG_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if cand and shutil.which(cand):
            return str(shutil.which(cand))
    sys.exit("screenshot: no Chromium found (pass --chromium PATH or set LBM_REG_CHROMIUM)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", default=os.environ.get("LBM_REG_HOME", "demo-home"), help="a demo workspace")
    p.add_argument("--ref", default="relight@1", help="the version whose page is shown")
    p.add_argument("--out", default=str(ROOT / "docs" / "mlflow-version-page.png"))
    p.add_argument("--size", default="1400x1500", help="window WIDTHxHEIGHT in px")
    p.add_argument("--wait-ms", type=int, default=15000, help="time the page gets to load its data")
    p.add_argument("--chromium", default=None)
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from lbm_registry.api.registry import show, ui_command
    from lbm_registry.errors import LBMError
    from lbm_registry.settings import WorkspaceSettings

    chromium = find_chromium(args.chromium)
    settings = WorkspaceSettings.resolve(Path(args.home))
    try:
        info = show(args.ref, settings)
        port = free_port()
        cmd = ui_command(settings, port=port)
    except LBMError as exc:
        sys.exit(f"screenshot: {exc}")
    url = (f"http://127.0.0.1:{port}/#/models/{info['name']}/versions/{info['mlflow']['model_version']}"
           "?workflowType=machine_learning")
    width, _, height = args.size.partition("x")
    server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        deadline = time.time() + 180
        while True:
            if server.poll() is not None:
                sys.exit(f"screenshot: the UI server stopped: {server.stderr.read().decode()[-500:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    sys.exit("screenshot: the UI server did not come up in 180 s")
                time.sleep(0.5)
        out = Path(args.out).absolute()
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="lbm-chromium-") as profile:
            subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                            f"--virtual-time-budget={args.wait_ms}", f"--screenshot={out}", url],
                           check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=300)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
    print(f"{out}: {args.ref} at {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
