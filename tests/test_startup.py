"""Start-up: what each command imports and how early it checks its input (issue 11).

Every test here runs real ``lbm-reg`` subprocesses (``cli_probe``) or real library calls, and
asserts what was loaded or refused, never how long it took (timings live in
``benchmarks/cli_latency.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from lbm_registry.errors import CheckpointError


def test_verify_checkpoint_builds_no_model(tiny_base_path, tiny_config, monkeypatch):
    """The key/shape table comes from the config: building the model (diffusers) is not needed."""
    import lbm_registry.lbm.model as model_mod
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.loading import verify_checkpoint

    def boom(*a, **k):
        raise AssertionError("verify_checkpoint built a model")

    monkeypatch.setattr(model_mod, "build_model", boom)
    monkeypatch.setattr(model_mod, "expected_shapes", boom)
    with CheckpointReader(tiny_base_path) as reader:
        verify_checkpoint(reader, tiny_config)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_header_finite_scan(tmp_path, dtype, bad):
    """The torch-free NaN/Inf scan agrees with torch for every float dtype, naming the bad key."""
    import torch
    from safetensors.torch import save_file as save_torch

    from lbm_registry.lbm.header import SafetensorsHeader

    good = torch.randn(17, 5).to(getattr(torch, dtype))
    worse = torch.randn(300).to(getattr(torch, dtype))
    if bad is not None:
        worse[123] = bad
    path = tmp_path / "w.safetensors"
    save_torch({"a.weight": good, "b.weight": worse, "n": torch.arange(4)}, str(path))
    header = SafetensorsHeader(path)
    assert header.dtype_counts() == {dtype: 2, "int64": 1}
    if bad is None:
        header.check_finite()
    else:
        with pytest.raises(CheckpointError, match="'b.weight' contains NaN or Inf"):
            header.check_finite()


def test_header_refuses_malformed_entries(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.zeros(3, dtype=np.float32)}, str(path))
    assert SafetensorsHeaderShapes(path) == {"a": (3,)}
    with pytest.raises(CheckpointError, match="file not found"):
        SafetensorsHeaderShapes(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3]       ")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SafetensorsHeaderShapes(tmp_path / "junk.safetensors")


def SafetensorsHeaderShapes(path):  # noqa: N802  (reads like the class it wraps)
    from lbm_registry.lbm.header import SafetensorsHeader

    return SafetensorsHeader(path).shapes()


def test_import_of_a_base_needs_neither_torch_nor_diffusers_nor_mlflow(fresh_settings, tiny_base_path, cli_probe):
    """Verifying and registering a base needs no model, and its MLflow mirror in a workspace's
    own SQLite store needs no MLflow (registry/mlflow_sqlite.py). The probe picture (issue 12)
    runs the base, so it is what loads torch: off here (``--probe off`` and ``LBM_REG_PROBE=0``)."""
    from lbm_registry.api.registry import init_workspace

    s = fresh_settings()
    init_workspace(s)  # the store exists (as after the first registration or 'lbm-reg init')
    p = cli_probe("--home", s.home, "import", tiny_base_path, "--name", "tb", "--kind", "base",
                  env={"LBM_REG_PROBE": "0"})
    assert p.rc == 0, p.err
    assert "registered tb@1" in p.out
    assert not p.heavy & {"torch", "diffusers", "mlflow", "sqlalchemy", "alembic"}, p.heavy


def test_import_refuses_a_name_of_another_kind_first(fresh_settings, tiny_base_path, make_weights, cli_probe):
    """The name check comes before the checkpoint is read (nothing heavy is loaded for it)."""
    from lbm_registry.api.registry import register_asset

    s = fresh_settings()
    register_asset(make_weights(), name="relight", kind="lora", settings=s, lineage={"base": "ab" * 32})
    p = cli_probe("--home", s.home, "import", tiny_base_path, "--name", "relight", "--kind", "model")
    assert p.rc == 2
    assert "'relight' is a lora: it cannot get a model version" in p.err
    assert not p.heavy & {"torch", "diffusers", "mlflow"}, p.heavy


def test_late_checks_come_first(fresh_settings, make_weights, tmp_path, cli_probe_many):
    """Issue 11 item 10 and its siblings: each wrong option, file, name or reference is refused
    (one line, exit 2) before torch or diffusers is imported, so before any model is built."""
    from lbm_registry.api.registry import register_asset

    s = fresh_settings()
    base = register_asset(make_weights(), name="tb", kind="base", settings=s)
    register_asset(make_weights(), name="relight", kind="lora", settings=s, lineage={"base": base})
    junk = make_weights()
    out = tmp_path / "out.safetensors"
    img = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)  # a real image: infer checks its inputs before the references
    h = ["--home", s.home]
    cases = [
        (["base", "create", "--config", "lbm-tiny", "--output", out, "--dtype", "int4"],
         "unknown --dtype 'int4': use fp32, bf16 or fp16"),
        (["base", "create", "--config", "lbm-tiny", "--output", out, "--sdxl-unet", tmp_path / "nope"],
         "--sdxl-unet: file not found"),
        (["base", "create", "--config", "lbm-tiny", "--output", out, "--sdxl-unet", tmp_path],
         "no diffusion_pytorch_model"),
        (["base", "create", "--config", "lbm-tiny", "--output", out, "--sdxl-unet", junk],
         "not an SDXL UNet for this config"),
        (["base", "create", "--config", "lbm-tiny", "--output", out, "--vae", junk], "not an AutoencoderKL VAE"),
        (["base", "create", "--config", "lbm-tiny", "--output", tmp_path], "is a folder"),
        (["base", "create", "--config", "lbm-nope", "--output", out], "config not found"),
        ([*h, "base", "create", "--config", "lbm-tiny", "--register", "relight"], "'relight' is a lora"),
        ([*h, "import", junk, "--name", "relight", "--kind", "model"], "'relight' is a lora"),
        ([*h, "import", tmp_path / "nope.safetensors", "--name", "x", "--kind", "base"], "file not found"),
        ([*h, "import", junk, "--name", "newlora", "--kind", "lora"], "import --kind lora needs --base REF"),
        ([*h, "resize", "nope", "--rank", "2", "-o", out], "unknown reference 'nope'"),
        ([*h, "resize", "relight", "--rank", "2", "-o", out, "--dtype", "int4"], "unknown --dtype 'int4'"),
        ([*h, "resize", "relight", "--rank", "2", "--register", "tb"], "'tb' is a base"),
        ([*h, "merge", "relight", "nope", "-o", out], "unknown reference 'nope'"),
        # an output whose folder cannot exist (a file stands there): refused before any work
        ([*h, "infer", "tb", "--source", img, "-o", junk / "o.png"], "is a file, not a folder"),
        ([*h, "resize", "relight", "--rank", "2", "-o", junk / "x.safetensors"], "is a file, not a folder"),
        ([*h, "extract", "--base", "tb", "--tuned", "tb", "-o", junk / "x.safetensors"], "is a file, not a folder"),
        (["base", "create", "--config", "lbm-tiny", "--output", junk / "x.safetensors"], "is a file, not a folder"),
        (["data", "synth", "--output", junk, "--n", "2"], "is a file, not a folder"),
        ([*h, "extract", "--base", "nope", "--tuned", "tb", "-o", out], "unknown reference 'nope'"),
        ([*h, "extract", "--base", "tb", "--tuned", "nope", "-o", out], "unknown reference 'nope'"),
        ([*h, "extract", "--base", "tb", "--tuned", "tb", "-o", out, "--dtype", "int4"], "unknown --dtype 'int4'"),
        ([*h, "extract", "--base", "tb", "--tuned", "tb", "--register", "tb"], "'tb' is a base"),
        ([*h, "validate", "nope"], "unknown reference 'nope'"),
        ([*h, "layers", "nope"], "unknown reference 'nope'"),
        ([*h, "export", "nope", "--format", "peft", "-o", tmp_path / "x"], "unknown reference 'nope'"),
        ([*h, "export", "relight", "--format", "onnx", "-o", tmp_path / "x"], "unknown export format 'onnx'"),
        ([*h, "infer", "nope", "--source", img, "-o", tmp_path / "o.png"], "unknown reference 'nope'"),
        ([*h, "infer", "relight", "--lora", "nope", "--source", img, "-o", tmp_path / "o.png"],
         "unknown reference 'nope'"),
        ([*h, "infer", "tb", "--dtype", "int4", "--source", img, "-o", tmp_path / "o.png"], "unknown --dtype"),
        ([*h, "compare", "nope", "relight"], "unknown reference 'nope'"),
        ([*h, "train", "--config", "lora-finetune", "--base", "nope"],
         "base 'nope' (config key base, option --base): unknown reference 'nope'"),
        # the config file's own default LoRA, which the user never typed, is named with its key
        ([*h, "train", "--config", "lora-finetune", "--base", "tb", "--lora", "nope@3"],
         "lora 'nope@3' (config key lora, option --lora): unknown asset 'nope'; or start a fresh LoRA"),
        ([*h, "train", "--config", "lbm-tiny", "--base", "tb"], "is an LBM model config, not a training config"),
    ]
    results = cli_probe_many([c for c, _ in cases])
    for (args, want), got in zip(cases, results, strict=True):
        assert got["rc"] == 2, (args, got)
        assert want in got["err"], (args, got["err"])
        assert len(got["err"].strip().splitlines()) == 1, (args, got["err"])
        assert got["err"] == got["err"].lstrip(), (args, got["err"])  # no empty progress-bar line first
        assert not {"torch", "diffusers"} & set(got["heavy"]), (args, got["heavy"])


def test_torch_free_option_lists_match_the_real_ones():
    """The option lists checked before torch loads are the ones the torch code accepts."""
    from lbm_registry.api.assets.base import STORAGE_DTYPES
    from lbm_registry.api.assets.lora import EXPORT_FORMATS, LORA_DTYPES
    from lbm_registry.api.run.infer import INFER_DTYPES
    from lbm_registry.lora.export import FORMATS
    from lbm_registry.lora.extract import STORAGE_DTYPES as LORA_STORAGE

    assert EXPORT_FORMATS == FORMATS
    from lbm_registry.api.assets.lora_import import NATIVE_META_KEY
    from lbm_registry.lora.format import META_KEY

    assert NATIVE_META_KEY == META_KEY
    assert set(LORA_DTYPES) == set(LORA_STORAGE)
    assert set(STORAGE_DTYPES) == set(LORA_STORAGE)
    import torch

    from lbm_registry.lbm.model import pick_dtype

    for name in INFER_DTYPES:
        pick_dtype(name, torch.device("cpu"))


# -- MLflow without MLflow: aliases, doctor and init read/write the local SQLite store directly --
def test_fast_path_knows_the_installed_mlflow_schema(mlflow_template):
    """The direct SQL of registry/mlflow_sqlite.py was checked against this MLflow's schema; a new
    MLflow (another revision) needs that check again before its revision is added."""
    import sqlite3

    from lbm_registry.registry.mlflow_sqlite import KNOWN_REVISIONS

    with sqlite3.connect(mlflow_template) as conn:
        (rev,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert rev in KNOWN_REVISIONS, f"MLflow schema {rev}: verify mlflow_sqlite.py against it, then add it"


def test_alias_fast_path_is_what_mlflow_sees(fresh_settings, make_weights):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from lbm_registry.api.registry import register_asset, remove_alias, set_alias
    from lbm_registry.registry.mlflow_sqlite import SqliteMirror
    from lbm_registry.registry.workspace import Workspace

    s = fresh_settings()
    v1 = register_asset(make_weights(), name="al", kind="base", settings=s)
    v2 = register_asset(make_weights(), name="al", kind="base", settings=s)
    with Workspace.open(s) as ws:
        assert SqliteMirror.open(ws) is not None  # the fast path is the one under test
    client = MlflowClient(tracking_uri=s.effective_tracking_uri, registry_uri=s.effective_tracking_uri)
    set_alias(v1.ref, "prod", s)
    assert client.get_model_version_by_alias("al", "prod").tags["x-lbm.sha256"] == v1.sha256
    set_alias(v2.ref, "prod", s)  # moving an alias replaces the row
    assert client.get_model_version_by_alias("al", "prod").tags["x-lbm.sha256"] == v2.sha256
    assert client.get_registered_model("al").aliases == {"prod": client.get_model_version_by_alias("al", "prod").version}
    remove_alias("al", "prod", s)
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("al", "prod")


def test_doctor_fast_reads_agree_with_the_mlflow_client(fresh_settings, make_weights, monkeypatch):
    """doctor without --repair finds the same drift through sqlite3 as through MLflow's client."""
    from mlflow import MlflowClient

    import lbm_registry.registry.mlflow_sqlite as fast
    from lbm_registry.api.registry import doctor, register_asset

    s = fresh_settings()
    ok = register_asset(make_weights(), name="dr", kind="base", settings=s)
    gone = register_asset(make_weights(), name="dr", kind="base", settings=s)
    register_asset(make_weights(), name="dr", kind="base", settings=s)
    client = MlflowClient(tracking_uri=s.effective_tracking_uri, registry_uri=s.effective_tracking_uri)
    mv = {m.tags["x-lbm.sha256"]: m for m in client.search_model_versions("name = 'dr'")}
    client.delete_model_version("dr", mv[gone.sha256].version)          # drift: a lost model version
    client.delete_run(mv[ok.sha256].run_id)                                # drift: a deleted run
    exp = client.get_experiment_by_name("lbm-registry").experiment_id
    client.create_run(exp, run_name="stray", tags={"lbm.name": "dr"})     # drift: a run nobody knows
    quick = doctor(s)
    monkeypatch.setattr(fast.SqliteMirror, "open", classmethod(lambda cls, ws: None))
    slow = doctor(s)

    def issues(report):
        return sorted((i["kind"], i["subject"] if i["kind"] != "mlflow_orphan_run" else "-", i["detail"])
                      for i in report["issues"])

    assert issues(quick) == issues(slow)
    assert {i[0] for i in issues(quick)} == {"mlflow_missing", "mlflow_orphan_run"}
    assert len(quick["issues"]) == 3 and quick["checked"]["mlflow"] and not quick["ok"]


