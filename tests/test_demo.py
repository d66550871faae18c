"""The project's integration test: ``lbm-reg demo`` end to end on the tiny twin, offline."""

from __future__ import annotations

import json

import pytest


def test_demo_runs_the_whole_loop(tmp_path):
    from typer.testing import CliRunner

    from lbm_registry.api.registry import list_assets, resolve, show
    from lbm_registry.cli.main import app
    from lbm_registry.registry.settings import WorkspaceSettings

    home = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--home", str(home), "--train-steps", "4", "--finetune-steps", "8"])
    assert res.exit_code == 0, res.output
    assert "demo complete" in res.output
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


def test_demo_refuses_a_foreign_folder(tmp_path):
    from lbm_registry.api.demo import prepare_home
    from lbm_registry.errors import LBMError

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LBMError, match="not made by the demo"):
        prepare_home(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
