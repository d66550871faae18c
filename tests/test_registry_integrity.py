"""Integrity: concurrent registrations, kill -9 mid-registration, corrupt blobs, doctor, gc."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

from lbm_registry.api import registry as R
from lbm_registry.errors import RegistryError
from lbm_registry.settings import WorkspaceSettings

# Workers are forked from the test process after it has imported MLflow (~5 s per fresh
# interpreter on 2 cores), so each child only pays for opening the store. The parent never opens
# these workspaces' MLflow DB before the children are done (``fresh_settings``): a forked child
# must not inherit an open SQLite connection (MLflow caches one engine per URI).


def _worker(home: str, worker: int, n: int, folder: str, base_sha: str) -> list[int]:
    """Register ``n`` versions of one shared name (runs in a forked process)."""
    from pathlib import Path

    from lbm_registry.api.registry import register_asset
    from lbm_registry.settings import WorkspaceSettings

    s = WorkspaceSettings(home=Path(home))
    out = []
    for i in range(n):
        p = Path(folder) / f"w{worker}-{i}.safetensors"
        p.write_bytes(os.urandom(256) + f"{worker}-{i}".encode())
        out.append(register_asset(p, name="shared", kind="lora", settings=s, facts={"rank": 1},
                                  lineage={"base": base_sha}).version)
    return out


def test_four_processes_register_concurrently(tmp_path, fresh_settings):
    s = fresh_settings()
    with mp.get_context("fork").Pool(4) as pool:
        results = pool.starmap(_worker, [(str(s.home), w, 5, str(tmp_path), "ba" * 32) for w in range(4)])
    numbers = sorted(n for r in results for n in r)
    assert numbers == list(range(1, 21))
    assert [(r["name"], r["versions"]) for r in R.list_assets(s)] == [("shared", 20)]
    report = R.doctor(s)
    assert report["ok"], report["issues"]
    from mlflow import MlflowClient

    mvs = MlflowClient(tracking_uri=s.effective_tracking_uri).search_model_versions("name = 'shared'")
    assert len(mvs) == 20
    assert R.show("shared@7", s)["lineage"]["base"] == {"sha256": "ba" * 32, "ref": None, "registered": False}


def _register_paused(home: str, src: str, name: str, stage: str, log: str) -> None:
    """Register with the pause hook armed at ``stage`` (forked; the test SIGKILLs it there)."""
    import sys
    from pathlib import Path

    from lbm_registry.api.registry import register_asset
    from lbm_registry.registry.register import PAUSE_ENV

    sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115  (the hook reports here)
    os.environ[PAUSE_ENV] = stage
    register_asset(Path(src), name=name, kind="base", settings=WorkspaceSettings(home=Path(home)))


STAGES = ("pending", "blob", "mlflow_run", "mlflow_version")


def test_kill_mid_registration_then_repair(tmp_path, make_weights, fresh_settings):
    """One process per stage, all killed with SIGKILL there; doctor --repair cleans up all.
    The workers also create the workspace's MLflow DB concurrently (under the registry's lock)."""
    import time

    s = fresh_settings(mlflow_db=False)
    ctx = mp.get_context("fork")
    procs = {}
    for stage in STAGES:
        log = tmp_path / f"{stage}.log"
        log.touch()
        p = ctx.Process(target=_register_paused,
                        args=(str(s.home), str(make_weights()), f"killed-{stage.replace('_', '-')}", stage, str(log)))
        p.start()
        procs[stage] = (p, log)
    deadline = time.time() + 120
    try:
        for stage, (p, log) in procs.items():
            while f"paused at {stage}" not in log.read_text():
                assert p.is_alive(), f"the registration died before reaching {stage}: {log.read_text()}"
                assert time.time() < deadline, f"never reached {stage}"
                time.sleep(0.05)
            os.kill(p.pid, signal.SIGKILL)
    finally:
        for p, _ in procs.values():
            if p.is_alive():
                p.kill()
            p.join(30)
    # nothing half-made is visible
    assert R.list_assets(s) == []
    with pytest.raises(Exception, match="no usable version"):
        R.resolve("killed-blob", s)
    report = R.doctor(s)
    assert [i["kind"] for i in report["issues"]].count("pending") == len(STAGES)
    assert not report["ok"]
    repaired = R.doctor(s, repair=True)
    assert repaired["remaining"] == 0, repaired["issues"]
    after = R.doctor(s)
    assert after["ok"], after["issues"]
    assert [p for p in s.blobs_dir.rglob("*") if p.is_file()] == []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=s.effective_tracking_uri)
    for stage in STAGES:
        assert client.search_model_versions(f"name = 'killed-{stage.replace('_', '-')}'") == []
    assert client.search_runs([client.get_experiment_by_name("lbm-registry").experiment_id]) == []
    # and the name works normally afterwards, numbering restarts cleanly
    assert R.register_asset(make_weights(), name="killed-blob", kind="base", settings=s).version == 1
    assert R.doctor(s)["ok"]


def _gc_paused(home: str, log: str) -> None:
    """gc with the pause hook armed between its scan and its deletions (forked)."""
    import sys
    from pathlib import Path

    from lbm_registry.api.registry import gc
    from lbm_registry.registry.register import PAUSE_ENV

    sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115  (the hook reports here)
    os.environ[PAUSE_ENV] = "gc_scan"
    os.environ["LBM_REG_DEBUG_PAUSE_S"] = "2"
    gc(WorkspaceSettings(home=Path(home)))


def test_gc_never_deletes_a_blob_a_registration_reuses(tmp_path, make_weights, fresh_settings):
    """gc has found a blob unreferenced and is about to delete it when a registration of the same
    bytes starts: the registration must not reuse the blob and then lose it. (The blob lock
    makes it wait for gc, then store the blob again.)"""
    import time

    from lbm_registry.registry.blobs import blob_path, sha256_file, store_blob

    s = fresh_settings(mlflow_db=False)
    w = make_weights()
    sha = sha256_file(w)
    store_blob(w, sha, w.stat().st_size, s.blobs_dir)     # an orphan: no version references it
    log = tmp_path / "gc.log"
    log.touch()
    p = mp.get_context("fork").Process(target=_gc_paused, args=(str(s.home), str(log)))
    p.start()
    try:
        deadline = time.time() + 60
        while "paused at gc_scan" not in log.read_text():
            assert p.is_alive() and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        v = R.register_asset(w, name="reused", kind="base", settings=s)
    finally:
        p.join(60)
    assert p.exitcode == 0, log.read_text()
    assert v.sha256 == sha and blob_path(s.blobs_dir, sha).is_file()
    assert R.doctor(s)["ok"], R.doctor(s)["issues"]


def test_exception_mid_registration_cleans_up_after_itself(reg_settings, make_weights, monkeypatch):
    """A registration that fails after its blob is stored leaves nothing: no failed row, no orphan
    blob, no MLflow run (doctor is clean at once); the event log keeps why it failed."""
    from lbm_registry.registry import catalog, mlflow_sqlite, tracking
    from lbm_registry.registry.blobs import blob_path, sha256_file
    from lbm_registry.registry.workspace import Workspace

    def broken(self, *a, **kw):
        raise RegistryError("MLflow mirror of x failed: simulated")

    monkeypatch.setattr(tracking.Tracker, "mirror", broken)  # whichever writer mirrors (client or SQLite)
    monkeypatch.setattr(mlflow_sqlite.SqliteMirror, "mirror", broken)
    w = make_weights()
    with pytest.raises(RegistryError, match="simulated"):
        R.register_asset(w, name="will-fail", kind="base", settings=reg_settings)
    monkeypatch.undo()
    assert "will-fail" not in {r["name"] for r in R.list_assets(reg_settings)}
    assert not blob_path(reg_settings.blobs_dir, sha256_file(w)).exists()
    report = R.doctor(reg_settings)
    assert report["ok"], report["issues"]
    with Workspace.open(reg_settings) as ws:
        assert not catalog.all_versions(ws.db, status="failed")
        failed = [e for e in catalog.events(ws.db, "will-fail") if e["action"] == "register_failed"]
    assert failed and "simulated" in failed[0]["detail"]


def test_corrupt_blob_detected_and_refused(reg_settings, make_weights, tmp_path):
    s = reg_settings
    src = make_weights()
    keep = tmp_path / "original.safetensors"
    keep.write_bytes(src.read_bytes())
    a = R.register_asset(src, name="fragile", kind="model", settings=s)
    blob = a.path
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size: only a full hash notices
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    report = R.doctor(s)
    bad = [i for i in report["issues"] if i["kind"] == "corrupt_blob"]
    assert bad and "fragile@1" in bad[0]["detail"]
    with pytest.raises(RegistryError, match="fragile@1: its blob .* is corrupt"):
        R.resolve("fragile", s)
    repaired = R.doctor(s, repair=True)  # the MLflow copy is a hard link: nothing intact to restore from
    assert any(i["kind"] == "corrupt_blob" and not i["fixed"] for i in repaired["issues"])
    # registering the original bytes again restores the blob
    again = R.register_asset(keep, name="fragile", kind="model", settings=s)
    assert again.version == 2
    assert R.resolve("fragile@1", s).sha256 == a.sha256
    fixed = R.doctor(s, repair=True)
    assert fixed["ok"], fixed["issues"]


def test_truncated_or_missing_blob_refused_by_resolve(reg_settings, make_weights):
    s = reg_settings
    a = R.register_asset(make_weights(), name="shrunk", kind="model", settings=s)
    original = a.path.read_bytes()
    os.chmod(a.path, 0o644)
    a.path.write_bytes(original[:-10])
    with pytest.raises(RegistryError, match="corrupt .* bytes, expected"):
        R.resolve("shrunk", s)
    a.path.unlink()
    with pytest.raises(RegistryError, match="missing"):
        R.resolve("shrunk", s)
    a.path.write_bytes(original)  # put it back: doctor finds it whole (and read-only again with repair)
    report = R.doctor(s, repair=True)
    assert report["ok"], report["issues"]
    assert R.resolve("shrunk", s).version == 1


def test_doctor_repairs_orphans_and_lost_mlflow_versions(reg_settings, make_weights):
    s = reg_settings
    a = R.register_asset(make_weights(), name="drifty", kind="base", settings=s)
    orphan = s.blobs_dir / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"nobody")
    tmp = s.blobs_dir / "ab" / ".tmp-999999999-dead"
    tmp.write_bytes(b"half")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=s.effective_tracking_uri)
    info = R.show(a.ref, s)
    client.delete_model_version("drifty", info["mlflow"]["model_version"])
    stray = client.create_run(client.get_experiment_by_name("lbm-registry").experiment_id,
                              tags={"lbm.version_id": "999999", "lbm.name": "drifty"})
    report = R.doctor(s)
    kinds = {i["kind"] for i in report["issues"]}
    assert {"orphan_blob", "temp_file", "mlflow_missing", "mlflow_orphan_run"} <= kinds
    repaired = R.doctor(s, repair=True)
    assert repaired["remaining"] == 0, repaired["issues"]
    assert not orphan.exists() and not tmp.exists()
    assert client.get_run(stray.info.run_id).info.lifecycle_stage == "deleted"
    new = R.show(a.ref, s)["mlflow"]
    mv = client.get_model_version("drifty", new["model_version"])
    assert mv.tags["x-lbm.sha256"] == a.sha256
    assert R.doctor(s)["ok"]


def test_workspace_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LBM_REG_HOME", str(tmp_path / "envhome"))
    monkeypatch.setenv("LBM_REG_CATALOG_URL", "sqlite:///" + str(tmp_path / "other.db"))
    s = WorkspaceSettings.resolve()
    assert s.home == tmp_path / "envhome"
    assert s.effective_catalog_url.endswith("other.db")
    # a read refuses a catalog that was never initialised (named as the catalog: it is configured
    # apart from the home)...
    with pytest.raises(RegistryError, match="no catalog at .*other.db"):
        R.list_assets(s)
    assert not (tmp_path / "other.db").exists()  # ...and creates nothing
    assert not (tmp_path / "envhome").exists()


def test_sqlalchemy_code_path(fresh_settings, make_weights, monkeypatch):
    """The catalog code that serves PostgreSQL (SQLAlchemy ``text()``), exercised on SQLite by
    disabling the stdlib ``sqlite3`` fast path."""
    from lbm_registry.registry import db as db_mod

    monkeypatch.setattr(db_mod, "sqlite_path", lambda url: None)
    s = fresh_settings(mlflow_db=True)
    base = R.register_asset(make_weights(), name="pg-base", kind="base", settings=s, config={"name": "x"})
    l1 = R.register_asset(make_weights(), name="pg-lora", kind="lora", settings=s, lineage={"base": base},
                          facts={"rank": 2, "layers": [{"module": "a", "rank": 2, "rel_error": 0.5}]})
    l2 = R.register_asset(make_weights(), name="pg-lora", kind="lora", settings=s, lineage={"base": base, "parent": l1})
    assert (l1.version, l2.version) == (1, 2)
    R.set_alias("pg-lora@1", "prod", s)
    assert R.resolve("pg-lora@prod", s).sha256 == l1.sha256
    assert R.resolve(f"sha256:{l2.sha256[:9]}", s).ref == "pg-lora@2"
    assert R.lineage_tree("pg-base", s)["down"][0]["down"][0]["ref"] == "pg-lora@2"
    R.update_facts(l2, {"functional_error": 0.5}, s)
    assert R.show("pg-lora", s)["lora"]["functional_error"] == 0.5
    assert R.doctor(s)["ok"]
