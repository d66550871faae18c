"""``lbm-reg ui``: one process serving MLflow's UI on the workspace, landing on the model registry
in machine-learning mode, and nothing left running once it is stopped."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def test_ui_is_one_process_on_the_registry_in_ml_mode_and_stops_whole(fresh_settings, make_weights, tmp_path):
    """The first page stores machine-learning mode (no GenAI sidebar, no assistant popping up,
    no registry promo) unless the browser chose a mode itself; the REST API answers; the server
    has no child process (no uvicorn workers, no job executor), and Ctrl-C stops it with
    nothing left behind."""
    import psutil
    from fixtures.servers import _stop, _tail, free_port, start_ui, wait_ui

    from lbm_registry.api.registry import register_asset, ui_url

    s = fresh_settings()
    register_asset(make_weights(), name="ui-base", kind="base", settings=s)
    port = free_port()
    log_path = tmp_path / "ui.log"
    proc = start_ui(s.home, port, log_path)
    base = f"http://127.0.0.1:{port}"
    seen: set[int] = set()
    try:
        wait_ui(proc, base, log_path)
        assert ui_url("127.0.0.1", port) in _tail(log_path)  # the URL it says to open
        assert ui_url("127.0.0.1", port) == f"{base}/#/models?workflowType=machine_learning"
        page = _get(f"{base}/").decode()
        head = page[page.index("<head>"):page.index("main.")]
        assert '"mlflow.workflowType_v1": "\\"machine_learning\\""' in head, head  # before MLflow's bundle
        assert "_mlflow_model_registry_promo_modal_dismissed_v1" in head
        assert "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1" in head
        assert "getItem(k)===null" in head  # a mode the user picked is kept
        models = json.loads(_get(f"{base}/api/2.0/mlflow/registered-models/search?max_results=10"))
        assert [m["name"] for m in models["registered_models"]] == ["ui-base"]
        me = psutil.Process(proc.pid)
        assert me.cmdline()[1:3] == ["-m", "lbm_registry.registry.ui"]  # the CLI became the server
        seen = {c.pid for c in me.children(recursive=True)}
        assert not seen, [c.cmdline() for c in me.children(recursive=True)]
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 130, _tail(log_path)
        assert "Traceback" not in _tail(log_path, 20000) and "Warning" not in _tail(log_path, 20000)
    finally:
        _stop(proc, signal.SIGKILL)
    survivors = [p for p in psutil.process_iter(["pid", "cmdline"])
                 if p.info["pid"] in seen or str(port) in " ".join(p.info["cmdline"] or [])]
    assert not survivors, [p.info for p in survivors]


def test_ui_page_marks_only_the_index(tmp_path):
    """The index page gets the defaults script once; other HTML and other pages are untouched."""
    from lbm_registry.registry.ui import defaults_script, with_ui_defaults

    html = b"<!doctype html><html><head><title>MLflow</title></head></html>"
    once = with_ui_defaults(html)
    assert once.startswith(b"<!doctype html><html><head><script>") and once.count(defaults_script()) == 1
    assert with_ui_defaults(once) == once
    assert with_ui_defaults(b"no head here") == b"no head here"


@pytest.mark.parametrize("host,want", [("127.0.0.1", "http://127.0.0.1:5000/"), ("0.0.0.0", "http://127.0.0.1:5000/"),
                                       ("::1", "http://[::1]:5000/")])
def test_ui_url(host, want):
    from lbm_registry.api.registry import ui_url

    assert ui_url(host, 5000) == f"{want}#/models?workflowType=machine_learning"


def test_mlflow_serve_and_import_refusals_are_one_line(fresh_settings, make_weights, cli):
    """``mlflow-serve`` of something that is no registered version, on a taken port, and a
    ``--base`` on a base import: one line, exit 2, nothing started or registered."""
    import socket

    from lbm_registry.api.registry import register_asset

    s = fresh_settings()
    register_asset(make_weights(), name="ms-base", kind="base", settings=s)
    rc, out, err = cli("--home", s.home, "mlflow-serve", "nosuch@1")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "nosuch" in err and "Traceback" not in err, err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rc, _, err = cli("--home", s.home, "mlflow-serve", "ms-base@1", "--port", taken.getsockname()[1])
    assert rc != 0 and len(err.strip().splitlines()) == 1, err
    rc, _, err = cli("--home", s.home, "import", make_weights(), "--name", "ms-other", "--kind", "base",
                     "--base", "ms-base")
    assert rc == 2 and "--base is for model and lora imports" in err, err
