"""Registration's MLflow mirror without MLflow (registry/mlflow_sqlite.py): the rows it writes are
the rows MLflow's own SQL stores write, and the MLflow client reads them back as its own.

The proof of fidelity is a diff: the same registrations mirrored once through the MLflow client
(``Tracker``) and once straight into SQLite (``SqliteMirror``), in two workspaces, give the same
rows in every table of ``mlflow.db`` and the same artifact files, once run ids, timestamps, home
folders and catalog ids are normalised.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from fixtures.registry import lora_facts, write_weights
from PIL import Image

TIME_COLUMNS = {"creation_time", "last_updated_time", "last_update_time", "start_time", "end_time", "timestamp",
                "deleted_time", "creation_timestamp_ms", "last_updated_timestamp_ms"}
VARYING_METRICS = {"register_seconds", "hash_seconds"}


def _register_all(settings, files: Path) -> None:
    """A base with a picture, a model, an extracted-style LoRA (layers, lineage) and its child
    (parent, dataset, training config, user tags), a second base version, then a picture added
    to the model's run afterwards (its page rebuilt)."""
    import hashlib

    from mlflow import MlflowClient

    from lbm_registry.api.registry import attach_artifact, register_asset

    # a compare run that judged the second base version (linked from its page), and the training
    # run of the LoRA child (linked both ways: renamed, described, given a logged model)
    base2 = write_weights(files / "base2.safetensors", 5)
    client = MlflowClient(tracking_uri=settings.effective_tracking_uri)
    exp = client.create_experiment("lbm-registry-compare",
                                   artifact_location=(settings.home / "artifacts" / "compare").as_uri())
    judged = hashlib.sha256(base2.read_bytes()).hexdigest()
    client.create_run(exp, run_name="cmp", tags={"lbm.compared": f"{'0' * 16},{judged[:16]}"})
    train_exp = client.create_experiment("lbm-registry-train", artifact_location=(settings.home / "artifacts").as_uri())
    train_run = client.create_run(train_exp, run_name="eq-lora", tags={"lbm.kind": "lora-training"}).info.run_id
    client.set_terminated(train_run, "FINISHED")
    png = files / "probe.png"
    if not png.exists():
        Image.new("RGB", (8, 4), "red").save(png)
    shard = files / "shard-0000.tar"
    shard.write_bytes(b"not really a tar")
    base = register_asset(write_weights(files / "base.safetensors", 1), name="eq-base", kind="base",
                          settings=settings, config={"name": "lbm-tiny"}, artifacts={"probe.png": png})
    tuned = register_asset(write_weights(files / "tuned.safetensors", 2), name="eq-tuned", kind="model",
                           settings=settings, config={"name": "lbm-tiny"})
    l1 = register_asset(write_weights(files / "l1.safetensors", 3), name="eq-lora", kind="lora", settings=settings,
                        facts=lora_facts(4), lineage={"base": base, "tuned": tuned},
                        params={"extract_seconds": 1.5}, metrics={"extract_seconds": 1.5, "huge": float("inf")})
    register_asset(write_weights(files / "l2.safetensors", 4), name="eq-lora", kind="lora", settings=settings,
                   facts=lora_facts(8), lineage={"base": base.sha256, "parent": l1,
                                                 "datasets": [{"path": str(shard), "sha256": "ab" * 32}],
                                                 "training_config": {"max_steps": 10}},
                   tags={"team": "vision", "lbm.note": "hello: world", "lbm.train_run_id": train_run})
    register_asset(base2, name="eq-base", kind="base", settings=settings)
    attach_artifact(tuned, png, settings)  # what the background probe does once the version is ready


def _normaliser(settings):
    from lbm_registry.registry import catalog
    from lbm_registry.registry.workspace import Workspace

    with sqlite3.connect(settings.home / "mlflow.db") as conn:
        runs = {rid: f"{exp}/{name}" for rid, exp, name in conn.execute("SELECT run_uuid, experiment_id, name FROM runs")}
    with Workspace.open(settings) as ws:
        cat = catalog.catalog_id(ws.db)
    subs = [(rid, f"<run {name}>") for rid, name in runs.items()]
    subs += [(rid[:12], f"<run {name} prefix>") for rid, name in runs.items()]  # link labels
    subs += [(str(settings.home), "<home>"), (cat, "<cat>")]

    def norm(value):
        if isinstance(value, str):
            for old, new in subs:
                value = value.replace(old, new)
            value = re.sub(r"model_uuid: \w+", "model_uuid: <uuid>", value)
            value = re.sub(r"\bm-[0-9a-f]{32}\b", "<logged model>", value)
            value = re.sub(r"utc_time_created: '[^']*'", "utc_time_created: <time>", value)
        return value

    return norm


