"""``lbm-reg`` registry commands end to end (in-process through ``main``), plus import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys


def test_list_show_lineage(populated, cli):
    home = populated["settings"].home
    rc, out, _ = cli("--home", home, "list")
    assert rc == 0 and "relight" in out and "sdxl-base" in out and "prod→1" in out
    rc, out, _ = cli("--home", home, "list", "--json", "--kind", "lora")
    rows = json.loads(out)
    assert rc == 0 and {r["name"] for r in rows} == {"relight"} and rows[0]["latest"] == 2
    rc, out, _ = cli("--home", home, "show", "relight@prod", "--json")
    info = json.loads(out)
    assert info["ref"] == "relight@1" and info["lineage"]["base"]["ref"] == "sdxl-base@1"
    assert info["aliases"] == ["prod"] and info["descendants"][0]["ref"] == "relight@2"
    rc, out, _ = cli("--home", home, "show", "relight")
    assert rc == 0 and "relight@2" in out and "parent" in out and "relight@1" in out and "layers" in out
    rc, out, _ = cli("--home", home, "lineage", "relight@2")
    assert rc == 0 and "made from" in out and "sdxl-base@1" in out and "tuned@1" in out
    rc, out, _ = cli("--home", home, "lineage", "sdxl-base", "--json")
    assert json.loads(out)["down"][0]["ref"] == "relight@1"


def test_alias_commands(populated, cli):
    home = populated["settings"].home
    rc, out, _ = cli("--home", home, "alias", "set", "relight@2", "canary")
    assert rc == 0 and "relight@canary → relight@2" in out
    rc, out, _ = cli("--home", home, "show", "relight@canary", "--json")
    assert json.loads(out)["version"] == 2
    rc, out, _ = cli("--home", home, "alias", "rm", "relight", "canary")
    assert rc == 0 and "removed" in out
    rc, _, err = cli("--home", home, "alias", "set", "relight@1", "v3")
    assert rc != 0 and "reserved" in err


def test_unknown_reference_is_one_line_error_with_suggestion(populated, cli):
    rc, out, err = cli("--home", populated["settings"].home, "show", "relite")
    assert rc != 0 and out == ""
    assert err.strip().count("\n") == 0
    assert "error: unknown reference 'relite'" in err and "did you mean relight?" in err
    rc, _, err = cli("--home", populated["settings"].home, "show", "relight@99")
    assert rc != 0 and "no version 99 (versions: 1, 2)" in err


def test_doctor_and_gc_json(populated, cli):
    home = populated["settings"].home
    rc, out, _ = cli("--home", home, "doctor", "--json")
    report = json.loads(out)
    assert rc == 0 and report["ok"] and report["checked"]["mlflow"]
    rc, out, _ = cli("--home", home, "gc", "--json")
    assert rc == 0 and json.loads(out)["ok"]


def test_init_and_empty_list(tmp_path, cli, mlflow_template):
    import shutil

    home = tmp_path / "fresh"
    rc, _, err = cli("--home", home, "list")  # read commands never create a workspace
    assert rc == 2 and "no registry at" in err and not home.exists()
    home.mkdir()
    shutil.copyfile(mlflow_template, home / "mlflow.db")  # MLflow's own schema: see the fixture
    rc, out, _ = cli("--home", home, "init", "--json")
    info = json.loads(out)
    assert rc == 0 and (home / "catalog.db").is_file() and (home / "mlflow.db").is_file()
    assert info["schema"] and info["experiment_id"]
    rc, out, _ = cli("--home", home, "init")  # idempotent
    assert rc == 0 and "workspace ready" in out


def test_import_verifies_lbm_checkpoints(reg_settings, tiny_base_path, tiny_config_path, make_weights, cli):
    home = reg_settings.home
    rc, out, err = cli("--home", home, "import", tiny_base_path, "--name", "tiny-base", "--kind", "base")
    assert rc == 0, err
    assert "registered tiny-base@1" in out
    rc, out, _ = cli("--home", home, "show", "tiny-base", "--json")
    info = json.loads(out)
    assert info["kind"] == "base" and info["config"]["name"] == "lbm-tiny" and info["facts"]["tensors"] > 1000
    # a file that is not an LBM checkpoint
    rc, _, err = cli("--home", home, "import", make_weights(), "--name", "junk", "--kind", "model",
                     "--config", tiny_config_path)
    assert rc != 0 and "not an LBM checkpoint" in err
    # no config anywhere
    rc, _, err = cli("--home", home, "import", make_weights(), "--name", "junk", "--kind", "model")
    assert rc != 0 and "--config" in err
    rc, _, err = cli("--home", home, "import", tiny_base_path, "--name", "junk", "--kind", "lora")
    assert rc != 0 and "needs --base" in err
    rc, _, err = cli("--home", home, "import", tiny_base_path, "--name", "junk", "--kind", "weights")
    assert rc != 0 and "base, model or lora" in err
    rc, out, _ = cli("--home", home, "list", "--json")
    assert "junk" not in {r["name"] for r in json.loads(out)}


def test_ui_command_serves_this_workspace(reg_settings):
    from lbm_registry.api.registry import ui_command

    cmd = ui_command(reg_settings, port=5123)
    assert cmd[1:3] == ["-m", "lbm_registry.registry.ui"] and "--open" not in cmd
    assert cmd[cmd.index("--backend-store-uri") + 1] == reg_settings.effective_tracking_uri
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"
    opened = ui_command(reg_settings, port=5123, open_browser=True)
    assert opened[opened.index("--open") + 1] == "http://127.0.0.1:5123/#/models?workflowType=machine_learning"


HYGIENE = """
import sys
from lbm_registry.cli.main import main
for args in (["list"], ["list", "--json"], ["show", "relight"], ["show", "relight", "--json"], ["lineage", "relight"]):
    main(["--home", sys.argv[1], *args])
heavy = sorted(m for m in ("torch", "mlflow", "diffusers", "sqlalchemy", "alembic") if m in sys.modules)
assert not heavy, heavy
"""


def test_read_commands_stay_light(populated):
    """list/show/lineage must not import torch, diffusers, mlflow, SQLAlchemy or Alembic."""
    proc = subprocess.run([sys.executable, "-c", HYGIENE, str(populated["settings"].home)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_registry_package_never_imports_torch():
    code = ("import sys, pkgutil, importlib, lbm_registry.registry as r\n"
            "for m in pkgutil.iter_modules(r.__path__): importlib.import_module('lbm_registry.registry.' + m.name)\n"
            "import lbm_registry.api.registry\n"
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
