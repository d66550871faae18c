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


def test_import_of_a_base_needs_neither_torch_nor_diffusers(fresh_settings, tiny_base_path, cli_probe):
    s = fresh_settings()
    p = cli_probe("--home", s.home, "import", tiny_base_path, "--name", "tb", "--kind", "base")
    assert p.rc == 0, p.err
    assert "registered tb@1" in p.out
    assert not p.heavy & {"torch", "diffusers"}, p.heavy


def test_import_refuses_a_name_of_another_kind_first(fresh_settings, tiny_base_path, make_weights, cli_probe):
    """The name check comes before the checkpoint is read (nothing heavy is loaded for it)."""
    from lbm_registry.api.registry import register_asset

    s = fresh_settings()
    register_asset(make_weights(), name="relight", kind="lora", settings=s, lineage={"base": "ab" * 32})
    p = cli_probe("--home", s.home, "import", tiny_base_path, "--name", "relight", "--kind", "model")
    assert p.rc == 2
    assert "'relight' is a lora: it cannot get a model version" in p.err
    assert not p.heavy & {"torch", "diffusers", "mlflow"}, p.heavy