def _dump(settings) -> dict[str, list[tuple]]:
    """Every row of every table of the workspace's mlflow.db, normalised and sorted."""
    norm = _normaliser(settings)
    out: dict[str, list[tuple]] = {}
    with sqlite3.connect(settings.home / "mlflow.db") as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        for table in tables:
            cur = conn.execute(f'SELECT * FROM "{table}"')
            cols = [d[0] for d in cur.description]
            rows = []
            for row in cur.fetchall():
                rec = dict(zip(cols, row, strict=True))
                for c in cols:
                    if c in TIME_COLUMNS and rec[c] is not None:
                        rec[c] = "<time>"
                if table in ("metrics", "latest_metrics") and rec.get("key") in VARYING_METRICS:
                    rec["value"] = "<seconds>"
                if table == "inputs":
                    rec["input_uuid"] = "<uuid>"
                rows.append(tuple((c, norm(rec[c])) for c in cols))
            out[table] = sorted(rows, key=repr)
    return out


def _artifacts(settings) -> dict[str, bytes | str]:
    norm = _normaliser(settings)
    out: dict[str, bytes | str] = {}
    for p in sorted((settings.home / "artifacts").rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            try:
                out[norm(str(p))] = norm(data.decode())
            except UnicodeDecodeError:
                out[norm(str(p))] = data
    return out


def test_sqlite_mirror_writes_what_mlflow_writes(fresh_settings, tmp_path, monkeypatch):
    from lbm_registry.api.registry import init_workspace
    from lbm_registry.registry import mlflow_sqlite
    from lbm_registry.registry.mlflow_sqlite import SqliteMirror
    from lbm_registry.registry.tracking import Tracker

    files = tmp_path / "files"
    files.mkdir()
    through_client, direct = fresh_settings(), fresh_settings()
    for s in (through_client, direct):
        init_workspace(s)  # the experiment exists: from here on the fast path applies
    used: list[str] = []
    real_sql, real_client = SqliteMirror.mirror, Tracker.mirror
    monkeypatch.setattr(SqliteMirror, "mirror", lambda self, *a, **k: (used.append("sql"), real_sql(self, *a, **k))[1])
    monkeypatch.setattr(Tracker, "mirror", lambda self, *a, **k: (used.append("client"), real_client(self, *a, **k))[1])
    real_refresh = Tracker.refresh_version
    monkeypatch.setattr(Tracker, "refresh_version",
                        lambda self, rec: (used.append("client refresh"), real_refresh(self, rec))[1])
    with monkeypatch.context() as m:
        m.setattr(mlflow_sqlite.SqliteMirror, "open", classmethod(lambda cls, ws: None))
        _register_all(through_client, files)
    # each LoRA's registration rebuilds the pages of what it was made from ("made from this")
    refresh = "client refresh"
    assert used == ["client"] * 3 + [refresh] * 2 + ["client"] + [refresh] * 2 + ["client", refresh]
    used.clear()
    _register_all(direct, files)
    assert used == ["sql"] * 5  # no fallback to the client on the way
    want, got = _dump(through_client), _dump(direct)
    assert want.keys() == got.keys()
    for table in want:
        assert got[table] == want[table], table
    assert len(got["runs"]) == 7 and len(got["model_versions"]) == 5 and len(got["latest_metrics"]) > 20
    pages = {(dict(r)["name"], dict(r)["version"]): dict(r)["description"] for r in got["model_versions"]}
    assert "| compared | [cmp](#/experiments/2/runs/<run 2/cmp>) |" in pages["eq-base", 2]
    assert "| training run | [training of eq-lora@2](#/experiments/3/runs/<run 3/eq-lora@2>) |" in pages["eq-lora", 2]
    # lineage both ways: what was made from a version is linked from its page
    assert "| made from this | [eq-lora@1](#/models/eq-lora/versions/1) (LoRA), " \
           "[eq-lora@2](#/models/eq-lora/versions/2) (LoRA) |" in pages["eq-base", 1]
    assert "| made from this | [eq-lora@1](#/models/eq-lora/versions/1) (extracted) |" in pages["eq-tuned", 1]
    assert "| made from this | [eq-lora@2](#/models/eq-lora/versions/2) (fine-tuned) |" in pages["eq-lora", 1]
    assert pages["eq-lora", 2].startswith("eq-lora@2: LoRA of eq-base@1 fine-tuned from eq-lora@1, rank 8/")
    # every version is a logged model of its own run, the trained one of its training run too
    models = {(dict(r)["name"], dict(r)["source_run_id"]) for r in got["logged_models"]}
    assert models == {("eq-base@1", "<run 1/eq-base@1>"), ("eq-tuned@1", "<run 1/eq-tuned@1>"),
                      ("eq-lora@1", "<run 1/eq-lora@1>"), ("eq-lora@2", "<run 1/eq-lora@2>"),
                      ("eq-lora@2", "<run 3/eq-lora@2>"), ("eq-base@2", "<run 1/eq-base@2>")}
    assert len(got["inputs"]) == 6
    assert _artifacts(direct) == _artifacts(through_client)
    from lbm_registry.api.registry import doctor

    for s in (direct, through_client):  # every page is what the catalog says, every run links its version
        report = doctor(s)
        assert report["ok"], report["issues"]


def test_mlflow_reads_fast_path_versions(fresh_settings, tmp_path, tiny_base_path, monkeypatch):
    """What the MLflow client and pyfunc see of versions registered without MLflow."""
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    from mlflow import MlflowClient

    from lbm_registry.api.assets.models import import_model
    from lbm_registry.api.registry import init_workspace, set_alias, show
    from lbm_registry.registry.mlflow_sqlite import SqliteMirror
    from lbm_registry.registry.workspace import Workspace

    s = fresh_settings()
    init_workspace(s)
    with Workspace.open(s) as ws:
        assert SqliteMirror.open(ws) is not None
    files = tmp_path / "files"
    files.mkdir()
    _register_all(s, files)
    monkeypatch.setenv("LBM_REG_PROBE", "off")
    tb = import_model(tiny_base_path, name="eq-tiny", kind="base", settings=s)
    client = MlflowClient(tracking_uri=s.effective_tracking_uri, registry_uri=s.effective_tracking_uri)
    info = show("eq-lora@2", s)
    run = client.get_run(info["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.lifecycle_stage == "active"
    assert run.info.run_name == "eq-lora@2" and run.data.tags["mlflow.runName"] == "eq-lora@2"
    assert run.data.params["parent"] == "eq-lora@1" and run.data.tags["team"] == "vision"
    assert run.data.metrics["mean_error"] == pytest.approx(0.08)
    assert run.info.artifact_uri.endswith(f"/{run.info.run_id}/artifacts")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"facts.json", "layers.csv", "weights"}
    mv = client.get_model_version("eq-lora", "2")
    assert mv.status == "READY" and mv.current_stage == "None" and mv.run_id == run.info.run_id
    assert mv.tags["x-lbm.parent_ref"] == "eq-lora@1" and mv.source == f"{run.info.artifact_uri}/weights"
    assert mv.description.startswith("eq-lora@2: LoRA of eq-base@1")
    # what the UI's Models column and run page read (MLflow 3): the run's logged model, tagged
    # with the registered version, and listed among the run's outputs
    [logged] = client.search_logged_models([run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'")
    assert logged.status.name == "READY" and logged.name == "eq-lora@2"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "eq-lora", "version": "2"}]
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    train = client.get_run(run.data.tags["lbm.train_run_id"])
    assert train.info.run_name == "eq-lora@2" and "#/models/eq-lora/versions/2" in train.data.tags["mlflow.note.content"]
    [trained] = client.search_logged_models([train.info.experiment_id],
                                            filter_string=f"source_run_id = '{train.info.run_id}'")
    assert json.loads(trained.tags["mlflow.modelVersions"]) == [{"name": "eq-lora", "version": "2"}]
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'eq-lora'")) == ["1", "2"]
    assert client.get_registered_model("eq-base").tags == {"lbm.kind": "base"}
    assert "2 version(s)" in client.get_registered_model("eq-base").description
    set_alias("eq-lora@1", "prod", s)
    assert str(client.get_model_version_by_alias("eq-lora", "prod").version) == "1"
    assert client.get_metric_history(run.info.run_id, "mean_error")[0].value == pytest.approx(0.08)
    # the fast path's MLmodel is a loadable pyfunc model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s.effective_tracking_uri)
    monkeypatch.setenv("LBM_REG_HOME", str(s.home))
    monkeypatch.setenv("LBM_REG_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype("uint8")).save(src)
    import base64

    model = mlflow.pyfunc.load_model(f"models:/eq-tiny/{tb.version}")
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(src.read_bytes()).decode()]}))
    assert list(out.columns) == ["image"]


