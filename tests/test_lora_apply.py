"""Merging LoRAs into a denoiser: round trips, scales, target checks."""

from __future__ import annotations

import pytest
import torch

from lbm_registry.errors import LoRAError
from lbm_registry.lora.apply import MergedLoRAs, check_lora_targets, layer_shapes, merge_lora, unmerge_lora
from lbm_registry.lora.format import LoRAFile, LoRALayer, read_lora

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def tiny_denoiser(tiny_config, tiny_base_path):
    from lbm_registry.lbm.loading import load_lbm

    return load_lbm(tiny_base_path, tiny_config).denoiser


@pytest.fixture(scope="module")
def rank4_lora(make_tuned, extract_tiny) -> LoRAFile:
    return read_lora(extract_tiny(make_tuned(rank=4), rank=4, conv_rank=4, dtype="fp32").result.path)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_merge_reproduces_tuned_and_unmerge_restores(tiny_denoiser, rank4_lora, make_tuned):
    from lbm_registry.lbm.checkpoint import CheckpointReader

    before = snapshot(tiny_denoiser)
    merge_lora(tiny_denoiser, rank4_lora)
    tuned = CheckpointReader(make_tuned(rank=4))
    for k, v in tiny_denoiser.state_dict().items():
        assert torch.allclose(v, tuned.get("denoiser." + k), atol=1e-6), k
    unmerge_lora(tiny_denoiser, rank4_lora)
    for k, v in tiny_denoiser.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6, rtol=0), k


def test_merge_in_bf16_rounds_once(tiny_config, tiny_base_path, rank4_lora):
    from lbm_registry.lbm.loading import load_lbm

    den = load_lbm(tiny_base_path, tiny_config, dtype=torch.bfloat16).denoiser
    name = "down_blocks.1.attentions.0.proj_in"
    w0 = den.get_submodule(name).weight.detach().clone()
    merge_lora(den, rank4_lora, scale=0.5)
    want = (w0.float() + 0.5 * rank4_lora.layers[name].delta()).to(torch.bfloat16)
    assert torch.equal(den.get_submodule(name).weight, want)
    unmerge_lora(den, rank4_lora, scale=0.5)
    back = den.get_submodule(name).weight.float()
    assert torch.allclose(back, w0.float(), atol=2 * float(w0.float().abs().max()) * 2**-8)


def test_merged_loras_set_scale_exact(tiny_denoiser, rank4_lora, make_tuned, extract_tiny):
    other = read_lora(extract_tiny(make_tuned(rank=4, seed=2), rank=2, conv_rank=2, dtype="fp32").result.path)
    before = snapshot(tiny_denoiser)
    merged = MergedLoRAs(tiny_denoiser, [(rank4_lora, 1.0), (other, 0.5)])
    assert merged.scales == (1.0, 0.5)
    name = "mid_block.attentions.0.transformer_blocks.3.attn1.to_q"
    w = tiny_denoiser.get_submodule(name).weight
    want = before[name + ".weight"] + rank4_lora.layers[name].delta() + 0.5 * other.layers[name].delta()
    assert torch.allclose(w, want, atol=1e-6)
    merged.set_scale(2.0)
    assert merged.scales == (2.0, 1.0) and merged.global_scale == 2.0
    want2 = before[name + ".weight"] + 2 * rank4_lora.layers[name].delta() + other.layers[name].delta()
    assert torch.allclose(w, want2, atol=1e-6)
    merged.set_scale(0.0)
    for k, v in tiny_denoiser.state_dict().items():
        assert torch.equal(v, before[k]), k       # bit-exact base
    merged.set_scale(1.0)
    with merged:
        pass                                      # context exit restores
    for k, v in tiny_denoiser.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_check_lora_targets_names_bad_modules(tiny_denoiser, rank4_lora):
    shapes = layer_shapes(tiny_denoiser)
    check_lora_targets(rank4_lora, shapes)
    bad = LoRAFile(dict(rank4_lora.layers))
    bad.layers["not.a.layer"] = LoRALayer("not.a.layer", torch.zeros(2, 3), torch.zeros(4, 2), 2.0)
    name = "conv_in"
    layer = rank4_lora.layers[name]
    bad.layers[name] = LoRALayer(name, torch.zeros(4, 5, 3, 3), torch.zeros(32, 4, 1, 1), 4.0)
    with pytest.raises(LoRAError) as exc:
        check_lora_targets(bad, shapes)
    msg = str(exc.value)
    assert "not.a.layer" in msg and "conv_in" in msg and "wrong shape" in msg and "\n" not in msg
    before = snapshot(tiny_denoiser)
    with pytest.raises(LoRAError):
        merge_lora(tiny_denoiser, bad)            # nothing merged: checked first
    with pytest.raises(LoRAError):
        MergedLoRAs(tiny_denoiser, [(rank4_lora, 1.0), (bad, 1.0)])
    for k, v in tiny_denoiser.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert layer.rank == 4


