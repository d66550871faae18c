"""The exact-base rule on a tiny SDXL-shaped UNet (add_embedding, wider to_k/to_v, 4->8 conv_in)."""

from __future__ import annotations

import pytest
import torch

from lbm_registry.errors import ArchitectureError
from lbm_registry.lbm.checkpoint import CheckpointReader, save_safetensors
from lbm_registry.lbm.config import config_from_dict
from lbm_registry.lbm.exact_base import adapt_sdxl_unet, fit_tensor
from lbm_registry.lbm.model import build_model


@pytest.fixture(scope="module")
def sdxl_like(tiny_config):
    """A tiny UNet shaped like SDXL: text_time add_embedding, cross_attention_dim 128, 4 in-channels."""
    from diffusers import UNet2DConditionModel

    kw = tiny_config.denoiser.diffusers_kwargs()
    kw.update(cross_attention_dim=128, addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=8 * 6 + 128)
    torch.manual_seed(0)
    return UNet2DConditionModel(**kw).state_dict()


@pytest.fixture(scope="module")
def target_config(tiny_config):
    data = tiny_config.to_dict()
    data["denoiser"]["in_channels"] = 8
    data["bridge"]["conditioning_images_keys"] = ["mask"]
    return config_from_dict(data)


def test_rule_slices_pads_drops_and_copies(sdxl_like, target_config):
    target = {k: tuple(v.shape) for k, v in build_model(target_config, meta=True).denoiser.state_dict().items()}
    out, report = adapt_sdxl_unet(sdxl_like, target)
    assert set(out) == set(target)
    assert report.dropped and all(k.startswith("add_embedding.") for k in report.dropped)
    assert not any(k.startswith("add_embedding.") for k in out)

    # conv_in 4 -> 8 input channels: zeros appended, the rest bit-exact
    ci = out["conv_in.weight"]
    assert ci.shape[1] == 8
    assert torch.equal(ci[:, :4], sdxl_like["conv_in.weight"])
    assert torch.count_nonzero(ci[:, 4:]) == 0
    assert [k for k, _, _ in report.padded] == ["conv_in.weight"]

    # attn2.to_k/to_v: 128 -> 64/96 inputs: leading slice
    sliced = {k for k, _, _ in report.sliced}
    assert sliced and all(".attn2.to_" in k for k in sliced)
    for k in sliced:
        assert torch.equal(out[k], sdxl_like[k][:, : target[k][1]])
    # attn1 (self-attention) keeps its shape and is copied bit-exact
    assert all(k in report.copied for k in target if ".attn1.to_k" in k)
    for k in report.copied:
        assert torch.equal(out[k], sdxl_like[k])
    assert len(report.copied) + len(report.sliced) + len(report.padded) == len(target)


def test_other_shape_difference_is_an_error(sdxl_like, target_config):
    target = {k: tuple(v.shape) for k, v in build_model(target_config, meta=True).denoiser.state_dict().items()}
    bad = dict(sdxl_like)
    bad["conv_out.weight"] = torch.zeros(5, 32, 3, 3)
    with pytest.raises(ArchitectureError, match="conv_out.weight"):
        adapt_sdxl_unet(bad, target)
    missing = {k: v for k, v in sdxl_like.items() if k != "conv_out.bias"}
    with pytest.raises(ArchitectureError, match="missing"):
        adapt_sdxl_unet(missing, target)


def test_fit_tensor_mixed():
    t = torch.arange(12.0).reshape(3, 4)
    out, how = fit_tensor(t, (2, 6))
    assert how == "padded"
    assert torch.equal(out[:, :4], t[:2]) and torch.count_nonzero(out[:, 4:]) == 0


def test_base_create_from_sdxl_file(sdxl_like, tiny_config, tmp_path):
    """End to end: diffusers-folder SDXL UNet -> exact base file that loads back strictly."""
    from lbm_registry.api.assets.base import create_base
    from lbm_registry.lbm.loading import load_lbm

    # an SDXL UNet in LBM-tiny's own shape family: only cross-attention inputs differ
    folder = tmp_path / "sdxl" / "unet"
    folder.mkdir(parents=True)
    save_safetensors(sdxl_like, folder / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "base.safetensors"
    result = create_base("configs/lbm-tiny.yaml", sdxl_unet=tmp_path / "sdxl", output=out)
    assert result["counts"]["dropped"] > 0 and result["counts"]["sliced"] > 0
    assert result["counts"]["padded"] == 0
    model = load_lbm(out, tiny_config)
    assert torch.equal(model.denoiser.conv_in.weight, sdxl_like["conv_in.weight"])
    reader = CheckpointReader(out)
    assert reader.metadata["lbm_registry_base"] == "exact"
