"""lbm.upcast.compute_in: a 16-bit model computes in fp32 module by module, bit for bit as the
same model converted to fp32 up front, while its own weights stay as stored."""

from __future__ import annotations

import pytest
import torch

from lbm_registry.lbm.loading import load_lbm, save_lbm
from lbm_registry.lbm.model import build_model
from lbm_registry.lbm.upcast import compute_in
from lbm_registry.lora.calibrate import collect_stats

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory, tiny_config):
    path = tmp_path_factory.mktemp("bf16") / "tiny-bf16.safetensors"
    return save_lbm(build_model(tiny_config, seed=3), path, dtype=torch.bfloat16)


def test_calibration_statistics_are_identical_to_an_fp32_copy_of_the_model(bf16_path, tiny_config):
    """extract --calibrate on a CPU keeps a bf16 file in bf16 (a third of the memory at full size)
    and computes in fp32: the statistics must be exactly those of the fp32-converted model."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, 64, 64, generator=g) * 2 - 1 for _ in range(2)]
    upfront = collect_stats(load_lbm(bf16_path, tiny_config, dtype=torch.float32), iter(images), steps=1)
    stored = load_lbm(bf16_path, tiny_config, dtype=None)
    assert {p.dtype for p in stored.parameters() if p.is_floating_point()} == {torch.bfloat16}
    with compute_in(stored, torch.float32):
        lazy = collect_stats(stored, iter(images), steps=1, dtype=torch.float32)
    assert upfront.groups.keys() == lazy.groups.keys() and len(lazy.groups) > 100
    for name, group in upfront.groups.items():
        assert torch.equal(group.moment, lazy.groups[name].moment), name
    # the model's own weights were never replaced
    assert {p.dtype for p in stored.parameters() if p.is_floating_point()} == {torch.bfloat16}


def test_a_failing_forward_leaves_the_model_as_it_was(bf16_path, tiny_config):
    model = load_lbm(bf16_path, tiny_config, dtype=None)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError), compute_in(model, torch.float32):
        model.denoiser.conv_in(torch.zeros(1, 3, 8, 8))   # wrong channel count: the conv raises
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    assert not model.denoiser.conv_in._forward_pre_hooks and not model.denoiser.conv_in._forward_hooks
