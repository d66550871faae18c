"""The CLI as a user meets it: usage errors, Ctrl-C, missing workspaces, file permissions.

Usage errors and signals are tested through REAL subprocesses of the installed ``lbm-reg``
entry point, against whatever typer (and its vendored click) is installed: that is where the
tracebacks came from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LBM_REG = str(Path(sys.executable).with_name("lbm-reg"))


def run_cli(*args: object, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", **kw.pop("env", {})}
    return subprocess.run([LBM_REG, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
                          **kw)


def assert_usage_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert "Error: " in proc.stderr, proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 6, proc.stderr


USAGE_ERRORS = [
    (["bogus"], "No such command 'bogus'"),
    (["extract", "--bogus"], "No such option: --bogus"),
    (["extract"], "Missing option '--base'"),
    (["extract", "--base", "a", "--tuned", "b", "--rank", "abc"], "Invalid value for '--rank'"),
    (["infer", "x", "--source", "a", "--output", "b", "--steps", "0"], "Invalid value for '--steps'"),
    (["infer", "x", "--source", "a", "--output", "b", "--scale", "abc"], "Invalid value for '--scale'"),
    (["data", "synth", "--output", "o", "--n", "abc"], "Invalid value for '--n'"),
    # an unquoted brace pattern the shell expanded into extra arguments
    (["train", "--config", "c.yaml", "--train-shards", "s-000.tar", "s-001.tar"], "unexpected extra argument"),
    (["list", "extra"], "unexpected extra argument"),
    (["alias", "set", "only-one"], "Missing argument"),
    (["show"], "Missing argument"),
    # click's parser raises these without a command context: main() supplies the one named
    (["ui", "--port", "-5"], "Invalid value for '--port'"),
    (["--home"], "Option '--home' requires an argument"),
    (["infer", "x", "--source"], "Option '--source' requires an argument"),
    (["--home", "h", "data", "synth", "--n"], "Option '--n' requires an argument"),
]

USAGE_LINES = {"infer": "Usage: lbm-reg infer [OPTIONS]", "data": "Usage: lbm-reg data synth [OPTIONS]"}


@pytest.mark.parametrize(("args", "needle"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_print_usage_and_exit_2(tmp_path, args, needle):
    proc = run_cli(*args, cwd=tmp_path)
    assert_usage_error(proc, needle)
    command = next((a for a in args if a in USAGE_LINES), None)
    assert (USAGE_LINES[command] if command else "Usage: lbm-reg") in proc.stderr, proc.stderr
    assert "Try 'lbm-reg" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created (no ./mlruns)


def test_no_arguments_prints_help_and_exits_2(tmp_path):
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Commands" in proc.stdout + proc.stderr


def test_installed_typer_is_in_the_pinned_range():
    """pyproject pins typer to the range these tests ran against."""
    import tomllib
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    spec = next(d for d in pyproject["project"]["dependencies"] if d.startswith("typer"))
    assert SpecifierSet(spec[len("typer"):]).contains(version("typer")), (spec, version("typer"))


def test_both_clicks_are_caught_in_process(cli, tmp_path):
    """The real click (if something imported it) and typer's vendored one both give exit 2."""
    import click

    from lbm_registry.cli.main import _click_exception_types

    errors, _ = _click_exception_types()
    assert click.ClickException in errors
    try:
        import typer._click.exceptions as vendored
    except ImportError:
        vendored = None
    if vendored is not None:
        assert vendored.ClickException in errors
    rc, _, err = cli("--home", tmp_path / "h", "bogus")
    assert rc == 2 and "No such command" in err


