"""The registry against real servers: a PostgreSQL catalog and a remote MLflow tracking server.

``--catalog-url postgresql+psycopg://...`` and ``--tracking-uri http://...`` point the same code
at them (see ``tests/fixtures/servers.py`` for how the throwaway servers are started). The
PostgreSQL tests skip, saying why, where no server binaries can be found; the MLflow server is
always there (MLflow is a dependency).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.registry import lora_facts, schema_diff, write_weights

from lbm_registry.api import registry as R
from lbm_registry.errors import RefError, RegistryError
from lbm_registry.registry import catalog, schema
from lbm_registry.registry.workspace import Workspace
from lbm_registry.settings import WorkspaceSettings

TABLES = {"assets", "versions", "lineage", "lora_facts", "layer_errors", "aliases", "tags", "events", "registry_info",
          "file_hashes", "alembic_version"}
_db_names = (f"catalog_{i}" for i in itertools.count())


@pytest.fixture(scope="module", autouse=True)
def _mlflow_server_boots_meanwhile(mlflow_server_started):
    """Start the MLflow server first: it boots (10-25 s) while the PostgreSQL tests run."""


@pytest.fixture
def pg_catalog(pg_server):
    """Factory: the URL of a new, empty catalog database."""
    return lambda: pg_server.create_database(next(_db_names))


def _home(tmp_path_factory, mlflow_template=None) -> Path:
    import shutil

    home = tmp_path_factory.mktemp("remote") / "home"
    home.mkdir()
    if mlflow_template is not None:
        shutil.copyfile(mlflow_template, home / "mlflow.db")
    return home


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tables(url: str) -> set[str]:
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()




# -- PostgreSQL catalog --------------------------------------------------------------------
def test_pg_migrations_from_empty_idempotent_and_match_models(pg_catalog, tmp_path):
    url = pg_catalog()
    s = WorkspaceSettings(home=tmp_path / "home", catalog_url=url)
    assert _tables(url) == set()
    with Workspace.open(s) as ws:
        assert not ws.db.is_sqlite
        assert schema.current_revision(ws.db) == schema.SCHEMA_HEAD
        first_id = catalog.catalog_id(ws.db)
    assert _tables(url) == TABLES and len(first_id) == 32
    for _ in range(2):  # idempotent: opening again, or running Alembic again, changes nothing
        with Workspace.open(s) as ws:
            schema.upgrade(ws.db)
            assert schema.current_revision(ws.db) == schema.SCHEMA_HEAD
            assert ws.db.scalar("SELECT count(*) FROM alembic_version") == 1
        assert catalog.catalog_id(ws.db) == first_id
    assert schema_diff(url) == []


def test_pg_upgrade_from_an_older_revision(pg_catalog, tmp_path):
    """A catalog made by revision 0001 is upgraded in place on first open (and gets an id)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    url = pg_catalog()
    cfg = Config()
    cfg.set_main_option("script_location", str(schema.migrations_dir()))
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
    finally:
        engine.dispose()
    assert "registry_info" not in _tables(url)
    s = WorkspaceSettings(home=tmp_path / "home", catalog_url=url)
    assert R.list_assets(s) == []  # a read upgrades it
    with Workspace.open(s) as ws:
        assert schema.current_revision(ws.db) == schema.SCHEMA_HEAD and len(catalog.catalog_id(ws.db)) == 32


def test_pg_concurrent_first_migration_from_separate_homes(pg_catalog, tmp_path):
    """Machines sharing one catalog server share no file lock: the migration must still run once."""
    url = pg_catalog()
    code = ("import sys, pathlib;from lbm_registry.settings import WorkspaceSettings as S;"
            "from lbm_registry.registry.workspace import Workspace as W;"
            "W.open(S(home=pathlib.Path(sys.argv[1]), catalog_url=sys.argv[2])).close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"home{i}"), url],
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0, 0, 0], [err[-500:] for _, err in results]
    assert _tables(url) == TABLES


