"""A team registry with no shared disk: one PostgreSQL catalog, one ``mlflow server``, and a home
per machine whose ``blobs/`` is a sha-verified cache of the server's artifact store.

Home A registers a tiny base, a tuned model and a LoRA extracted from them; home B starts empty
and uses them by name: the weights come from the tracking server on first use (or ``pull``). The
servers are real (``tests/fixtures/servers.py``); the tests skip where no PostgreSQL binaries exist.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
from fixtures.registry import write_weights
from PIL import Image

from lbm_registry.api import registry as R
from lbm_registry.api.assets.models import import_model
from lbm_registry.errors import RegistryError
from lbm_registry.registry import catalog
from lbm_registry.registry.workspace import Workspace
from lbm_registry.settings import WorkspaceSettings


@pytest.fixture(scope="module", autouse=True)
def _mlflow_server_boots_meanwhile(mlflow_server_started):
    """Start the MLflow server first: it boots while PostgreSQL starts."""


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _server_file(server, rec_or_show: dict) -> Path:
    """The server's own artifact file of a version (under its --artifacts-destination)."""
    run_id, name = rec_or_show["mlflow"]["run_id"], rec_or_show["file_name"]
    (hit,) = [p for p in server.artifacts.rglob(name) if run_id in p.parts and p.parent.name == "weights"]
    return hit


@pytest.fixture(scope="module")
def team(pg_server, mlflow_server, tmp_path_factory, tiny_base_path, make_tuned):
    """Homes A and B (separate folders) sharing a PostgreSQL catalog and an MLflow server;
    A has registered t-base@1, t-tuned@1 and t-lora@1 (extracted from them)."""
    from lbm_registry.api.assets.lora import extract

    url = pg_server.create_database("team_catalog")
    root = tmp_path_factory.mktemp("team")

    def home(name: str) -> WorkspaceSettings:
        return WorkspaceSettings(home=root / name, catalog_url=url, tracking_uri=mlflow_server.uri)

    a, b = home("A"), home("B")
    base = import_model(tiny_base_path, name="t-base", kind="base", settings=a)
    tuned = import_model(make_tuned(rank=4, seed=1, scale=0.3), name="t-tuned", kind="model", settings=a)
    extract(base.ref, tuned.ref, rank=4, conv_rank=2, dtype="fp32", register="t-lora", settings=a)
    image = root / "source.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")).save(image)
    return {"a": a, "b": b, "home": home, "url": url, "server": mlflow_server, "base": base, "tuned": tuned,
            "image": image, "root": root}


def _args(s: WorkspaceSettings) -> list[str]:
    return ["--home", str(s.home), "--catalog-url", s.catalog_url, "--tracking-uri", s.tracking_uri]


