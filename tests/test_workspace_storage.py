"""The registry's own storage at its edges: damaged stores, a read-only home, a full disk, and
registrations that fail or are interrupted. Each ends in one line and an exit code (1: the
machine refused), changes nothing, and leaves ``doctor`` clean.

Full disks and read-only folders are real (a small tmpfs, a read-only bind mount) in a child
process with its own mount namespace: see ``fixtures/storage.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.storage import assert_refused, mounts_available, run_batch, snapshot

LBM_REG = str(Path(sys.executable).with_name("lbm-reg"))


# -- damaged stores (issue 22 item 2) -------------------------------------------------------------
def test_a_damaged_catalog_is_one_line_naming_it_and_doctor(fresh_settings, cli):
    s = fresh_settings()
    (s.home / "catalog.db").write_bytes(os.urandom(8192))
    for args in (["list"], ["show", "x"], ["doctor"], ["alias", "set", "x", "prod"], ["gc"]):
        rc, out, err = cli("--home", s.home, *args)
        assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
        assert f"the catalog {s.home / 'catalog.db'} is damaged" in err and "doctor" in err, err


def test_a_damaged_mlflow_store_is_one_line_naming_it_and_doctor(fresh_settings, make_weights, cli):
    from lbm_registry.api.registry import doctor, register_asset

    s = fresh_settings()
    register_asset(make_weights(), name="dm", kind="base", settings=s, config={"name": "lbm-tiny"})
    store = s.home / "mlflow.db"
    store.write_bytes(os.urandom(8192))
    rc, _, err = cli("--home", s.home, "rm", "dm@1")
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert f"the MLflow store {store} is damaged" in err and "doctor --repair" in err, err
    report = doctor(s)
    assert [i["kind"] for i in report["issues"]] == ["mlflow_damaged"], report["issues"]


@pytest.mark.slow
def test_doctor_repair_sets_a_damaged_mlflow_store_aside_and_rebuilds_it(fresh_settings, make_weights):
    from lbm_registry.api.registry import register_asset, show

    s = fresh_settings()
    register_asset(make_weights(), name="dm", kind="base", settings=s, config={"name": "lbm-tiny"})
    (s.home / "mlflow.db").write_bytes(os.urandom(8192))
    # a new process, as a user runs it (this one's MLflow client keeps its engine on the old file), as a user runs it (this one's MLflow client keeps its engine on the old file)
    repaired = subprocess.run([LBM_REG, "--home", str(s.home), "doctor", "--repair"], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert repaired.returncode == 0 and "set aside as mlflow.db.damaged-" in repaired.stdout, repaired
    assert any(p.name.startswith("mlflow.db.damaged-") for p in s.home.iterdir())   # kept, not deleted
    again = subprocess.run([LBM_REG, "--home", str(s.home), "doctor"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "no problems" in again.stdout, again
    assert show("dm@1", s)["mlflow"]["model_version"]


# -- a read-only registry (issue 22 item 4) ---------------------------------------------------------
def _read_only(home: Path) -> list[str]:
    """Shell mounts that make ``home`` read-only for the child (root ignores chmod); for another
    user, ``chmod`` is real and is applied here instead (undone by :func:`_writable_again`)."""
    if os.geteuid() == 0:
        reason = mounts_available()
        if reason is not None:
            pytest.skip(f"root writes through chmod, and a read-only mount is not possible: {reason}")
        return [f"mount --bind -o ro {home} {home}"]
    for p in [home, *home.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o555)
    return []


def _writable_again(home: Path) -> None:
    if os.geteuid() != 0:
        for p in [home, *home.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)


READ_COMMANDS = (["list"], ["show", "st-lora"], ["lineage", "st-lora@prod"], ["layers", "st-lora"], ["doctor"],
                 ["pull", "st-lora"])


def test_a_read_only_registry_reads_and_refuses_writes_in_one_line(edge_registry, tmp_path):
    home = edge_registry["home"]
    before = snapshot(home)
    out = tmp_path / "exported.safetensors"
    writes = (["alias", "set", "st-lora", "new"], ["alias", "rm", "st-lora", "prod"], ["rm", "st-lora@1", "--force"],
              ["gc"], ["init"], ["doctor", "--repair"],
              ["import", str(edge_registry["lora"]), "--kind", "lora", "--name", "again", "--base", "st-base",
               "--allow-duplicate"])
    steps = [{"cli": ["--home", str(home), *a]} for a in
             (*READ_COMMANDS, ["export", "st-lora", "--format", "kohya", "--output", str(out)], *writes)]
    try:
        results = run_batch(steps, mounts=_read_only(home))
    finally:
        _writable_again(home)
    for r in results[:len(READ_COMMANDS) + 1]:
        assert r["rc"] == 0 and "Traceback" not in r["err"], r
    assert out.is_file()
    for r in results[len(READ_COMMANDS) + 1:]:
        assert_refused(r, 1, "read-only", str(home))
    assert snapshot(home) == before


@pytest.mark.slow
def test_a_read_only_registry_runs_infer_validate_compare_and_serve(edge_registry, tmp_path):
    from PIL import Image

    home = edge_registry["home"]
    src = tmp_path / "src.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(src)
    serve = f"""