@pytest.fixture(scope="module")
def pg_populated(pg_server, tmp_path_factory, mlflow_template):
    """A workspace whose catalog is on PostgreSQL (MLflow: the local SQLite DB): base@1,
    tuned@1, relight@1 (base+tuned), relight@2 (child of relight@1, trained on a shard)."""
    s = WorkspaceSettings(home=_home(tmp_path_factory, mlflow_template),
                          catalog_url=pg_server.create_database("populated"))
    folder = tmp_path_factory.mktemp("pg-files")
    base = R.register_asset(write_weights(folder / "base.safetensors", 1), name="sdxl-base", kind="base",
                            settings=s, config={"name": "lbm-tiny"})
    tuned = R.register_asset(write_weights(folder / "tuned.safetensors", 2), name="tuned", kind="model",
                             settings=s, config={"name": "lbm-tiny"})
    l1 = R.register_asset(write_weights(folder / "l1.safetensors", 3), name="relight", kind="lora", settings=s,
                          facts=lora_facts(4), lineage={"base": base, "tuned": tuned}, metrics={"extract_seconds": 1.5})
    l2 = R.register_asset(write_weights(folder / "l2.safetensors", 4), name="relight", kind="lora", settings=s,
                          facts=lora_facts(8), lineage={"base": base.sha256, "parent": l1,
                                                        "datasets": [{"path": "shard-0000.tar", "sha256": "ab" * 32}],
                                                        "training_config": {"max_steps": 10}},
                          tags={"team": "vision"})
    return {"settings": s, "base": base, "tuned": tuned, "l1": l1, "l2": l2, "folder": folder}


def test_pg_register_and_resolve_every_reference_form(pg_populated, tmp_path):
    p = pg_populated
    s, l1, l2 = p["settings"], p["l1"], p["l2"]
    assert (l1.ref, l2.ref, p["base"].ref, p["tuned"].ref) == ("relight@1", "relight@2", "sdxl-base@1", "tuned@1")
    assert l1.facts["rank"] == 4 and l1.facts["base_sha256"] == p["base"].sha256
    assert [r["module"] for r in R.layer_table(l1, s)] == ["a", "b"]
    R.set_alias("relight@1", "prod", s)
    cases = {"relight": 2, "relight@latest": 2, "relight@1": 1, "relight@v1": 1, "relight@V2": 2,
             "relight@prod": 1, f"sha256:{l1.sha256[:8]}": 1, f"sha256:{l2.sha256.upper()[:12]}": 2,
             f"sha256:{l2.sha256}": 2}
    for ref, version in cases.items():
        a = R.resolve(ref, s)
        assert (a.name, a.version, a.sha256) == ("relight", version, (l1, l2)[version - 1].sha256), ref
        assert _sha(a.path) == a.sha256
    assert R.resolve("v1", s, relative_to=l2).ref == "relight@1"  # compare's bare version
    assert R.resolve("2", s).ref == "relight@2"  # the only LoRA
    assert R.resolve("sdxl-base", s, kinds=("base",)).kind == "base"
    loose = tmp_path / "loose.safetensors"
    loose.write_bytes(b"x" * 100)
    a = R.resolve(str(loose), s)
    assert a.kind == "file" and a.sha256 == hashlib.sha256(b"x" * 100).hexdigest()
    assert R.resolve(str(loose), s).sha256 == a.sha256  # from the hash cache this time
    with pytest.raises(RefError, match="did you mean relight"):
        R.resolve("relite@1", s)
    with pytest.raises(RefError, match="has no version 7"):
        R.resolve("relight@7", s)
    with pytest.raises(RefError, match="no alias 'prd'.*prod"):
        R.resolve("relight@prd", s)
    with pytest.raises(RegistryError, match="is a lora"):
        R.register_asset(write_weights(tmp_path / "x.safetensors", 99), name="relight", kind="base", settings=s)


