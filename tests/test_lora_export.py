"""Exports: PEFT/diffusers folders that load with diffusers and peft, kohya key names."""

from __future__ import annotations

import json

import pytest
import torch

from lbm_registry.api.assets.lora import export
from lbm_registry.errors import LoRAError
from lbm_registry.lora.apply import merge_lora
from lbm_registry.lora.format import read_lora

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def mixed_lora(make_tuned, extract_tiny):
    """Mixed ranks and a non-default alpha, so rank_pattern and alpha_pattern matter."""
    rep = extract_tiny(make_tuned(rank=8, noise=0.1, seed=4), rank=6, conv_rank=3, alpha=2.0, dtype="fp32")
    return rep.result.path


@pytest.fixture()
def fresh_denoiser(tiny_config, tiny_base_path):
    from lbm_registry.lbm.loading import load_lbm

    return load_lbm(tiny_base_path, tiny_config).denoiser


def _merged_weights(den) -> dict[str, torch.Tensor]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in den.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    out = {}
    for k, v in den.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def _expected(den, lora) -> dict[str, torch.Tensor]:
    merge_lora(den, lora)
    return {k: v.clone() for k, v in den.state_dict().items()}


def test_peft_folder_loads_in_diffusers(mixed_lora, lora_settings, tmp_path, tiny_config, tiny_base_path):
    from lbm_registry.lbm.loading import load_lbm

    out = tmp_path / "peft"
    rep = export(str(mixed_lora), fmt="peft", output=out, settings=lora_settings)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert rep.layers == 792
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 2 and len(cfg["target_modules"]) == 792
    assert set(cfg["rank_pattern"].values()) <= {1, 3, 4}   # convs (and tiny layers) differ from r
    lora = read_lora(mixed_lora)
    want = _expected(load_lbm(tiny_base_path, tiny_config).denoiser, lora)

    den = load_lbm(tiny_base_path, tiny_config).denoiser
    den.load_lora_adapter(str(out), prefix=None, weight_name="adapter_model.safetensors")
    got = _merged_weights(den)
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_peft_config_works_with_peft_directly(mixed_lora, lora_settings, tmp_path, tiny_config, tiny_base_path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from lbm_registry.lbm.loading import load_lbm

    out = tmp_path / "peft"
    export(str(mixed_lora), fmt="peft", output=out, settings=lora_settings)
    cfg = LoraConfig(**json.loads((out / "adapter_config.json").read_text()))
    den = load_lbm(tiny_base_path, tiny_config).denoiser
    den = inject_adapter_in_model(cfg, den)
    res = set_peft_model_state_dict(den, load_file(str(out / "adapter_model.safetensors")))
    assert not [k for k in res.unexpected_keys if "lora_" in k]
    got = _merged_weights(den)
    want = _expected(load_lbm(tiny_base_path, tiny_config).denoiser, read_lora(mixed_lora))
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_kohya_keys(mixed_lora, lora_settings, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "k" / "lora_kohya.safetensors"
    export(str(mixed_lora), fmt="kohya", output=out, settings=lora_settings)
    f = safe_open(str(out), "pt")
    keys = set(f.keys())
    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"} <= keys
    assert "lora_unet_conv_in.lora_down.weight" in keys
    assert len(keys) == 3 * 792 and all(k.startswith("lora_unet_") for k in keys)
    assert f.get_tensor(f"{base}.alpha").item() == 2.0
    assert f.metadata()["ss_network_module"] == "networks.lora"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_export_bad_format_and_target(mixed_lora, lora_settings, tmp_path):
    with pytest.raises(LoRAError, match="unknown export format"):
        export(str(mixed_lora), fmt="onnx", output=tmp_path / "x", settings=lora_settings)
    with pytest.raises(LoRAError, match="folder"):
        export(str(mixed_lora), fmt="kohya", output=tmp_path, settings=lora_settings)