def test_maintenance_commands_import_no_heavy_module(fresh_settings, make_weights, cli_probe_many):
    """alias set/rm, doctor, gc and a repeated init load neither torch nor diffusers (nor MLflow,
    whose local store they read and write with sqlite3), in one real subprocess."""
    from lbm_registry.api.registry import register_asset

    s = fresh_settings()
    v = register_asset(make_weights(), name="mt", kind="base", settings=s)
    h = ["--home", s.home]
    results = cli_probe_many([[*h, "init"], [*h, "alias", "set", v.ref, "prod"], [*h, "alias", "rm", "mt", "prod"],
                              [*h, "doctor"], [*h, "doctor", "--json"], [*h, "gc"], [*h, "list"]])
    for got in results:
        assert got["rc"] == 0, got
        assert not {"torch", "diffusers", "mlflow"} & set(got["heavy"]), got


# -- the probe picture off the critical path (issue 11 import target, issue 12 pictures) ----------
def _run_files(s, ref):
    from lbm_registry.api.registry import show

    run_id = show(ref, s)["mlflow"]["run_id"]
    return run_id, s.home / "artifacts" / run_id / "artifacts"


def test_import_draws_its_probe_in_the_background(fresh_settings, tiny_base_path, cli_probe):
    """A default CLI import returns once the version is ready, without torch; a detached child
    then draws the probe, adds it to the run and links it from the version page."""
    import sqlite3
    import time

    from lbm_registry.api.registry import init_workspace

    s = fresh_settings()
    init_workspace(s)
    p = cli_probe("--home", s.home, "import", tiny_base_path, "--name", "bg", "--kind", "base",
                  env={"LBM_REG_PROBE": ""})  # as if unset: the CLI's default, auto
    assert p.rc == 0, p.err
    assert "registered bg@1" in p.out and "drawing in the background" in p.out, p.out
    assert not p.heavy & {"torch", "diffusers", "mlflow"}, p.heavy
    run_id, folder = _run_files(s, "bg@1")
    log = s.home / "logs" / "probe.log"
    deadline = time.time() + 120
    while not (log.exists() and "bg@1" in log.read_text()):
        assert time.time() < deadline, "no probe after 120 s"
        time.sleep(0.5)
    assert "attached probe.png to bg@1" in log.read_text(), log.read_text()
    assert (folder / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with sqlite3.connect(s.home / "mlflow.db") as conn:
        (desc,) = conn.execute("SELECT description FROM model_versions WHERE name = 'bg'").fetchone()
    assert f"get-artifact?path=probe.png&run_uuid={run_id}" in desc


def test_import_probe_off_and_bad_mode(fresh_settings, tiny_base_path, cli_probe_many):
    from lbm_registry.api.registry import init_workspace

    s = fresh_settings()
    init_workspace(s)
    h = ["--home", s.home]
    off, bad = cli_probe_many([[*h, "import", tiny_base_path, "--name", "nop", "--kind", "base", "--probe", "off"],
                               [*h, "import", tiny_base_path, "--name", "nop2", "--kind", "base", "--probe", "later"]],
                              env={"LBM_REG_PROBE": "auto"})
    assert off["rc"] == 0, off
    assert bad["rc"] == 2 and "unknown --probe 'later': use auto, wait, off" in bad["err"], bad
    assert not {"torch", "diffusers", "mlflow"} & set(off["heavy"]), off
    _, folder = _run_files(s, "nop@1")
    assert not (folder / "probe.png").exists() and not (s.home / "logs").exists()