def test_pg_aliases_list_show_lineage(pg_populated, cli):
    p = pg_populated
    s, l2 = p["settings"], p["l2"]
    url = s.catalog_url
    assert R.set_alias("relight@2", "staging", s)["previous"] is None
    assert R.set_alias("relight@1", "staging", s)["previous"] == 2  # moved
    assert R.resolve("relight@staging", s).version == 1
    assert R.remove_alias("relight", "staging", s)["version"] == 1
    with pytest.raises(RefError, match="no alias 'staging'"):
        R.remove_alias("relight", "staging", s)
    R.set_alias("relight@1", "prod", s)

    rows = {r["name"]: r for r in R.list_assets(s)}
    assert {n: (r["kind"], r["latest"], r["versions"]) for n, r in rows.items()} == {
        "relight": ("lora", 2, 2), "sdxl-base": ("base", 1, 1), "tuned": ("model", 1, 1)}
    assert rows["relight"]["aliases"] == {"prod": 1} and rows["relight"]["rank"] == 8
    assert [r["name"] for r in R.list_assets(s, kind="lora")] == ["relight"]
    info = R.show("relight@prod", s)
    assert info["ref"] == "relight@1" and info["aliases"] == ["prod"]
    assert info["lineage"]["tuned"] == {"sha256": p["tuned"].sha256, "ref": "tuned@1", "registered": True}
    assert info["descendants"] == [{"ref": "relight@2", "kind": "lora", "role": "parent", "sha256": l2.sha256}]
    assert info["metrics"]["extract_seconds"] == 1.5 and info["mlflow"]["model_version"] == "1"
    assert R.show("relight@2", s)["lineage"]["datasets"] == [{"path": "shard-0000.tar", "sha256": "ab" * 32}]
    assert {h["action"] for h in info["history"]} >= {"register", "register_started", "alias_set", "alias_rm"}
    tree = R.lineage_tree("relight@2", s)
    assert {e["role"]: e["ref"] for e in tree["up"]} == {"base": "sdxl-base@1", "parent": "relight@1",
                                                         "dataset": "shard-0000.tar"}
    down = R.lineage_tree("sdxl-base", s)["down"]
    assert [d["ref"] for d in down] == ["relight@1"] and [d["ref"] for d in down[0]["down"]] == ["relight@2"]
    R.update_facts(l2, {"functional_error": 0.25, "validated": True}, s)
    assert R.show("relight@2", s)["lora"]["functional_error"] == 0.25

    # the CLI, pointed at the server by --catalog-url, and by the environment (postgres:// spelling)
    rc, out, err = cli("--home", s.home, "--catalog-url", url, "list", "--json")
    assert rc == 0, err
    assert {r["name"] for r in json.loads(out)} == {"relight", "sdxl-base", "tuned"}
    env_url = "postgres://" + url.split("://", 1)[1]
    os.environ["LBM_REG_CATALOG_URL"] = env_url
    try:
        rc, out, err = cli("--home", s.home, "show", "relight@prod", "--json")
        assert rc == 0, err
        assert json.loads(out)["ref"] == "relight@1"
        rc, out, err = cli("--home", s.home, "lineage", "relight@2")
        assert rc == 0 and "relight@1" in out and "sdxl-base@1" in out, err
        rc, out, err = cli("--home", s.home, "alias", "set", "relight@2", "canary")
        assert rc == 0, err
    finally:
        del os.environ["LBM_REG_CATALOG_URL"]
    assert R.resolve("relight@canary", s).version == 2
    report = R.doctor(s)
    assert report["ok"], report["issues"]


def _pg_worker(home: str, url: str, tracking: str | None, worker: int, n: int, folder: str) -> list[int]:
    """Register ``n`` versions of one shared name (a forked process)."""
    from lbm_registry.api.registry import register_asset

    s = WorkspaceSettings(home=Path(home), catalog_url=url, tracking_uri=tracking)
    out = []
    for i in range(n):
        p = Path(folder) / f"w{worker}-{i}.safetensors"
        p.write_bytes(os.urandom(256) + f"{worker}-{i}".encode())
        out.append(register_asset(p, name="shared", kind="lora", settings=s, facts={"rank": 1},
                                  lineage={"base": "ba" * 32}).version)
    return out


