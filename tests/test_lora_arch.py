"""The diffusers-free denoiser shape table matches diffusers key for key."""

from __future__ import annotations

import pytest

from lbm_registry.lbm.config import config_from_dict, load_config
from lbm_registry.lbm.model import expected_shapes
from lbm_registry.lbm.unet_shapes import denoiser_shapes


def _variant(**denoiser) -> dict:
    d = load_config("configs/lbm-tiny.yaml").to_dict()
    d["denoiser"].update(denoiser)
    return d


@pytest.mark.parametrize("cfg", [
    load_config("configs/lbm-relighting.yaml").to_dict(),
    load_config("configs/lbm-tiny.yaml").to_dict(),
    _variant(block_out_channels=[32, 64, 192], cross_attention_dim=[32, 64, 192]),
    _variant(layers_per_block=1, transformer_layers_per_block=[1, 1, 3], attention_head_dim=[2, 2, 4]),
    _variant(use_linear_projection=False),
    _variant(cross_attention_dim=[16, 16, 16], in_channels=8, out_channels=4),
], ids=["full", "tiny", "wide", "shallow", "conv-proj", "cross-dim"])
def test_matches_diffusers(cfg):
    if cfg["denoiser"].get("in_channels") == 8:
        cfg["bridge"]["conditioning_images_keys"] = ["mask"]
    config = config_from_dict(cfg)
    want = {k[len("denoiser."):]: tuple(v) for k, v in expected_shapes(config).items() if k.startswith("denoiser.")}
    assert denoiser_shapes(config.denoiser) == want


def test_unknown_blocks_fall_back():
    config = config_from_dict(_variant(down_block_types=["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]))
    assert denoiser_shapes(config.denoiser) is None


@pytest.mark.parametrize("vae", [{}, {"layers_per_block": 2, "block_out_channels": [8, 16, 24]},
                                 {"latent_channels": 8, "in_channels": 4, "out_channels": 4}],
                         ids=["tiny", "deep-3-blocks", "latent-8"])
def test_whole_checkpoint_table_matches_diffusers(vae):
    """lbm_shapes (denoiser + VAE + num_iterations) is the state dict diffusers builds, key for key."""
    from lbm_registry.lbm.unet_shapes import lbm_shapes

    d = load_config("configs/lbm-tiny.yaml").to_dict()
    d["vae"].update(vae)
    n = len(d["vae"]["block_out_channels"])
    d["vae"]["down_block_types"] = ["DownEncoderBlock2D"] * n
    d["vae"]["up_block_types"] = ["UpDecoderBlock2D"] * n
    if vae.get("latent_channels"):
        d["denoiser"]["in_channels"] = d["denoiser"]["out_channels"] = vae["latent_channels"]
    config = config_from_dict(d)
    assert lbm_shapes(config) == expected_shapes(config)


def test_full_size_checkpoint_table_matches_diffusers():
    from lbm_registry.lbm.unet_shapes import lbm_shapes

    config = load_config("configs/lbm-relighting.yaml")
    assert lbm_shapes(config) == expected_shapes(config)