import io
from lbm_registry.api.serve import Server
from lbm_registry.settings import WorkspaceSettings
with Server(base="st-base", preload=["st-lora@prod"], device="cpu",
            settings=WorkspaceSettings.resolve({str(home)!r})) as srv:
    result = srv.run(open({str(src)!r}, "rb").read(), lora="st-lora@prod").width
"""
    before = snapshot(home)
    steps = [{"cli": ["--home", str(home), "infer", "st-lora@prod", "--source", str(src), "--output",
                      str(tmp_path / "out.png"), "--device", "cpu"]},
             {"cli": ["--home", str(home), "validate", "st-lora", "--layers-file", str(tmp_path / "layers.txt")]},
             {"cli": ["--home", str(home), "compare", "st-lora@1", "st-lora@prod", "--source", str(src),
                      "--device", "cpu"]},
             {"py": serve}]
    try:
        results = run_batch(steps, mounts=_read_only(home))
    finally:
        _writable_again(home)
    for r in results:
        assert r["rc"] == 0 and "Traceback" not in r["err"], r
    assert "not recorded" in results[1]["out"] and results[3]["value"] == 64
    assert (tmp_path / "out.png").is_file() and (tmp_path / "layers.txt").is_file()
    assert snapshot(home) == before


# -- a full disk (issue 22 item 7) -------------------------------------------------------------------
def _workspace_setup(home: Path, template: Path, weights: list[Path]) -> str:
    """Python for the child: a workspace made inside its mounts (MLflow records absolute artifact
    paths, so a workspace is made where it lives, never copied), with dummy bases registered."""
    return f"""
import shutil
from pathlib import Path
from lbm_registry.api.registry import init_workspace, register_asset
from lbm_registry.settings import WorkspaceSettings
home = Path({str(home)!r})
home.mkdir(exist_ok=True)
shutil.copyfile({str(template)!r}, home / "mlflow.db")
s = WorkspaceSettings(home=home)
init_workspace(s)
for i, w in enumerate({[str(w) for w in weights]!r}):
    register_asset(w, name=f"d{{i}}", kind="model", settings=s, config={{"name": "lbm-tiny"}})
"""


def _assert_full_disk_results(results: list[dict]) -> None:
    """Every command either worked or was refused in one line naming a file, exit 1."""
    for r in results:
        if "argv" not in r:
            continue
        if r["rc"] == 2 and "has no alias 'prod'" in r["err"]:   # its 'alias set' was refused: right
            assert_refused(r, 2)
        elif r["rc"] != 0:
            assert_refused(r, 1)
            assert "No space left on device" in r["err"] or "disk is full" in r["err"], r
            assert "/" in r["err"], r  # names a path


FULL_DISK_COMMANDS = (["list"], ["alias", "set", "d0", "prod"], ["doctor"], ["alias", "rm", "d0", "prod"],
                      ["rm", "d1@1"], ["doctor", "--repair"], ["gc"])


def _run_on_a_full_disk(tmp_path: Path, template: Path, weights: list[Path], leave: int) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    home = disk / "home"
    steps = [{"py": _workspace_setup(home, template, weights)},
             {"fill": str(disk), "leave": leave},
             *({"cli": ["--home", str(home), *a]} for a in FULL_DISK_COMMANDS),
             {"unfill": str(disk)}, {"cli": ["--home", str(home), "doctor"]}]
    results = run_batch(steps, mounts=[f"mount -t tmpfs -o size=4m tmpfs {disk}"])
    assert results[0]["rc"] == 0, results[0]
    _assert_full_disk_results(results)
    if leave == 0:  # nothing fits: reads work, every write is refused naming the catalog
        by = {tuple(r["argv"][2:]): r for r in results if "argv" in r}
        assert by[("list",)]["rc"] == 0 and by[("doctor",)]["rc"] == 0
        for args in (("alias", "set", "d0", "prod"), ("rm", "d1@1"), ("gc",)):
            assert_refused(by[args], 1, str(home / "catalog.db"), "No space left on device")
    assert results[-1]["rc"] == 0, results[-1]   # doctor clean once there is room again


def test_a_full_disk_is_one_line_with_the_path_and_leaves_nothing(need_mounts, tmp_path, mlflow_template,
                                                                make_weights):
    _run_on_a_full_disk(tmp_path, mlflow_template, [make_weights(), make_weights()], 0)


@pytest.mark.slow
@pytest.mark.parametrize("leave", [8_000, 30_000, 45_000, 60_000, 75_000, 100_000, 150_000])
def test_a_nearly_full_disk_never_gives_a_traceback(need_mounts, tmp_path, mlflow_template, make_weights, leave):
    _run_on_a_full_disk(tmp_path, mlflow_template, [make_weights(), make_weights()], leave)


def test_registration_on_a_full_disk_names_the_file_and_cleans_up(need_mounts, tmp_path, mlflow_template,
                                                                 make_weights, tiny_base_path):
    """``import`` running out of space storing the blob, then (room for the blob, none for the
    MLflow artifacts) mirroring it: one line naming the file being written, exit 1, no version,
    no failed row, no orphan blob, doctor clean."""
    disk = tmp_path / "disk"
    disk.mkdir()
    home = disk / "home"
    imp = ["--home", str(home), "import", str(tiny_base_path), "--kind", "base", "--name", "big", "--probe", "off"]
    steps = [{"py": _workspace_setup(home, mlflow_template, [make_weights()])},
             {"fill": str(disk), "leave": 8 << 20},   # the 60 MB base does not fit
             {"cli": imp}, {"cli": ["--home", str(home), "doctor"]}, {"unfill": str(disk)},
             {"cli": imp},                            # the blob fits; its MLflow copy does not
             {"cli": ["--home", str(home), "doctor"]}, {"cli": ["--home", str(home), "list", "--json"]}]
    results = run_batch(steps, mounts=[f"mount -t tmpfs -o size=100m tmpfs {disk}",
                                       f"mkdir -p {home}/artifacts",
                                       f"mount -t tmpfs -o size=512k tmpfs {home}/artifacts"])
    assert results[0]["rc"] == 0, results[0]
    assert_refused(results[2], 1, str(home / "blobs" / "sha256"), "No space left on device")
    assert results[3]["rc"] == 0, results[3]
    assert_refused(results[5], 1, str(home / "artifacts"), "No space left on device")
    assert results[6]["rc"] == 0, results[6]
    assert '"big"' not in results[7]["out"]


# -- a failed or interrupted registration cleans up after itself (issue 22 item 14) ---------------
INTERRUPTED_REGISTRATION = """
import sys
from lbm_registry.api.registry import register_asset
from lbm_registry.settings import WorkspaceSettings
try:
    register_asset(sys.argv[1], name="cut", kind="base", settings=WorkspaceSettings.resolve(sys.argv[2]),
                   config={"name": "lbm-tiny"})