def test_pg_and_remote_mlflow_concurrent_registration(pg_catalog, mlflow_server, tmp_path_factory):
    """Four processes register versions of one name at once, catalog on PostgreSQL and MLflow on
    the server (neither has the workspace's file locks to lean on): distinct, gapless numbers,
    one MLflow model version each, and doctor finds nothing to fix."""
    from mlflow import MlflowClient

    home, folder = _home(tmp_path_factory), tmp_path_factory.mktemp("conc-files")
    s = WorkspaceSettings(home=home, catalog_url=pg_catalog(), tracking_uri=mlflow_server.uri)
    Workspace.open(s).close()  # the catalog exists; the experiment is created by the racing workers
    workers, each = 4, 3
    with mp.get_context("fork").Pool(workers) as pool:
        results = pool.starmap(_pg_worker, [(str(home), s.catalog_url, s.tracking_uri, w, each, str(folder))
                                            for w in range(workers)])
    numbers = sorted(n for r in results for n in r)
    assert numbers == list(range(1, workers * each + 1))
    assert all(r == sorted(r) for r in results)
    assert [(r["name"], r["versions"]) for r in R.list_assets(s)] == [("shared", workers * each)]
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    mvs = client.search_model_versions("name = 'shared'")
    assert sorted(int(mv.version) for mv in mvs) == numbers
    by_version = {R.show(f"shared@{n}", s)["mlflow"]["model_version"]: n for n in numbers}
    for mv in mvs:  # the run behind each model version names the catalog version
        assert client.get_run(mv.run_id).data.tags["lbm.version"] == str(by_version[mv.version])
    report = R.doctor(s)
    assert report["ok"], report["issues"]


def _register_paused(home: str, url: str, src: str, stage: str, log: str) -> None:
    """Register with the pause hook armed at ``stage`` (forked; the test SIGKILLs it there)."""
    from lbm_registry.registry.register import PAUSE_ENV

    sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115  (the hook reports here)
    os.environ[PAUSE_ENV] = stage
    R.register_asset(Path(src), name="killed", kind="base", settings=WorkspaceSettings(home=Path(home),
                                                                                         catalog_url=url))


def test_pg_kill_mid_registration_then_doctor_repair(pg_catalog, tmp_path_factory, mlflow_template, tmp_path):
    s = WorkspaceSettings(home=_home(tmp_path_factory, mlflow_template), catalog_url=pg_catalog())
    Workspace.open(s).close()
    src = write_weights(tmp_path / "k.safetensors", 7)
    log = tmp_path / "paused.log"
    log.touch()
    proc = mp.get_context("fork").Process(target=_register_paused,
                                          args=(str(s.home), s.catalog_url, str(src), "mlflow_run", str(log)))
    proc.start()
    deadline = time.time() + 120
    try:
        while "paused at mlflow_run" not in log.read_text():
            assert proc.is_alive() and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(30)
    assert R.list_assets(s) == []  # nothing half-made is visible
    report = R.doctor(s)
    assert [i["kind"] for i in report["issues"]] == ["pending"] and not report["ok"]
    repaired = R.doctor(s, repair=True)
    assert repaired["remaining"] == 0, repaired["issues"]
    assert R.doctor(s)["ok"]
    assert R.register_asset(src, name="killed", kind="base", settings=s).version == 1  # numbering restarts


