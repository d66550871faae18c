"""The project's integration test: ``lbm-reg demo`` end to end on the tiny twin, offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo run once through the CLI (from another folder: nothing may land there):
    (CliRunner result, home, settings, the folder it ran from)."""
    import os
    import sys

    from typer.testing import CliRunner

    from lbm_registry.cli.main import app
    from lbm_registry.settings import WorkspaceSettings

    root = tmp_path_factory.mktemp("demo")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    home = root / "demo"
    venv_bin = str(Path(sys.executable).parent)  # as `make demo` runs it: the venv not activated
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        mp.setenv("PATH", os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin))
        res = CliRunner().invoke(app, ["demo", "--home", str(home), "--train-steps", "4", "--finetune-steps", "8"])
    return res, home, WorkspaceSettings.resolve(home), elsewhere


@pytest.fixture(scope="module")
def demo_ui(demo):
    """``lbm-reg ui`` on the demo workspace (the real CLI, one process), stopped at teardown;
    yields its base URL and the process."""
    import signal

    import psutil
    from fixtures.servers import _stop, free_port, start_ui, wait_ui

    _, home, _, _ = demo
    port = free_port()
    log = home.parent / "ui.log"
    proc = start_ui(home, port, log)
    api = f"http://127.0.0.1:{port}"
    wait_ui(proc, api, log)
    yield api, proc
    assert not psutil.Process(proc.pid).children(recursive=True)  # no workers, no job executor
    _stop(proc, signal.SIGTERM)


def test_demo_runs_the_whole_loop(demo):
    import shutil

    from lbm_registry.api.registry import list_assets, resolve, show

    res, home, st, elsewhere = demo
    assert res.exit_code == 0, res.output
    assert "demo complete" in res.output
    # every step says its command, then shows progress (issue 22, item 23: the longest step printed nothing)
    blocks = res.output.split("==> ")[1:]
    assert len(blocks) >= 18
    for block in blocks:
        lines = block.splitlines()
        assert lines[1].startswith("$ "), block[:300]
        assert re.search(r"done in \d|full fine-tune: step|-> \d+x\d+ PNG", block), block[-400:]
    assert "full fine-tune: step 8/8, loss" in res.output
    hint = re.search(r"^\$ (\S+) --home (.+) ui$", res.output, re.M)
    assert hint, res.output[-500:]
    assert shutil.which(hint.group(1)) or Path(hint.group(1)).is_file(), hint.group(1)   # runnable as printed
    served = re.findall(r"^ *(\S.*?) +-> (\d+)x(\d+) PNG, batch of (\d+)", res.output, re.M)
    assert [r[0] for r in served] == ["relight@1", "relight@2", "relight@candidate", "(no LoRA)"], res.output
    assert max(int(r[3]) for r in served) >= 2, served   # requests for different LoRAs shared a pass
    names = {a["name"]: a for a in list_assets(st)}
    assert set(names) == {"tiny-base", "tiny-relight-full", "relight", "relight-small", "relight-avg",
                          "relight-kohya"}
    assert show("relight-small", st)["lineage"]["parent"]["ref"] == "relight@1"
    assert show("relight-kohya", st)["facts"]["source_format"] == "kohya"
    assert show("relight-kohya", st)["lineage"]["parent"]["ref"] == "relight@1"  # its file says where it came from
    assert show("tiny-relight-full", st)["lineage"]["base"]["ref"] == "tiny-base@1"
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