except KeyboardInterrupt:
    sys.exit(130)
"""


def _interrupt_at_blob(cmd: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``cmd`` paused at the registration's blob stage, then Ctrl-C it (SIGINT)."""
    env = {**os.environ, "LBM_REG_DEBUG_PAUSE_AT": "blob", "LBM_REG_DEBUG_PAUSE_S": "60", "LBM_REG_PROBE": "off",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "paused at blob" in line:
                break
        else:
            raise AssertionError("never paused: " + "".join(lines))
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _assert_nothing_left(s) -> None:
    from lbm_registry.api.registry import doctor
    from lbm_registry.registry import catalog
    from lbm_registry.registry.workspace import Workspace

    report = doctor(s)
    assert report["ok"] and not report["issues"], report["issues"]  # was: "failed registration: KeyboardInterrupt:"
    with Workspace.open(s) as ws:
        assert not catalog.all_versions(ws.db, status="failed") and not catalog.all_versions(ws.db, status="pending")
        assert not catalog.referenced_shas(ws.db) - {r.sha256 for r in catalog.all_versions(ws.db, status="ready")}
        events = [e for e in catalog.events(ws.db, "cut") if e["action"] == "register_failed"]
    assert events and "interrupted (Ctrl-C)" in events[0]["detail"], events


def test_ctrl_c_at_the_blob_stage_cleans_up_like_a_failure(fresh_settings, make_weights, tmp_path):
    s = fresh_settings()
    before = {p for p in s.blobs_dir.rglob("*") if p.is_file()}
    rc, err = _interrupt_at_blob([sys.executable, "-c", INTERRUPTED_REGISTRATION, str(make_weights()), str(s.home)],
                                 tmp_path)
    assert rc == 130, err
    _assert_nothing_left(s)
    assert {p for p in s.blobs_dir.rglob("*") if p.is_file()} == before   # no orphan blob


@pytest.mark.slow
def test_ctrl_c_at_the_blob_stage_of_extract_register_leaves_doctor_clean(fresh_settings, make_tuned,
                                                                          tiny_base_path, tmp_path):
    s = fresh_settings()
    rc, err = _interrupt_at_blob([LBM_REG, "--home", str(s.home), "extract", "--base", str(tiny_base_path),
                                  "--tuned", str(make_tuned(rank=2)), "--rank", "2", "--conv-rank", "2",
                                  "--register", "cut"], tmp_path)
    assert rc == 130 and err.strip().splitlines()[-1] == "interrupted: nothing registered", err
    _assert_nothing_left(s)
    assert not any(p.is_file() for p in s.blobs_dir.rglob("*"))