def test_merge_state_dict_matches_tuned(tiny_base_path, rank4_lora, make_tuned):
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lora.apply import merge_state_dict

    base = CheckpointReader(tiny_base_path).state_dict()
    merged = merge_state_dict(base, rank4_lora)
    tuned = CheckpointReader(make_tuned(rank=4))
    for k in ("denoiser.conv_in.weight", "denoiser.mid_block.attentions.0.proj_out.weight"):
        assert torch.allclose(merged[k], tuned.get(k), atol=1e-6)
        assert not torch.equal(merged[k], base[k])
    assert merged["denoiser.conv_in.bias"] is base["denoiser.conv_in.bias"]
    with pytest.raises(LoRAError):
        merge_state_dict({"denoiser.other.weight": torch.zeros(2, 2)}, rank4_lora)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_loras_reread_originals_from_checkpoint(tiny_config, tiny_base_path, rank4_lora, dtype):
    """With ``originals`` (how ``infer`` loads), nothing is copied and re-scaling is still exact."""
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.loading import load_lbm

    den = load_lbm(tiny_base_path, tiny_config, dtype=dtype).denoiser
    before = snapshot(den)
    reader = CheckpointReader(tiny_base_path)
    reads: list[str] = []

    def original(name: str) -> torch.Tensor:
        reads.append(name)
        return reader.get(f"denoiser.{name}.weight")

    merged = MergedLoRAs(den, [(rank4_lora, 1.0)], global_scale=0.5, originals=original)
    assert reads == []                            # the first merge needs no originals
    name = "down_blocks.1.attentions.0.proj_in"
    want = (before[name + ".weight"].float() + 0.5 * rank4_lora.layers[name].delta()).to(dtype)
    assert torch.allclose(den.get_submodule(name).weight.float(), want.float(), atol=1e-6, rtol=1e-2)
    merged.set_scale(0.0)
    assert len(reads) == len(rank4_lora.layers)
    for k, v in den.state_dict().items():
        assert torch.equal(v, before[k]), k       # bit-exact base, in the model's dtype
    merged.set_scale(1.0)
    merged.restore()
    for k, v in den.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_add_deltas_blocked_equals_unblocked(monkeypatch):
    """The row-blocked path for bf16 weights gives the same bits as one block."""
    from lbm_registry.lora import apply

    g = torch.Generator().manual_seed(0)
    layer = LoRALayer("x", torch.randn(8, 24, 3, 3, generator=g), torch.randn(40, 8, 1, 1, generator=g), 4.0)
    w = torch.randn(40, 24, 3, 3, generator=g).to(torch.bfloat16)
    whole = apply.add_deltas_(w.clone(), [(layer, 0.7), (layer, -0.2)])
    monkeypatch.setattr(apply, "BLOCK_BYTES", 4 * 216 * 3)    # 3 rows per block, a ragged last one
    blocked = apply.add_deltas_(w.clone(), [(layer, 0.7), (layer, -0.2)])
    assert torch.equal(whole, blocked)
    want = (w.float() + 0.5 * layer.delta()).to(torch.bfloat16)
    assert (whole.float() - want.float()).abs().max() <= want.float().abs().max() * 2**-7


@pytest.mark.parametrize("from_file", [False, True])
def test_merged_loras_replace_swaps_without_reloading(tiny_config, tiny_base_path, rank4_lora, make_tuned,
                                                       extract_tiny, from_file):
    """replace(): the base is restored bit-exactly, then the new LoRAs are merged; a LoRA that
    does not fit changes nothing."""
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.loading import load_lbm

    den = load_lbm(tiny_base_path, tiny_config).denoiser
    before = snapshot(den)
    reader = CheckpointReader(tiny_base_path)
    originals = (lambda n: reader.get(f"denoiser.{n}.weight")) if from_file else None
    other = read_lora(extract_tiny(make_tuned(rank=4, seed=2), rank=2, conv_rank=2, dtype="fp32").result.path)
    partial = LoRAFile({k: v for i, (k, v) in enumerate(other.layers.items()) if i % 3 == 0}, {})
    merged = MergedLoRAs(den, [(rank4_lora, 1.0)], global_scale=0.5, originals=originals)
    merged.replace([(partial, 1.0)])
    name = next(iter(partial.layers))
    want = before[name + ".weight"] + 0.5 * partial.layers[name].delta()
    assert torch.allclose(den.get_submodule(name).weight, want, atol=1e-6)
    untouched = next(n for n in rank4_lora.layers if n not in partial.layers)
    assert torch.equal(den.get_submodule(untouched).weight, before[untouched + ".weight"])
    state = snapshot(den)
    bad = LoRAFile({"nope": next(iter(rank4_lora.layers.values()))}, {})
    with pytest.raises(LoRAError, match="match no layer"):
        merged.replace([(bad, 1.0)])
    for k, v in den.state_dict().items():
        assert torch.equal(v, state[k]), k
    merged.replace([(rank4_lora, 1.0), (partial, 2.0)])
    merged.set_scale(0.0)
    for k, v in den.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_add_deltas_on_a_channels_last_weight():
    """A non-contiguous weight (channels_last conv) is merged like a contiguous one, in place."""
    from lbm_registry.lora import apply

    g = torch.Generator().manual_seed(1)
    layer = LoRALayer("c", torch.randn(4, 8, 3, 3, generator=g), torch.randn(16, 4, 1, 1, generator=g), 4.0)
    w = torch.randn(16, 8, 3, 3, generator=g)
    cl = w.clone().to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    out = apply.add_deltas_(cl, [(layer, 0.5)])
    assert out is cl and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(cl, w + 0.5 * layer.delta(), atol=1e-5)