def test_pg_errors_are_one_line_and_mask_the_password(pg_server, tmp_path):
    bad = WorkspaceSettings(home=tmp_path / "h", catalog_url=f"postgresql://postgres:s3cret@127.0.0.1:{_closed_port()}/x")
    # our own connection check answers (a 10 s connect timeout), not a driver retry loop
    with pytest.raises(RegistryError, match=r"cannot connect to the catalog postgresql://postgres:\*\*\*@") as exc:
        R.list_assets(bad)
    assert "s3cret" not in str(exc.value)
    missing = WorkspaceSettings(home=tmp_path / "h", catalog_url=pg_server.url("no_such_db"))
    with pytest.raises(RegistryError, match='database "no_such_db" does not exist'):
        R.list_assets(missing)
    nodriver = WorkspaceSettings(home=tmp_path / "h", catalog_url=pg_server.url(driver="postgresql+pg8000"))
    with pytest.raises(RegistryError, match=r"lbm-registry\[postgres\]"):
        R.list_assets(nodriver)


def _closed_port() -> int:
    from fixtures.servers import free_port

    return free_port()  # bound and released: nothing listens there


# -- remote MLflow tracking server ---------------------------------------------------------
@pytest.fixture(scope="module")
def remote(mlflow_server, tmp_path_factory):
    """A workspace (SQLite catalog) tracking to the MLflow server: base@1 and relight@1."""
    s = WorkspaceSettings(home=_home(tmp_path_factory), tracking_uri=mlflow_server.uri)
    folder = tmp_path_factory.mktemp("remote-files")
    extra = folder / "notes.txt"
    extra.write_text("extraction notes")
    base = R.register_asset(write_weights(folder / "base.safetensors", 11), name="r-base", kind="base", settings=s,
                            config={"name": "lbm-tiny"})
    lora = R.register_asset(write_weights(folder / "lora.safetensors", 12), name="r-lora", kind="lora", settings=s,
                            facts=lora_facts(4), lineage={"base": base}, params={"extract_seconds": 2.0},
                            artifacts={"notes/notes.txt": extra}, tags={"team": "vision"})
    return {"settings": s, "base": base, "lora": lora, "folder": folder, "server": mlflow_server}


def test_remote_mlflow_mirror(remote, tmp_path, capfd):
    from mlflow import MlflowClient

    s, base, lora, server = remote["settings"], remote["base"], remote["lora"], remote["server"]
    client = MlflowClient(tracking_uri=server.uri)
    assert {m.name for m in client.search_registered_models()} >= {"r-base", "r-lora"}
    (mv,) = client.search_model_versions("name = 'r-lora'")
    assert mv.tags["x-lbm.sha256"] == lora.sha256 and mv.tags["x-lbm.base_sha256"] == base.sha256
    assert mv.tags["x-lbm.base_ref"] == "r-base@1" and mv.tags["team"] == "vision"
    assert mv.source.startswith("mlflow-artifacts:") and mv.source.endswith("/weights")
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r-lora@1"
    assert run.data.params["rank"] == "4" and run.data.params["base"] == "r-base@1"
    assert run.data.params["sha256"] == lora.sha256 and run.data.params["extract_seconds"] == "2.0"
    assert run.data.metrics["size_bytes"] == lora.path.stat().st_size and run.data.metrics["mean_error"] == 0.04
    arts = {a.path for a in client.list_artifacts(mv.run_id)} | {a.path for a in client.list_artifacts(mv.run_id, "weights")}
    assert {"facts.json", "lineage.json", "layers.csv", "layers.json", "layers.txt", "notes",
            "weights/lora.safetensors"} <= arts
    got = client.download_artifacts(mv.run_id, "weights/lora.safetensors", str(tmp_path))
    assert _sha(Path(got)) == lora.sha256
    # uploaded to the server's artifact store, nothing written into the workspace
    assert not (s.home / "artifacts").exists()
    assert list(server.artifacts.rglob("lora.safetensors"))
    # MLflow search finds versions by their lbm.* tags
    exp = client.get_experiment_by_name("lbm-registry")
    runs = client.search_runs([exp.experiment_id], "tags.`lbm.name` = 'r-lora'")
    assert [r.info.run_id for r in runs] == [mv.run_id]
    assert client.search_model_versions(f"tags.`x-lbm.sha256` = '{base.sha256}'")[0].name == "r-base"
    # aliases and later facts are mirrored too
    R.set_alias("r-lora@1", "prod", s)
    assert client.get_model_version_by_alias("r-lora", "prod").version == mv.version
    report = tmp_path / "validation.json"
    report.write_text("{}")
    capfd.readouterr()
    R.update_facts(R.resolve("r-lora", s), {"functional_error": 0.125}, s, artifacts={"validation/report.json": report})
    assert client.get_run(mv.run_id).data.metrics["functional_error"] == 0.125
    assert "validation/report.json" in {a.path for a in client.list_artifacts(mv.run_id, "validation")}
    # a third registration: no "View run at" lines on stdout, where --json output goes
    R.register_asset(write_weights(tmp_path / "b2.safetensors", 13), name="r-base", kind="base", settings=s)
    assert "View run" not in capfd.readouterr().out