def test_mlmodel_text_is_mlflows(tmp_path):
    """The MLmodel written without MLflow is what mlflow.models.Model writes."""
    from mlflow.models import Model

    from lbm_registry.registry.mlmodel import CODE_FILE, mlmodel_text, signature

    flavor = {"loader_module": "mlflow.pyfunc.loaders.code_model", "python_version": "3.11.2",
              "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
              "config": {"format": 1, "kind": "lora", "ref": "a@1", "config": '{"x": 1}',
                         "base": {"sha256": "ab", "size": 3, "models_uri": "models:/b/1"}},
              "model_code_path": CODE_FILE, "artifacts": {"weights": {"path": "f.safetensors", "uri": "f.safetensors"}},
              "streamable": False}

    def norm(text: str) -> str:
        return re.sub(r"utc_time_created: .*", "", re.sub(r"model_uuid: \w+", "", text))

    for run_id in ("0" * 32, None):
        model = Model(artifact_path="weights", run_id=run_id, signature=signature())
        model.add_flavor("python_function", **flavor)
        model.model_size_bytes = 12
        model.mlflow_version = "3.17.0"
        assert norm(mlmodel_text(flavor, run_id=run_id, size=12, mlflow_version="3.17.0")) == norm(model.to_yaml())


def test_a_failed_fast_mirror_leaves_nothing(fresh_settings, make_weights, monkeypatch):
    """An error inside the mirror's transaction: no row and no artifact folder of the run stays,
    and the version is marked failed (register.py's cleanup)."""
    from lbm_registry.api.registry import init_workspace, register_asset
    from lbm_registry.errors import RegistryError
    from lbm_registry.registry import mirror

    s = fresh_settings()
    init_workspace(s)
    before = _dump(s)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mirror, "write_local", boom)
    with pytest.raises(RegistryError, match="disk full"):
        register_asset(make_weights(), name="eq-fail", kind="base", settings=s)
    assert _dump(s) == before
    assert [p for p in (s.home / "artifacts").rglob("*") if p.is_file()] == []