def _get(url: str, body: dict | None = None) -> bytes:
    """GET ``url``, or POST ``body`` as JSON (MLflow's search endpoints take POST only)."""
    import urllib.request

    req = url if body is None else urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def test_demo_tells_the_story_in_mlflow(demo, demo_ui):
    """What a user browsing the demo in MLflow sees, read back through the REST API of the UI's
    server: experiments inside --home and described; version pages whose first line reads as
    plain text, with few quality tags (ids last), links both ways along the lineage and a probe
    picture captioned with exactly its tiles, for an extracted, a trained and an imported version;
    every run linked to its version (a logged model: the runs table's Models column), the training
    run named after and linked to what it produced; the compare run linked both ways; the compare
    report self-contained."""
    from pathlib import Path
    from urllib.parse import quote, unquote, urlparse

    from lbm_registry.api.registry import show

    _, home, st, _ = demo
    api, _ = demo_ui
    page = (home / "report" / "index.html").read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(?!data:)[^"#]+\.(png|jpe?g|svg)"', page)

    def rest(endpoint: str, /, **q) -> dict:
        query = "&".join(f"{k}={quote(str(v))}" for k, v in q.items())
        return json.loads(_get(f"{api}/api/2.0/mlflow/{endpoint}?{query}"))

    exps = rest("experiments/search", max_results=100)["experiments"]
    assert {e["name"] for e in exps} >= {"Default", "lbm-registry", "lbm-registry-compare", "lbm-registry-train"}
    for e in exps:
        loc = Path(unquote(urlparse(e["artifact_location"]).path))
        assert loc.is_relative_to(home), (e["name"], e["artifact_location"])
        assert any(t["key"] == "mlflow.note.content" and t["value"] for t in e.get("tags", [])), e["name"]
    exp_id = {e["name"]: e["experiment_id"] for e in exps}

    def version(ref: str) -> tuple[dict, dict]:
        info = show(ref, st)
        mv = rest("model-versions/get", name=info["name"], version=info["mlflow"]["model_version"])["model_version"]
        return info, mv

    def tags(mv: dict) -> dict:
        return {t["key"]: t["value"] for t in mv.get("tags", [])}

    def link(ref: str) -> str:
        info = show(ref, st)
        return f"[{ref}](#/models/{info['name']}/versions/{info['mlflow']['model_version']})"

    compare_runs = json.loads(_get(f"{api}/api/2.0/mlflow/runs/search",
                                   {"experiment_ids": [exp_id["lbm-registry-compare"]]})).get("runs") or []
    assert compare_runs, "no compare run"
    for ref, want, tiles in (
            ("relight@1", ("rank", "conv_rank", "policy", "mean_error", "functional_error"), "tuned"),
            ("relight@3", ("rank", "policy", "alpha", "val_loss_before", "val_loss_after"), "target"),
            ("relight-kohya@1", ("rank", "policy"), None),
            ("tiny-relight-full@1", ("size", "dtype"), None)):
        info, mv = version(ref)
        t = tags(mv)
        assert set(want) <= set(t), (ref, sorted(t))
        keys = sorted(t)  # the UI lists tags by name: the ids come last, the quality figures first
        ids = [k for k in keys if k.startswith("x-lbm.")]
        assert ids and keys[-len(ids):] == ids and not [k for k in keys if k.startswith("lbm.")], keys
        assert t.get("alpha") != "= rank"
        assert mv["source"].endswith("/weights")
        desc = mv["description"]
        first = desc.splitlines()[0]
        assert first.startswith(f"{ref}: ") and not re.search(r"[*\[\]`|]", first), first
        run = info["mlflow"]["run_id"]
        assert f"(#/experiments/{exp_id['lbm-registry']}/runs/{run})" in desc, desc
        assert f"get-artifact?path=probe.png&run_uuid={run}" in desc
        files = {f["path"] for f in rest("artifacts/list", run_id=run).get("files", [])}
        assert "probe.png" in files, (ref, files)
        assert _get(f"{api}/get-artifact?path=probe.png&run_uuid={run}")[:8] == b"\x89PNG\r\n\x1a\n"
        if tiles:
            assert f"*Probe: source | base | this version | {tiles}.*" in desc, desc
        weights = {f["path"] for f in rest("artifacts/list", run_id=run, path="weights").get("files", [])}
        assert "weights/MLmodel" in weights
        assert f"| base | {link('tiny-base@1')}" in desc
        # the run links its version the MLflow 3 way: a logged model tagged with the version
        models = json.loads(_get(f"{api}/api/2.0/mlflow/logged-models/search",
                                 {"experiment_ids": [exp_id["lbm-registry"]],
                                  "filter": f"source_run_id = '{run}'"}))["models"]
        mvs = [json.loads(next(t["value"] for t in m["info"]["tags"] if t["key"] == "mlflow.modelVersions"))
               for m in models]
        assert mvs == [[{"name": info["name"], "version": str(info["mlflow"]["model_version"])}]], models
    _, v1 = version("relight@1")
    assert f"| tuned | {link('tiny-relight-full@1')}" in v1["description"]
    assert f"/runs/{compare_runs[0]['info']['run_id']})" in v1["description"]  # the compare run judged it
    made = re.search(r"\| made from this \| (.*) \|", v1["description"]).group(1)
    for child in ("relight-avg@1", "relight-kohya@1", "relight-small@1", "relight@3"):
        assert link(child) in made, made
    base_made = re.search(r"\| made from this \| (.*) \|", version("tiny-base@1")[1]["description"]).group(1)
    assert link("tiny-relight-full@1") in base_made and link("relight@1") in base_made
    assert link("relight@1") in version("tiny-relight-full@1")[1]["description"].split("made from this")[1]
    _, kohya = version("relight-kohya@1")
    assert "| per-layer error | **exact** (imported as is) |" in kohya["description"] and "0 / 0" not in kohya["description"]
    assert f"| parent | {link('relight@1')}" in kohya["description"]
    info3, v3 = version("relight@3")
    assert f"| parent | {link('relight@1')}" in v3["description"]
    train_id = show("relight@3", st)["tags"]["lbm.train_run_id"]
    assert re.search(rf"\| training run \| \[training of relight@3 \(\d+ steps\)\]\(#/experiments/"
                     rf"{exp_id['lbm-registry-train']}/runs/{train_id}\) \|", v3["description"]), v3["description"]
    train = rest("runs/get", run_id=train_id)["run"]
    train_tags = {t["key"]: t["value"] for t in train["data"]["tags"]}
    assert train["info"]["run_name"] == "relight@3"  # named after what it produced
    assert link("relight@3") in train_tags["mlflow.note.content"]
    trained = json.loads(_get(f"{api}/api/2.0/mlflow/logged-models/search",
                              {"experiment_ids": [exp_id["lbm-registry-train"]],
                               "filter": f"source_run_id = '{train_id}'"}))["models"]
    assert len(trained) == 1 and '"version": "3"' in next(
        t["value"] for t in trained[0]["info"]["tags"] if t["key"] == "mlflow.modelVersions")
    run1 = rest("runs/get", run_id=show("relight@1", st)["mlflow"]["run_id"])["run"]
    extract_s = next(m["value"] for m in run1["data"]["metrics"] if m["key"] == "extract_seconds")
    assert int(run1["info"]["end_time"]) - int(run1["info"]["start_time"]) >= extract_s * 1000  # the real work
    run_tags = {t["key"]: t["value"] for t in compare_runs[0]["data"]["tags"]}
    assert run_tags["lbm.a_ref"] == "relight@1" and run_tags["lbm.b_ref"] == "relight@2"
    assert "(#/models/relight/versions/" in run_tags["mlflow.note.content"]
    model = rest("registered-models/get", name="relight")["registered_model"]
    assert "3 version(s)" in model["description"] and "@candidate" in model["description"]
    full = rest("registered-models/get", name="tiny-relight-full")["registered_model"]["description"]
    assert full.startswith("tiny-relight-full: a fine-tuned LBM model") and "LBM fine-tuned LBM" not in full
    from lbm_registry.api.registry import doctor

    assert doctor(st)["ok"]


def test_demo_pages_render_in_a_browser(demo, demo_ui, browser):
    """The pages as a first-time visitor's browser renders them: the registry in machine-learning
    mode (its sidebar, no GenAI one), a version page with its whole story, the experiment opening
    on its runs with each run's version in the Models column."""
    from lbm_registry.api.registry import show

    _, _, st, _ = demo
    api, _ = demo_ui
    models = browser(f"{api}/#/models")
    assert "Model registry" in models and "Prompts" not in models and "AI Gateway" not in models
    assert "tiny-relight-full" in models
    info = show("relight@1", st)
    page = browser(f"{api}/#/models/relight/versions/{info['mlflow']['model_version']}")
    for text in ("relight@1: LoRA of tiny-base@1 extracted from tiny-relight-full@1", "made from this", "relight@3",
                 "relight-kohya@1", "Probe: source | base | this version | tuned", "x-lbm.sha256"):
        assert text in page, text
    exp = json.loads(_get(f"{api}/api/2.0/mlflow/experiments/get-by-name?experiment_name=lbm-registry"))
    runs = browser(f"{api}/#/experiments/{exp['experiment']['experiment_id']}")
    # the experiment opens on its runs, and each run's Models column links the version it registered
    assert "relight@1" in runs and "Models" in runs
    assert f'href="#/models/relight/versions/{info["mlflow"]["model_version"]}"' in runs


def test_demo_refuses_a_foreign_folder(tmp_path):
    from lbm_registry.api.demo import prepare_home
    from lbm_registry.errors import LBMError

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LBMError, match="not made by the demo"):
        prepare_home(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
