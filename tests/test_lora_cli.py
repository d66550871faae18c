"""``lbm-reg extract / layers / validate / export`` through the Typer app."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lbm_registry.cli.main import app, main

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def run(*args: str):
    res = CliRunner().invoke(app, list(args))
    return res


def test_extract_layers_validate_export(make_tuned, tiny_base_path, tmp_path):
    home = str(tmp_path / "home")
    tuned = make_tuned(rank=4)
    out = tmp_path / "cli.safetensors"
    res = run("--home", home, "extract", "--base", str(tiny_base_path), "--tuned", str(tuned), "--rank", "4",
              "--conv-rank", "4", "--dtype", "fp32", "--output", str(out), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["layers_extracted"] == 792 and data["max_error"] < 1e-4 and out.is_file()
    assert data["base"]["sha256"] and len(data["layers"]) == 792

    res = run("--home", home, "extract", "--base", str(tiny_base_path), "--tuned", str(tuned), "--rank", "2",
              "--output", str(tmp_path / "table.safetensors"))
    assert res.exit_code == 0, res.output
    assert "LoRA extraction" in res.stdout and "worst layers" in res.stdout

    res = run("--home", home, "layers", str(out), "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 792 and {"module", "rank", "alpha", "shape", "kind"} <= set(rows[0])
    res = run("--home", home, "layers", str(out))
    assert res.exit_code == 0 and "conv3x3" in res.stdout

    names = tmp_path / "names.txt"
    res = run("--home", home, "validate", str(out), "--base", str(tiny_base_path), "--tuned", str(tuned),
              "--layers-file", str(names), "--json")
    assert res.exit_code == 0, res.output
    v = json.loads(res.stdout)
    assert v["functional"]["functional_error"] < 1e-3 and v["coverage"]["found"] == 792
    assert len(names.read_text().splitlines()) == 792

    res = run("--home", home, "export", str(out), "--format", "kohya", "--output", str(tmp_path / "k.safetensors"))
    assert res.exit_code == 0 and (tmp_path / "k.safetensors").is_file()


def test_plain_files_are_hashed_beside_the_work_and_the_hashes_cached(make_tuned, tiny_base_path, tmp_path):
    """Two plain files: open_pair starts hashing both files and the base's tensor bytes in the
    background; settle() fills them in, and those are what the LoRA records. In a registry the
    three hashes are cached, so the next extraction from the same files hashes nothing."""
    from lbm_registry.api.assets.lora import open_pair, tensor_sha_of
    from lbm_registry.lora.format import read_lora
    from lbm_registry.registry.blobs import sha256_file
    from lbm_registry.safetensors_layout import tensor_sha256
    from lbm_registry.settings import WorkspaceSettings

    tuned = make_tuned(rank=2, seed=5)
    home = tmp_path / "home"
    settings = WorkspaceSettings.resolve(home=home)
    pair = open_pair(str(tiny_base_path), str(tuned), settings)
    assert [what for _, what, _ in pair.hashes.jobs] == ["sha256", "sha256", "tensor_sha256"]
    assert pair.base.sha256 == "" and pair.tuned.sha256 == ""   # still running
    pair.settle(settings)
    assert pair.base.facts["tensor_sha256"] == tensor_sha256(tiny_base_path) == tensor_sha_of(pair.base)
    assert (pair.base.sha256, pair.tuned.sha256) == (sha256_file(tiny_base_path), sha256_file(tuned))
    assert "tensor_sha256" not in (pair.tuned.facts or {})
    assert run("--home", str(home), "init").exit_code == 0
    for i in range(2):
        out = tmp_path / f"l{i}.safetensors"
        res = run("--home", str(home), "extract", "--base", str(tiny_base_path), "--tuned", str(tuned),
                  "--rank", "2", "--output", str(out))
        assert res.exit_code == 0, res.output
        info = read_lora(out).info
        assert info["base_tensor_sha256"] == tensor_sha256(tiny_base_path)
        assert (info["base_sha256"], info["tuned_sha256"]) == (sha256_file(tiny_base_path), sha256_file(tuned))
    assert (tmp_path / "l0.safetensors").read_bytes() == (tmp_path / "l1.safetensors").read_bytes()
    again = open_pair(str(tiny_base_path), str(tuned), settings)   # all three from the hash cache
    assert again.hashes.jobs == [] and again.base.sha256 == pair.base.sha256
    assert again.base.facts["tensor_sha256"] == pair.base.facts["tensor_sha256"]


def test_bad_input_is_one_line_and_writes_nothing(tiny_base_path, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["--home", str(tmp_path / "h"), "extract", "--base", str(tiny_base_path), "--tuned",
              str(tmp_path / "missing.safetensors"), "--output", str(out)])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "error:" in err and "not found" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["--home", str(tmp_path / "h"), "extract", "--base", str(tiny_base_path), "--tuned",
              str(tiny_base_path), "--rank", "0", "--output", str(out)])
    assert exc.value.code != 0 and "--rank must be a positive integer" in capsys.readouterr().err


def test_cli_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, lbm_registry.cli.lora, lbm_registry.api.assets.lora; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