def test_discard_removes_the_folder_of_a_run_that_never_committed(fresh_settings):
    """A registration killed inside the fast mirror's transaction leaves its artifact folder and a
    run id in the catalog, but no run: cleanup (doctor --repair, through the client) removes it."""
    import uuid

    from lbm_registry.api.registry import init_workspace
    from lbm_registry.registry.mlflow_sqlite import SqliteMirror
    from lbm_registry.registry.tracking import Tracker
    from lbm_registry.registry.workspace import Workspace

    s = fresh_settings()
    init_workspace(s)
    with Workspace.open(s) as ws:
        for cleaner in (Tracker(ws), SqliteMirror.open(ws)):
            run_id = uuid.uuid4().hex
            folder = ws.artifacts_dir / run_id / "artifacts" / "weights"
            folder.mkdir(parents=True)
            (folder / "w.safetensors").write_bytes(b"x")
            cleaner.discard("never", run_id, None)
            assert not (ws.artifacts_dir / run_id).exists(), type(cleaner).__name__
        kept = ws.artifacts_dir / ("f" * 32)
        kept.mkdir()
        Tracker(ws).discard("never", "../" + "f" * 29, None)  # not a run id: never a path
        assert kept.exists()


def test_doctor_finds_and_removes_a_run_folder_no_run_owns(fresh_settings, make_weights):
    """A fast mirror killed between writing its files and committing, with no catalog row left
    to remember its run id, leaves only ``<artifacts>/<run id>/``: doctor reports it, --repair
    removes it, and the folders of real runs (and anything not named like a run) stay."""
    from lbm_registry.api.registry import doctor, register_asset

    s = fresh_settings()
    register_asset(make_weights(), name="kept", kind="base", settings=s)
    root = s.home / "artifacts"
    real = [p for p in root.iterdir() if p.is_dir()]
    assert len(real) == 1
    orphan = root / ("0123abcd" * 4) / "artifacts" / "weights"
    orphan.mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"half a mirror")
    other = root / "notes"
    other.mkdir()

    report = doctor(s)
    found = [i for i in report["issues"] if i["kind"] == "mlflow_orphan_folder"]
    assert [i["subject"] for i in found] == ["0123abcd" * 4] and not report["ok"]
    assert orphan.exists()  # reported, not touched, without --repair
    repaired = doctor(s, repair=True)
    assert repaired["remaining"] == 0, repaired["issues"]
    assert not (root / ("0123abcd" * 4)).exists()
    assert real[0].is_dir() and other.is_dir()
    assert doctor(s)["ok"]