def test_empty_home_shows_infers_validates_and_pulls(team, cli):
    a, b, root = team["a"], team["b"], team["root"]
    assert not b.home.exists()
    rc, out, err = cli(*_args(b), "show", "t-lora", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["ref"] == "t-lora@1" and info["cached"] is False and info["path"].startswith(str(b.home))
    assert not (b.home / "blobs").exists() or not any((b.home / "blobs").rglob("*"))  # show fetches nothing

    outs = {}
    for s in (a, b):
        rc, _, err = cli(*_args(s), "infer", "t-lora", "--source", team["image"], "--output",
                         root / f"out-{s.home.name}.png", "--device", "cpu", "--dtype", "fp32")
        assert rc == 0, err
        outs[s.home.name] = (root / f"out-{s.home.name}.png").read_bytes()
    assert outs["A"] == outs["B"]  # B fetched the LoRA and its base and computed the same bytes
    lora = R.show("t-lora", b)
    assert lora["cached"] and _sha(lora["path"]) == lora["sha256"]
    assert R.show("t-base", b)["cached"]
    assert "fetching t-lora@1" in err or "fetching t-base@1" in err  # the progress bar (stderr)

    rc, out, err = cli(*_args(b), "validate", "t-lora", "--json")  # its tuned model is fetched too
    assert rc == 0, err
    assert R.show("t-tuned", b)["cached"]

    rc, out, err = cli(*_args(b), "pull", "t-lora", "--json")
    assert rc == 0, err
    pulled = json.loads(out)
    assert [(x["ref"], x["role"], x["status"]) for x in pulled["blobs"]] == [
        ("t-lora@1", "version", "cached"), ("t-base@1", "base", "cached")]
    with Workspace.open(b) as ws:  # the fetches are in the shared audit log, each once
        fetched = [e for e in catalog.events(ws.db, limit=500) if e["action"] == "blob_fetched"]
    assert sorted((e["name"], json.loads(e["detail"])["home"]) for e in fetched) == [
        ("t-base", str(b.home)), ("t-lora", str(b.home)), ("t-tuned", str(b.home))]
    assert R.doctor(b)["ok"] and R.doctor(a)["ok"]


def _in_processes(target, args_list: list[tuple]) -> list:
    """Run ``target(*args, barrier)`` in one forked process each, released together by a barrier."""
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(len(args_list)), ctx.Queue()

    def main(i: int, args: tuple) -> None:
        try:
            results.put((i, target(*args, barrier)))
        except BaseException as exc:
            results.put((i, f"error: {type(exc).__name__}: {exc}"))

    procs = [ctx.Process(target=main, args=(i, a)) for i, a in enumerate(args_list)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    return [got[i] for i in range(len(args_list))]


def _pull(settings: WorkspaceSettings, ref: str, barrier) -> list[str]:
    barrier.wait()
    return [x["status"] for x in R.pull(ref, settings, progress=None)["blobs"]]


def test_four_processes_fetch_once(team):
    c = team["home"]("C")
    results = _in_processes(_pull, [(c, "t-tuned")] * 4)
    assert sorted(r[0] for r in results) == ["cached", "cached", "cached", "fetched"], results
    with Workspace.open(c) as ws:
        fetched = [e for e in catalog.events(ws.db, limit=500)
                   if e["action"] == "blob_fetched" and json.loads(e["detail"])["home"] == str(c.home)]
    assert len(fetched) == 1
    path = Path(R.show("t-tuned", c)["path"])
    assert _sha(path) == team["tuned"].sha256 and oct(path.stat().st_mode & 0o777) == "0o444"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_truncated_local_blob_is_fetched_again(team):
    b = team["b"]
    R.pull("t-base", b, progress=None)
    blob = Path(R.show("t-base", b)["path"])
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as fh:
        fh.truncate(blob.stat().st_size // 2)
    got = R.resolve("t-base", b)
    assert got.path == blob and _sha(blob) == team["base"].sha256
    # same size, other bytes: doctor's full hash finds it, --repair fetches it again
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    report = R.doctor(b)
    assert [i["kind"] for i in report["issues"]] == ["corrupt_cached_blob"]
    repaired = R.doctor(b, repair=True)
    assert repaired["remaining"] == 0, repaired["issues"]
    assert _sha(blob) == team["base"].sha256


def test_tampered_server_copy_is_refused(team, tmp_path, cli):
    a = team["a"]
    v = R.register_asset(write_weights(tmp_path / "fragile.safetensors", 5), name="t-fragile", kind="model",
                         settings=a)
    server_file = _server_file(team["server"], R.show(v.ref, a))
    data = bytearray(server_file.read_bytes())
    data[200] ^= 0xFF  # same size: only the hash can tell
    server_file.write_bytes(bytes(data))
    d = team["home"]("D")
    with pytest.raises(RegistryError, match=r"t-fragile@1: the tracking server's copy of its weights is corrupt"):
        R.resolve("t-fragile", d)
    blobs = d.home / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file()]  # nothing stored, no temp file left
    rc, _, err = cli(*_args(d), "pull", "t-fragile")
    assert rc != 0 and "corrupt" in err and "Traceback" not in err
    server_file.write_bytes(data[:100])  # truncated on the server
    with pytest.raises(RegistryError, match=r"t-fragile@1: .*corrupt \(100 bytes, expected"):
        R.resolve("t-fragile", d)
    server_file.unlink()
    with pytest.raises(RegistryError, match="t-fragile@1: the tracking server has no copy"):
        R.resolve("t-fragile", d)
    report = R.doctor(d)
    assert any(i["kind"] == "missing_blob" and "t-fragile@1" in i["detail"] for i in report["issues"])
    assert [i["kind"] for i in R.doctor(a)["issues"]] == ["unmirrored_blob"]  # A holds the only copy
    repaired = R.doctor(a, repair=True)  # ... and gives it back to the server
    assert repaired["remaining"] == 0 and repaired["issues"][0]["action"].startswith("uploaded"), repaired
    assert _sha(_server_file(team["server"], R.show(v.ref, a))) == v.sha256
    assert _sha(R.resolve("t-fragile", d).path) == v.sha256
    assert R.doctor(a)["ok"] and R.doctor(d)["ok"]


def _register(settings: WorkspaceSettings, worker: int, folder: str, barrier) -> tuple[int, str]:
    p = Path(folder) / f"w{worker}.safetensors"
    write_weights(p, 100 + worker)
    barrier.wait()
    v = R.register_asset(p, name="t-concurrent", kind="model", settings=settings)
    return v.version, v.sha256


def test_eight_concurrent_registrations_from_two_homes(team, tmp_path):
    a, b = team["a"], team["b"]
    results = _in_processes(_register, [((a, b)[w % 2], w, str(tmp_path)) for w in range(8)])
    assert all(isinstance(r, tuple) for r in results), results
    assert sorted(n for n, _ in results) == list(range(1, 9))
    assert len({sha for _, sha in results}) == 8
    e = team["home"]("E")  # nothing lost: every version's bytes come back on a third machine
    for number, sha in results:
        assert _sha(R.resolve(f"t-concurrent@{number}", e).path) == sha


def test_gc_cache_drops_what_the_server_holds_and_keeps_the_only_copy(team, tmp_path, cli):
    a = team["a"]
    f = team["home"]("F")
    R.pull("t-lora", f, progress=None)
    only = R.register_asset(write_weights(tmp_path / "only.safetensors", 77), name="t-only", kind="model",
                            settings=f)
    _server_file(team["server"], R.show(only.ref, f)).unlink()  # the server lost it: F has the only copy
    rc, out, err = cli(*_args(f), "gc", "--cache", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["checked"]["cache_dropped"] == 2 and report["checked"]["cache_kept_only_copies"] == 1
    assert not R.show("t-lora", f)["cached"] and not R.show("t-base", f)["cached"]
    assert R.show(only.ref, f)["cached"] and _sha(R.show(only.ref, f)["path"]) == only.sha256
    assert R.show("t-lora", a)["cached"]  # another home's cache is untouched
    # doctor: not cached but on the server is fine; the only copy is reported
    kinds = [i["kind"] for i in R.doctor(f)["issues"]]
    assert "unmirrored_blob" in kinds and "missing_blob" not in kinds
    assert _sha(R.resolve("t-lora", f).path) == R.show("t-lora", a)["sha256"]  # fetched again on use
    rc, out, err = cli(*_args(f), "pull", "t-lora")
    assert rc == 0, err
    assert "t-lora@1 (version" in out and "already here" in out and "t-base@1 (base" in out and "fetched in" in out
    # a home with its own (file) tracking store is no cache: its blobs are the only copy
    rc, _, err = cli("--home", tmp_path / "solo", "--catalog-url", team["url"], "gc", "--cache")
    assert rc != 0 and "not a cache" in err


def _register_paused(settings: WorkspaceSettings, src: str, log: str) -> None:
    """Register with the pause hook armed after the upload (a forked process)."""
    import sys

    from lbm_registry.registry.register import PAUSE_ENV

    sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115  (the hook reports here)
    os.environ[PAUSE_ENV], os.environ["LBM_REG_DEBUG_PAUSE_S"] = "mlflow_version", "4"
    try:
        R.register_asset(Path(src), name="t-halfway", kind="model", settings=settings)
    except RegistryError as exc:
        sys.stderr.write(f"refused: {exc}\n")
        os._exit(3)


def test_a_version_is_visible_only_when_the_server_holds_its_whole_file(team, tmp_path):
    import time

    a = team["a"]
    src = write_weights(tmp_path / "t-halfway.safetensors", 31)
    log = tmp_path / "paused.log"
    log.touch()
    proc = mp.get_context("fork").Process(target=_register_paused, args=(a, str(src), str(log)))
    proc.start()
    deadline = time.time() + 120
    while "paused at mlflow_version" not in log.read_text():
        assert proc.is_alive() and time.time() < deadline, log.read_text()
        time.sleep(0.05)
    (uploaded,) = team["server"].artifacts.rglob("t-halfway.safetensors")
    with open(uploaded, "r+b") as fh:  # the server kept only part of the upload
        fh.truncate(100)
    proc.join(60)
    assert proc.exitcode == 3 and "tracking server holds 100 bytes" in log.read_text(), log.read_text()
    assert "t-halfway" not in {r["name"] for r in R.list_assets(a)}