def test_remote_mlflow_doctor_remirrors_and_restores_blobs(remote, cli, tmp_path):
    from mlflow import MlflowClient

    s, lora, server = remote["settings"], remote["lora"], remote["server"]
    rc, out, err = cli("--home", s.home, "--tracking-uri", server.uri, "doctor", "--json")
    assert rc == 0 and json.loads(out)["ok"], out + err
    client = MlflowClient(tracking_uri=server.uri)
    old = R.show("r-lora@1", s)["mlflow"]
    client.delete_model_version("r-lora", old["model_version"])  # drift: the mirror lost a version
    blob = Path(R.show("r-lora@1", s)["path"])
    os.chmod(blob, 0o644)
    blob.unlink()  # and the workspace lost a blob
    # another registry tracks to the same server, with a model of the same name: not an orphan to us
    other = WorkspaceSettings(home=tmp_path / "other-home", tracking_uri=server.uri)
    theirs = R.register_asset(write_weights(tmp_path / "theirs.safetensors", 21), name="r-lora", kind="lora",
                              settings=other, lineage={"base": "cd" * 32})
    their_mv = R.show(theirs.ref, other)["mlflow"]
    report = R.doctor(s)
    # the home is a cache of the server: a blob missing here but on the server is no problem
    assert {i["kind"] for i in report["issues"]} == {"mlflow_missing"} and not report["ok"]
    assert report["checked"]["not_cached"] == 1
    repaired = R.doctor(s, repair=True)
    assert repaired["remaining"] == 0, repaired["issues"]
    assert _sha(R.resolve("r-lora@1", s).path) == lora.sha256  # the bytes came back from the server
    new = R.show("r-lora@1", s)["mlflow"]
    assert new["model_version"] != old["model_version"]
    mv = client.get_model_version("r-lora", new["model_version"])
    assert mv.tags["x-lbm.sha256"] == lora.sha256
    assert client.get_model_version_by_alias("r-lora", "prod").version == mv.version
    assert client.get_run(old["run_id"]).info.lifecycle_stage == "deleted"
    assert "weights/lora.safetensors" in {a.path for a in client.list_artifacts(mv.run_id, "weights")}
    assert R.doctor(s)["ok"]
    # the other registry's run and model version were left alone
    assert client.get_run(their_mv["run_id"]).info.lifecycle_stage == "active"
    assert client.get_model_version("r-lora", their_mv["model_version"]).tags["x-lbm.sha256"] == theirs.sha256
    assert R.doctor(other)["ok"]


def test_unreachable_tracking_server_fails_fast_and_writes_nothing(tmp_path):
    s = WorkspaceSettings(home=tmp_path / "home", tracking_uri=f"http://user:pw@127.0.0.1:{_closed_port()}")
    # the registry's reachability check answers, before MLflow's client retries for minutes
    with pytest.raises(RegistryError, match=r"cannot reach the MLflow tracking server http://user:\*\*\*@") as exc:
        R.register_asset(write_weights(tmp_path / "w.safetensors", 5), name="offline", kind="base", settings=s)
    assert "pw@" not in str(exc.value)
    assert R.list_assets(s) == []
    report = R.doctor(s)
    assert [i["kind"] for i in report["issues"]] == ["mlflow_unreachable"]