# -- Ctrl-C ----------------------------------------------------------------------------------
def _interrupt_at(stage: str, args: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "LBM_REG_DEBUG_PAUSE_AT": stage, "LBM_REG_DEBUG_PAUSE_S": "60"}
    proc = subprocess.Popen([LBM_REG, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if f"paused at {stage}" in line:
                break
        else:
            raise AssertionError("never paused: " + "".join(lines))
        proc.send_signal(signal.SIGINT)
        rest, = (proc.communicate(timeout=60)[1],)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines[:-1]) + rest


@pytest.fixture(scope="module")
def tuned_pair(make_tuned, tiny_base_path):
    return tiny_base_path, make_tuned(rank=2)


def _extract_args(home: Path, pair: tuple[Path, Path], name: str) -> list[str]:
    base, tuned = pair
    return ["--home", str(home), "extract", "--base", str(base), "--tuned", str(tuned), "--rank", "2",
            "--conv-rank", "2", "--register", name]


def test_ctrl_c_before_the_version_is_visible_says_nothing_registered(fresh_settings, tuned_pair, tmp_path):
    s = fresh_settings()
    rc, err = _interrupt_at("pending", _extract_args(s.home, tuned_pair, "interrupted"), tmp_path)
    assert rc == 130, err
    assert err.strip().splitlines()[-1] == "interrupted: nothing registered", err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "interrupted" not in run_cli("--home", s.home, "list", "--json").stdout


def test_ctrl_c_after_the_version_is_visible_names_it(fresh_settings, tuned_pair, tmp_path):
    s = fresh_settings()
    rc, err = _interrupt_at("ready", _extract_args(s.home, tuned_pair, "kept"), tmp_path)
    assert rc == 130, err
    assert err.strip().splitlines()[-1] == "registered kept@1; interrupted after", err
    assert "Traceback" not in err and "Exception ignored" not in err, err


ATEXIT_SCRIPT = """
import atexit, sys, time
from lbm_registry.cli.main import main
def slow_exit():  # stands in for MLflow's atexit callback ending its run
    sys.stderr.write("in atexit\\n"); sys.stderr.flush(); time.sleep(60)
atexit.register(slow_exit)
sys.argv = ["lbm-reg", "--version"]
main()
"""


def test_ctrl_c_during_atexit_callbacks_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", ATEXIT_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        first = proc.stderr.readline()
        assert first == "in atexit\n", first
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "lbm-reg 0.1.0" in out
    assert err.strip() == "interrupted", err


# -- permissions -----------------------------------------------------------------------------
@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask for the test; restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_atomic_writes_keep_the_umask_mode(tmp_path, umask, mask):
    from lbm_registry.fileio import atomic_path, make_temp_dir
    from lbm_registry.registry.blobs import make_read_only

    umask(mask)
    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~mask
    assert make_temp_dir(tmp_path, ".ckpt.").stat().st_mode & 0o777 == 0o777 & ~mask
    make_read_only(tmp_path / "out.bin")  # blobs: write bits dropped, read bits kept
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o444 & ~mask


def test_cli_outputs_keep_the_umask_mode(tmp_path):
    """A real ``data synth`` under umask 027 writes group-readable shards (was 0600)."""
    proc = subprocess.run([LBM_REG, "data", "synth", "--output", str(tmp_path / "d"), "--n", "2",
                           "--resolution", "32"], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stderr
    shards = list((tmp_path / "d").glob("*.tar"))
    assert shards and all(p.stat().st_mode & 0o777 == 0o640 for p in shards)


def test_training_checkpoints_keep_the_umask_mode(tmp_path, umask):
    import torch

    from lbm_registry.lora.format import LoRAFile, LoRALayer
    from lbm_registry.train.state import TrainState, save_checkpoint

    umask(0o022)
    layer = LoRALayer(module="a", down=torch.ones(1, 4), up=torch.ones(4, 1), alpha=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    path = save_checkpoint(tmp_path, lora=LoRAFile(layers={"a": layer}), optimizer=opt, rng={},
                           state=TrainState(), config={})
    assert path.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in path.iterdir())


# -- a home that does not exist --------------------------------------------------------------
MISSING_HOME_COMMANDS = [
    ["list"], ["list", "--json"], ["gc"], ["gc", "--json"], ["doctor"], ["doctor", "--repair"],
    ["doctor", "--json"], ["alias", "set", "relight@1", "prod"], ["alias", "rm", "relight", "prod"],
    ["show", "relight"], ["lineage", "relight@2"], ["layers", "relight"], ["show", "sha256:abcdef12"],
    ["ui", "--port", "1"], ["rm", "relight@1"], ["pull", "relight"],
]


@pytest.mark.parametrize("args", MISSING_HOME_COMMANDS, ids=[" ".join(a) for a in MISSING_HOME_COMMANDS])
def test_read_and_maintenance_commands_refuse_a_missing_home(cli, tmp_path, args):
    home = tmp_path / "typo-ws"
    rc, out, err = cli("--home", home, *args)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no registry at" in lines[0] and str(home) in lines[0], err
    assert not home.exists()


def test_missing_home_error_is_neutral_in_python(tmp_path):
    from lbm_registry.api.registry import gc
    from lbm_registry.errors import RegistryError
    from lbm_registry.settings import WorkspaceSettings

    with pytest.raises(RegistryError) as info:
        gc(WorkspaceSettings.resolve(home=tmp_path / "nope"))
    assert "no registry at" in str(info.value) and "--home" not in str(info.value)
    assert "--home" in info.value.cli_message


def test_base_mismatch_is_worded_per_surface(cli, extract_tiny, make_tuned, lora_settings, tmp_path):
    """Python callers are told ``force=True``, CLI users ``--force``."""
    from PIL import Image

    from lbm_registry.api.run.infer import plan_load
    from lbm_registry.errors import LoRAError

    lora = extract_tiny(make_tuned(rank=2), rank=2, conv_rank=2).path
    other_base = make_tuned(rank=1)
    with pytest.raises(LoRAError) as info:
        plan_load(str(lora), base=str(other_base), settings=lora_settings)
    assert "force=True" in str(info.value) and "--force" not in str(info.value)
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    rc, _, err = cli("--home", lora_settings.home, "infer", lora, "--base", other_base, "--source",
                     tmp_path / "in.png", "--output", tmp_path / "out.png")
    assert rc == 2 and "use --force" in err and "force=True" not in err


# -- the Python API ----------------------------------------------------------------------------
def test_api_submodules_by_attribute_without_importing_torch():
    code = ("import sys\nfrom lbm_registry import api\nassert 'torch' not in sys.modules, 'torch at import'\n"
            "assert callable(api.lora.extract) and callable(api.infer.load) and callable(api.registry.resolve)\n"
            "assert 'lora' in dir(api)\n"
            "try:\n    api.nope\nexcept AttributeError as e:\n    print('ok', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ok module 'lbm_registry.api' has no attribute 'nope'" in proc.stdout


# -- smaller items (issue 11, item 11) ---------------------------------------------------------
@pytest.mark.parametrize(("name", "why"), [
    (".", "must start with a letter or a digit"), ("...", "must start with a letter or a digit"),
    ("-dash", "must start with a letter or a digit"), ("a b", "' ' not allowed"), ("a/b", "'/' not allowed"),
    ("latest", "reserved"), ("sha256", "reserved"), ("v2", "looks like a version"), ("", "empty"),
])
def test_name_rule_messages_say_what_is_wrong(name, why):
    from lbm_registry.api.registry import validate_name
    from lbm_registry.errors import RegistryError
    from lbm_registry.registry.aliases import validate_alias

    with pytest.raises(RegistryError, match="invalid name") as info:
        validate_name(name)
    assert why in str(info.value)
    if name not in ("latest", "v2"):  # those are refused as aliases with their own message
        with pytest.raises(RegistryError, match="invalid alias"):
            validate_alias(name)


def test_sha256_is_refused_as_an_alias():
    from lbm_registry.errors import RegistryError
    from lbm_registry.registry.aliases import validate_alias

    with pytest.raises(RegistryError, match="reserved"):
        validate_alias("sha256")
    validate_alias("prod")


def test_nothing_after_at_is_refused_not_latest(cli, populated):
    rc, _, err = cli("--home", populated["settings"].home, "show", "relight@")
    assert rc == 2 and "nothing after '@' in 'relight@'" in err


def test_config_name_typo_gets_did_you_mean():
    from lbm_registry.errors import ConfigError
    from lbm_registry.lbm.config import resolve_config_path

    with pytest.raises(ConfigError, match="did you mean lbm-tiny"):
        resolve_config_path("lbm-tin")


def test_gc_json_has_no_repair_flag(cli, fresh_settings):
    import json

    s = fresh_settings()
    rc, out, err = cli("--home", s.home, "gc", "--json")
    report = json.loads(out)
    assert rc == 0 and "repair" not in report and report["removed"] == 0


def test_override_errors_name_the_override_not_the_file(tmp_path):
    from lbm_registry.errors import ConfigError
    from lbm_registry.train.config import load_train_config

    cfg = Path(__file__).parents[1] / "configs" / "lora-finetune.yaml"
    with pytest.raises(ConfigError) as info:
        load_train_config(cfg, {"batch_size": 0})
    assert "batch_size=0" in str(info.value) and "override, not in" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_train_config(cfg, {"foo": 1})
    assert "foo=1" in str(info.value) and "unknown field" in str(info.value)


def test_show_hides_empty_rows_and_renders_validation(cli, populated, make_weights):
    from fixtures.registry import lora_facts

    from lbm_registry.api.registry import register_asset, update_facts

    s = populated["settings"]
    base = register_asset(make_weights(), name="seeded-base", kind="base", settings=s,
                          config={"name": "lbm-tiny"}, facts={"sdxl_unet": None, "seed": 0})
    rc, out, _ = cli("--home", s.home, "show", base.ref)
    assert rc == 0 and "sdxl_unet" not in out
    trained = register_asset(make_weights(), name="trained", kind="lora", settings=s, lineage={"base": base},
                             facts=lora_facts(4, layers=[{"module": "a", "kind": "linear", "shape": [32, 32],
                                                          "rank": 4, "rel_error": None, "energy": None}]))
    update_facts(trained, {"validation": {"mean_error": 0.0123, "max_error": 0.05,
                                          "functional": {"functional_error": 0.002, "recovered": 0.99},
                                          "coverage": {"expected": 792, "found": 792, "applied": 792},
                                          "validated_at": "2026-12-01T09:00:00+00:00"}}, s)
    rc, out, _ = cli("--home", s.home, "show", trained.ref)
    assert rc == 0
    assert "worst relative errors" not in out and "no per-layer errors recorded" in out
    assert "rel. error mean 0.0123 max 0.05" in out and "recovered 99.00%" in out and "{" not in out


def test_list_shows_rank_ranges_for_non_fixed_policies(cli, populated, make_weights):
    from fixtures.registry import lora_facts

    from lbm_registry.api.registry import register_asset

    s = populated["settings"]
    layers = [{"module": f"m{i}", "kind": "linear", "shape": [32, 32], "rank": r, "rel_error": 0.1, "energy": 0.99}
              for i, r in enumerate((1, 3, 6))] + [
             {"module": "c", "kind": "conv", "shape": [8, 8, 3, 3], "rank": 12, "rel_error": 0.1, "energy": 0.99}]
    register_asset(make_weights(), name="budgeted", kind="lora", settings=s, lineage={"base": populated["base"]},
                   facts=lora_facts(6, conv_rank=12, policy="budget 2 MB", layers=layers))
    rc, out, _ = cli("--home", s.home, "list")
    row = next(line for line in out.splitlines() if "budgeted" in line)
    assert "1-6/12 (budget 2 MB)" in row


@pytest.mark.parametrize("args", [["compare", "a.safetensors", "b.safetensors"], ["serve", "--port", "0"]])
def test_unknown_device_is_one_line_in_every_command(cli, tmp_path, args):
    rc, _, err = cli("--home", tmp_path / "h", *args, "--device", "tpu")
    assert rc == 2 and err.strip() == "error: unknown --device 'tpu': use auto, cpu, cuda or cuda:N", err


def test_a_taken_port_is_one_line_before_anything_starts(cli, fresh_settings, tmp_path):
    """``serve`` and ``ui`` on a port something else holds: one line, exit 2, before a model
    loads or the MLflow UI starts (whose own error is a traceback with exit 0)."""
    import socket

    s = fresh_settings()
    from lbm_registry.api.registry import init_workspace

    init_workspace(s)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        for args in (["ui", "--port", port], ["serve", "--port", port], ["ui", "--host", "no-such-host.invalid"]):
            rc, out, err = cli("--home", s.home, *args)
            assert rc == 2, (args, out, err)
            assert err.strip().startswith("error: cannot bind ") and len(err.strip().splitlines()) == 1, err


def test_an_os_refusal_is_one_line_not_a_traceback(cli, fresh_settings, monkeypatch):
    """What the machine refuses mid-command (disk full, permissions) that no early check could
    foresee reaches the user as one line with the path, exit 1."""
    import errno

    import lbm_registry.api.registry as R

    s = fresh_settings()
    R.init_workspace(s)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(s.home / "catalog.db"))

    monkeypatch.setattr(R, "list_assets", full)
    rc, out, err = cli("--home", s.home, "list")
    assert rc == 1 and out == ""
    assert err == f"error: No space left on device: {s.home / 'catalog.db'}\n"



def test_a_failed_first_command_leaves_no_half_made_workspace(cli, tmp_path):
    """``init`` (or a first registration) against a tracking server that is not there fails in
    one line and leaves no workspace behind: not in a new folder, not in an empty one, and a
    folder that already held something keeps exactly that."""
    from fixtures.servers import free_port

    from lbm_registry.api.registry import init_workspace
    from lbm_registry.errors import RegistryError
    from lbm_registry.settings import WorkspaceSettings

    gone = f"http://127.0.0.1:{free_port()}"
    new, empty, used = tmp_path / "new", tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\0" * 8)
    for home, args in ((new, ["init"]), (empty, ["init"]), (used, ["init"]),
                       (new, ["import", weights, "--name", "b", "--kind", "base"])):
        rc, _, err = cli("--home", home, "--tracking-uri", gone, *args)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert not new.exists()
    assert list(empty.iterdir()) == []
    assert "notes.txt" in {p.name for p in used.iterdir()}
    with pytest.raises(RegistryError, match="cannot reach the MLflow tracking server"):
        init_workspace(WorkspaceSettings.resolve(home=new, tracking_uri=gone))
    assert not new.exists()


def test_a_wheel_carries_the_built_in_configs_and_migrations(tmp_path):
    """``pip install`` (not editable) must find ``--config lbm-tiny`` and be able to create a
    catalog: the built-in configs and the Alembic scripts are package data, in the wheel next to
    the code that looks them up."""
    import zipfile

    from lbm_registry.lbm.config import builtin_config_dir

    root = Path(__file__).resolve().parents[1]
    assert builtin_config_dir().is_relative_to(Path(__import__("lbm_registry").__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                           "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = list(tmp_path.glob("lbm_registry-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in ("lbm-tiny", "lbm-relighting", "lora-finetune"):
        assert f"lbm_registry/configs/{cfg}.yaml" in names
    from lbm_registry.registry.schema import SCHEMA_HEAD, migrations_dir

    scripts = {f"lbm_registry/registry/migrations/{p.relative_to(migrations_dir()).as_posix()}"
               for p in migrations_dir().rglob("*") if p.is_file() and p.suffix in (".py", ".mako")}
    assert {"lbm_registry/registry/migrations/env.py", "lbm_registry/registry/migrations/script.py.mako"} <= scripts
    assert any(n.startswith(f"lbm_registry/registry/migrations/versions/{SCHEMA_HEAD}_") for n in names)
    assert scripts <= names


def test_only_set_up_commands_undo_a_new_home():
    """The clean-up of a failed first command is for ``init``, ``import`` and ``--register``:
    a failed ``train`` keeps a new home, which holds the run's checkpoints for ``--resume``."""
    from lbm_registry.cli.main import _sets_up_a_workspace

    assert _sets_up_a_workspace(["--home", "h", "init"])
    assert _sets_up_a_workspace(["--home", "import", "init"])  # a home named like a command
    assert _sets_up_a_workspace(["import", "w.safetensors", "--name", "b", "--kind", "base"])
    assert _sets_up_a_workspace(["extract", "--base", "b", "--tuned", "t", "--register", "relight"])
    assert _sets_up_a_workspace(["resize", "relight", "--rank", "4", "--register=small"])
    assert not _sets_up_a_workspace(["--home", "h", "train", "--config", "c.yaml", "--register", "relight"])
    assert not _sets_up_a_workspace(["demo", "--home", "d"])
    assert not _sets_up_a_workspace(["extract", "--base", "b", "--tuned", "t", "-o", "x.safetensors"])


# -- issue 22: refusals that said the wrong thing, usage errors that exited 1, --json errors ---
def test_json_errors_are_json_on_stdout_too(cli, tmp_path, populated):
    """With --json an error was only a line on stderr: nothing on stdout was JSON."""
    import json

    home = ["--home", populated["settings"].home]
    for args, code in ((["show", "nope-asset", "--json"], 2), (["list", "--json", "--bogus"], 2),
                       (["--home", tmp_path / "none", "list", "--json"], 2),
                       (["alias", "set", "relight@9", "x", "--json"], 2)):
        rc, out, err = cli(*(home if args[0] != "--home" else []), *args)
        assert rc == code, err
        answer = json.loads(out)
        assert set(answer) == {"error", "code"} and answer["code"] == code and answer["error"], answer
        assert answer["error"] in " ".join(err.split()), (answer, err)   # the line on stderr, as JSON
    rc, out, err = cli(*home, "alias", "set", "relight@2", "json-test", "--json")   # alias set --json exists
    assert rc == 0 and json.loads(out)["version"] == 2, err
    rc, out, err = cli(*home, "alias", "rm", "relight", "json-test", "--json")
    assert rc == 0 and json.loads(out)["alias"] == "json-test", err
    rc, out, err = cli(*home, "show", "nope-asset")       # without --json: stdout stays empty
    assert rc == 2 and out == ""


def test_a_file_where_a_folder_goes_is_a_usage_error(cli, tmp_path):
    """``--home <a file> init`` and ``compare --report <a file>`` exited 1 (a refusal of the
    machine) with "File exists"; they are usage errors: exit 2, one line naming the path."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args in (["--home", a_file, "init"], ["--home", a_file, "list"],
                 ["--home", tmp_path / "h", "compare", "a.safetensors", "b.safetensors", "--report", a_file]):
        rc, _, err = cli(*args)
        assert rc == 2 and f"{a_file} is a file" in err and len(err.strip().splitlines()) == 1, (args, err)
    assert a_file.read_text() == "x" and not (tmp_path / "h").exists()


def test_refusals_say_what_is_wrong(cli, tmp_path):
    """An empty/device config said "not found"; a missing --catalog-url file said "no registry at
    <home>"; base create --config offered lora-finetune (a training config) as a model config."""
    rc, _, err = cli("--home", tmp_path / "h", "train", "--config", "/dev/null")
    assert rc == 2 and "/dev/null is not a regular file" in err and "not found" not in err, err
    url = f"sqlite:///{tmp_path}/elsewhere/catalog.db"
    rc, _, err = cli("--home", tmp_path / "h", "--catalog-url", url, "list")
    assert rc == 2 and f"no catalog at {tmp_path}/elsewhere/catalog.db" in err and "--catalog-url" in err, err
    rc, _, err = cli("--home", tmp_path / "h", "base", "create", "--config", "nope", "--output", tmp_path / "b.st")
    assert rc == 2 and "lbm-tiny" in err and "lora-finetune" not in err, err
    rc, _, err = cli("--home", tmp_path / "h", "train", "--config", "nope")
    assert rc == 2 and "training config not found: nope (built-in: lora-finetune)" in err, err
    rc, _, err = cli("--home", "~no-such-user-here", "list")
    assert rc == 2 and "no such user" in err and "Traceback" not in err, err


def test_unreadable_images_say_why(cli, tmp_path, tiny_base_path):
    """``infer --source trunc.jpg`` and ``compare --source bomb.png`` said "no readable images"
    without the reason."""
    import io
    import struct
    import zlib

    from fixtures.serve import write_random_lora
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])   # a valid header, half the data
    rc, _, err = cli("--home", tmp_path / "h", "infer", tiny_base_path, "--source", trunc, "--output",
                     tmp_path / "o.png", "--device", "cpu")
    assert rc == 2 and f"{trunc}: " in err and "truncated" in err.lower(), err
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", 30000, 30000) + png[24:29]              # the header claims 900 M pixels
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(png))
    a = write_random_lora(tiny_base_path, tmp_path / "a.safetensors", seed=1)
    b = write_random_lora(tiny_base_path, tmp_path / "b.safetensors", seed=2)
    rc, _, err = cli("--home", tmp_path / "h", "compare", a, b, "--source", bomb, "--device", "cpu")
    assert rc == 2 and f"{bomb}: too large" in err and "900000000 pixels" in err, err


def test_validation_shards_empty_list_means_no_validation(cli, tmp_path, tiny_base_path):
    """The config documents ``validation_shards: []`` as no validation; ``--validation-shards '[]'``
    was taken as a file named '[]'."""
    from lbm_registry.train.synth import write_synth_shards

    shard = write_synth_shards(tmp_path / "d", 2, resolution=32)[0]
    args = ["--home", tmp_path / "h", "train", "--config", "lora-finetune", "--base", tiny_base_path,
            "--model-config", "lbm-tiny", "--train-shards", shard, "--lora", "no-such-lora-here"]
    rc, _, err = cli(*args, "--validation-shards", "[]")
    assert rc == 2 and "no-such-lora-here" in err and "[]" not in err, err   # got past the shards
    rc, _, err = cli(*args, "--validation-shards", "[]", "--validation-shards", shard)
    assert rc == 2 and "cannot be given with shard paths" in err, err


def _all_commands():
    import typer.main

    from lbm_registry.cli.main import app

    root = typer.main.get_command(app)
    todo = [("lbm-reg", root)]
    while todo:
        path, cmd = todo.pop()
        yield path, cmd
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            todo.append((f"{path} {name}", sub))


def test_help_reads_like_the_readme():
    """Usage lines said ``{ref}``, repeatable options ``<list[str]>``; --seed had no help text."""
    import click

    checked = 0
    for path, cmd in _all_commands():
        ctx = click.Context(cmd, info_name=path)
        text = cmd.get_help(ctx) if hasattr(cmd, "get_help") else ""
        assert "{" not in text.splitlines()[0] and "list[" not in text, (path, text)
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option" and not getattr(p, "hidden", False):
                assert (getattr(p, "help", None) or "").strip(), (path, p.opts)
        checked += 1
    assert checked > 25
