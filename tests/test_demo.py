"""The project's integration test: ``lbm-reg demo`` end to end on the tiny twin, offline."""

from __future__ import annotations

import json
import re

import pytest


def test_demo_runs_the_whole_loop(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lbm_registry.api.registry import list_assets, resolve, show
    from lbm_registry.cli.main import app
    from lbm_registry.registry.settings import WorkspaceSettings

    elsewhere = tmp_path / "elsewhere"  # run from another folder: nothing may land there
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    home = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--home", str(home), "--train-steps", "4", "--finetune-steps", "8"])
    assert res.exit_code == 0, res.output
    assert "demo complete" in res.output
    served = re.findall(r"^ *(\S.*?) +-> (\d+)x(\d+) PNG, batch of (\d+)", res.output, re.M)
    assert [r[0] for r in served] == ["relight@1", "relight@2", "relight@candidate", "(no LoRA)"], res.output
    assert max(int(r[3]) for r in served) >= 2, served   # requests for different LoRAs shared a pass
    st = WorkspaceSettings.resolve(home)
    names = {a["name"]: a for a in list_assets(st)}
    assert set(names) == {"tiny-base", "tiny-relight-full", "relight", "relight-small", "relight-avg",
                          "relight-kohya"}
    assert show("relight-small", st)["lineage"]["parent"]["ref"] == "relight@1"
    assert show("relight-kohya", st)["facts"]["source_format"] == "kohya"
    assert names["relight"]["versions"] == 3
    v1, v2, v3 = (resolve(f"relight@{n}", st) for n in (1, 2, 3))
    base = resolve("tiny-base", st)
    assert v1.lineage["base"]["sha256"] == base.sha256 == v3.lineage["base"]["sha256"]
    assert v1.lineage["tuned"]["sha256"] == resolve("tiny-relight-full", st).sha256
    assert v1.facts["policy"] != v2.facts["policy"]
    assert v3.lineage["parent"]["ref"] == "relight@1"
    assert v3.lineage["datasets"]
    assert resolve("relight@candidate", st).sha256 == v3.sha256
    assert "functional_error" in json.dumps(show("relight@1", st))
    assert (home / "outputs" / "relight-latest.png").is_file()
    assert (home / "report" / "index.html").is_file()
    assert (home / "relight-v1-layers.txt").read_text().count("\n") == 792
    assert list(elsewhere.iterdir()) == []
    _check_mlflow_story(home, st)


def _get(url: str, body: dict | None = None) -> bytes:
    """GET ``url``, or POST ``body`` as JSON (MLflow's search endpoints take POST only)."""
    import urllib.request

    req = url if body is None else urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def _check_mlflow_story(home, st) -> None:
    """What a user browsing the demo in MLflow sees, read back through the REST API of a real
    ``mlflow server`` on the workspace (``lbm-reg ui``'s command): experiments inside --home and
    described; version pages with quality tags, linked descriptions and a probe picture for an
    extracted, a trained and an imported version; the compare run linked both ways; the compare
    report self-contained."""
    import json
    import re
    import signal
    import subprocess
    import time
    from pathlib import Path
    from urllib.parse import quote, unquote, urlparse

    from fixtures.servers import _stop, _tail, free_port

    from lbm_registry.api.registry import show, ui_command

    page = (home / "report" / "index.html").read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(?!data:)[^"#]+\.(png|jpe?g|svg)"', page)

    port = free_port()
    log = home.parent / "ui.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(ui_command(st, port=port), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 150
        while True:
            assert proc.poll() is None, _tail(log)
            try:
                if _get(f"{api}/health"):
                    break
            except OSError:
                pass
            assert time.time() < deadline, _tail(log)
            time.sleep(0.5)

        def rest(endpoint: str, /, **q) -> dict:
            query = "&".join(f"{k}={quote(str(v))}" for k, v in q.items())
            return json.loads(_get(f"{api}/api/2.0/mlflow/{endpoint}?{query}"))

        exps = rest("experiments/search", max_results=100)["experiments"]
        assert {e["name"] for e in exps} >= {"Default", "lbm-registry", "lbm-registry-compare"}
        for e in exps:
            loc = Path(unquote(urlparse(e["artifact_location"]).path))
            assert loc.is_relative_to(home), (e["name"], e["artifact_location"])
            assert any(t["key"] == "mlflow.note.content" and t["value"] for t in e.get("tags", [])), e["name"]

        def version(ref: str) -> tuple[dict, dict]:
            info = show(ref, st)
            mv = rest("model-versions/get", name=info["name"], version=info["mlflow"]["model_version"])["model_version"]
            return info, mv

        def tags(mv: dict) -> dict:
            return {t["key"]: t["value"] for t in mv.get("tags", [])}

        base_info, _ = version("tiny-base@1")
        base_link = f"#/models/tiny-base/versions/{base_info['mlflow']['model_version']}"
        exp_id = next(e["experiment_id"] for e in exps if e["name"] == "lbm-registry")
        compare_exp = next(e["experiment_id"] for e in exps if e["name"] == "lbm-registry-compare")
        compare_runs = json.loads(_get(f"{api}/api/2.0/mlflow/runs/search", {"experiment_ids": [compare_exp]}))
        cmp_run = compare_runs.get("runs") or []
        assert cmp_run, "no compare run"
        for ref, want in (("relight@1", ("rank", "conv_rank", "policy", "alpha", "mean_error", "functional_error")),
                          ("relight@3", ("rank", "policy", "val_loss_before", "val_loss_after")),
                          ("tiny-relight-full@1", ("size", "dtype"))):
            info, mv = version(ref)
            t = tags(mv)
            assert set(want) <= set(t), (ref, sorted(t))
            assert "size" in t and not {"lbm.name", "lbm.version", "lbm.kind", "lbm.version_id"} & set(t)
            assert mv["source"].endswith("/weights")
            desc = mv["description"]
            run = info["mlflow"]["run_id"]
            assert f"(#/experiments/{exp_id}/runs/{run})" in desc, desc
            assert f"get-artifact?path=probe.png&run_uuid={run}" in desc
            files = {f["path"] for f in rest("artifacts/list", run_id=run).get("files", [])}
            assert "probe.png" in files, (ref, files)
            assert _get(f"{api}/get-artifact?path=probe.png&run_uuid={run}")[:8] == b"\x89PNG\r\n\x1a\n"
            weights = {f["path"] for f in rest("artifacts/list", run_id=run, path="weights").get("files", [])}
            assert "weights/MLmodel" in weights
            if ref.startswith("relight"):
                assert f"[tiny-base@1]({base_link})" in desc
        _, v1 = version("relight@1")
        assert "#/models/tiny-relight-full/versions/" in v1["description"]  # the tuned model
        assert f"/runs/{cmp_run[0]['info']['run_id']})" in v1["description"]  # the compare run judged it
        _, v3 = version("relight@3")
        assert "[relight@1](#/models/relight/versions/" in v3["description"] and "training run" in v3["description"]
        run_tags = {t["key"]: t["value"] for t in cmp_run[0]["data"]["tags"]}
        assert run_tags["lbm.a_ref"] == "relight@1" and run_tags["lbm.b_ref"] == "relight@2"
        assert "(#/models/relight/versions/" in run_tags["mlflow.note.content"]
        model = rest("registered-models/get", name="relight")["registered_model"]
        assert "3 version(s)" in model["description"] and "@candidate" in model["description"]
    finally:
        _stop(proc, signal.SIGTERM)


def test_demo_refuses_a_foreign_folder(tmp_path):
    from lbm_registry.api.demo import prepare_home
    from lbm_registry.errors import LBMError

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LBMError, match="not made by the demo"):
        prepare_home(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
