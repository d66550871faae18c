"""Foundation: configs, model construction, checkpoint IO, exact base, sampler."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest
import torch
from torch import nn

from lbm_registry.errors import ArchitectureError, CheckpointError, ConfigError
from lbm_registry.lbm.checkpoint import CheckpointReader, save_safetensors
from lbm_registry.lbm.config import config_from_dict, load_config
from lbm_registry.lbm.loading import load_lbm, save_lbm
from lbm_registry.lbm.model import build_model, weight_layers


def test_full_config_on_meta_has_lbm_shape():
    cfg = load_config("configs/lbm-relighting.yaml")
    model = build_model(cfg, meta=True)
    assert sum(p.numel() for p in model.denoiser.parameters()) == 2_426_231_044
    layers = weight_layers(model.denoiser)
    kinds = Counter(
        "linear" if isinstance(m, nn.Linear) else f"conv{m.kernel_size[0]}x{m.kernel_size[1]}"
        for m in layers.values()
    )
    assert len(layers) == 792
    assert kinds == {"linear": 741, "conv3x3": 40, "conv1x1": 11}
    assert len(model.denoiser.state_dict()) == 1676
    assert next(model.parameters()).device.type == "meta"


def test_tiny_twin_has_same_key_names(tiny_config):
    full = build_model(load_config("configs/lbm-relighting.yaml"), meta=True)
    tiny = build_model(tiny_config, meta=True)
    assert list(tiny.denoiser.state_dict()) == list(full.denoiser.state_dict())
    assert len(weight_layers(tiny.denoiser)) == 792
    assert 14_000_000 < sum(p.numel() for p in tiny.denoiser.parameters()) < 15_000_000


def test_config_rejects_unknown_and_wrong_fields(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("denoiser:\n  block_out_chanels: [1, 2, 3]\n")
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(bad)
    with pytest.raises(ConfigError, match="layers_per_block"):
        config_from_dict({"denoiser": {"layers_per_block": "two"}})
    with pytest.raises(ConfigError, match="in_channels"):
        config_from_dict({"denoiser": {"in_channels": 5}})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_save_load_round_trip_is_bit_exact(tiny_config, tiny_base_path, tmp_path):
    model = load_lbm(tiny_base_path, tiny_config)
    out = save_lbm(model, tmp_path / "again.safetensors")
    a, b = CheckpointReader(tiny_base_path), CheckpointReader(out)
    assert a.keys() == b.keys()
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k
    assert "lbm_config" in b.metadata
    assert not list(tmp_path.glob(".*.tmp"))


def test_truncated_safetensors_fails_one_line(tiny_base_path, tiny_config, tmp_path):
    data = tiny_base_path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as exc:
        load_lbm(cut, tiny_config)
    assert "\n" not in str(exc.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        CheckpointReader(junk)
    with pytest.raises(CheckpointError, match="not found"):
        CheckpointReader(tmp_path / "missing.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_only_ckpt_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as fh:
        pickle.dump({"state_dict": {"x": _Evil()}}, fh)
    with pytest.raises(CheckpointError, match="pickle"):
        CheckpointReader(path)
    zipped = tmp_path / "evil-zip.ckpt"         # the modern torch.save format: weights_only refuses it
    torch.save({"state_dict": {"x": _Evil()}}, zipped)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        CheckpointReader(zipped)


def test_garbage_and_truncated_ckpt_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        CheckpointReader(garbage)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(64, 64)}}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(cut)
    assert "\n" not in str(err.value)


def test_lightning_ckpt_strips_model_prefix_and_lpips(tiny_base_path, tiny_config, tmp_path):
    sd = CheckpointReader(tiny_base_path).state_dict()
    ckpt = {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3}
    ckpt["state_dict"]["lpips_loss.net.weight"] = torch.zeros(2)
    path = tmp_path / "lightning.ckpt"
    torch.save(ckpt, path)
    model = load_lbm(path, tiny_config)
    assert torch.equal(model.denoiser.conv_in.weight, sd["denoiser.conv_in.weight"])


def test_other_architecture_is_refused(tiny_base_path, tmp_path):
    full = load_config("configs/lbm-relighting.yaml")
    with pytest.raises(ArchitectureError, match="wrong shape"):
        from lbm_registry.lbm.loading import verify_checkpoint

        verify_checkpoint(CheckpointReader(tiny_base_path), full)
    other = tmp_path / "other.safetensors"
    save_safetensors({"foo.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ArchitectureError, match="not an LBM checkpoint"):
        load_lbm(other, full)


def test_nan_weights_are_refused(tiny_base_path, tiny_config, tmp_path):
    sd = CheckpointReader(tiny_base_path).state_dict()
    sd = {k: v.clone() for k, v in sd.items()}
    sd["denoiser.conv_in.weight"][0, 0, 0, 0] = float("nan")
    bad = save_safetensors(sd, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN"):
        load_lbm(bad, tiny_config)


def test_one_step_sample_is_source_minus_velocity(tiny_config):
    from lbm_registry.lbm.sampler import sample

    model = build_model(tiny_config, seed=0).eval()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = model.velocity(z, torch.ones(1))
        out = sample(model.velocity, z, steps=1)
    assert torch.allclose(out, z - v, atol=0, rtol=0)


def test_multi_step_sampler_is_seeded(tiny_config):
    from lbm_registry.lbm.sampler import sample, sigma_schedule

    assert sigma_schedule(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    model = build_model(tiny_config, seed=0).eval()
    z = torch.randn(1, 4, 16, 16)
    a = sample(model.velocity, z, steps=3, generator=torch.Generator().manual_seed(1))
    b = sample(model.velocity, z, steps=3, generator=torch.Generator().manual_seed(1))
    c = sample(model.velocity, z, steps=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bridge_interpolant_endpoints():
    from lbm_registry.lbm.sampler import bridge_interpolant

    src, tgt = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x1, v = bridge_interpolant(src, tgt, torch.ones(2), 0.005)
    x0, _ = bridge_interpolant(src, tgt, torch.zeros(2), 0.005)
    assert torch.allclose(x1, src) and torch.allclose(x0, tgt) and torch.allclose(v, src - tgt)


def test_all_finite_is_exact_even_when_the_sum_overflows():
    """The one-sum finiteness test: NaN/Inf anywhere are caught (also +Inf and -Inf together),
    and finite values whose sum overflows fall back to the elementwise test."""
    import torch

    from lbm_registry.lbm.checkpoint import all_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.linspace(-1, 1, 1000).to(dtype)
        assert all_finite(t)
        for bad in (float("nan"), float("inf"), -float("inf")):
            u = t.clone()
            u[417] = bad
            assert not all_finite(u), (dtype, bad)
        both = t.clone()
        both[1], both[2] = float("inf"), -float("inf")
        assert not all_finite(both)
    huge = torch.full((8,), 3.0e38)          # finite, but the fp32 sum overflows
    assert all_finite(huge)
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5))


def test_release_freed_memory_returns_a_dropped_models_heap_to_the_os():
    """Layers under glibc's (grown) mmap threshold stay in the heap when freed: after
    ``extract --calibrate`` dropped its fp32 model the process held ~9 GB during the extraction
    (benchmarks/extract_aware.py). ``release_freed_memory`` hands them back."""
    import gc

    import psutil

    from lbm_registry.lbm.device import release_freed_memory

    proc = psutil.Process()
    first = torch.empty(640, 2560)   # 6.5 MB: freeing it raises glibc's mmap threshold past that size
    del first
    layers = [torch.ones(640, 2560) for _ in range(48)]   # ~315 MB of "model" in the heap
    held = proc.memory_info().rss
    del layers
    gc.collect()
    if not release_freed_memory():
        pytest.skip("no malloc_trim in this C library")
    assert proc.memory_info().rss < held - 200 * 2**20
