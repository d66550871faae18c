"""LoRA extraction on the tiny twin: exactness, truncation error, policies, dtypes, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures.lora import layer_names, true_deltas

from lbm_registry.api.assets.lora import extract
from lbm_registry.errors import ArchitectureError, CheckpointError, LBMError, LoRAError
from lbm_registry.lbm.threads import single_thread_below
from lbm_registry.lora.format import read_lora
from lbm_registry.lora.svd import SVDSettings, truncation_error

pytestmark = pytest.mark.usefixtures("torch_single_thread")

N_LAYERS = 792


def lora_errors(lora_path, base, tuned) -> dict[str, float]:
    """Per-layer ||dW - BA|| / ||dW|| recomputed independently from the written file."""
    lora = read_lora(lora_path)
    out = {}
    for m, d in true_deltas(base, tuned).items():
        if m in lora.layers:
            rec = lora.layers[m].delta(torch.float32).reshape(d.shape)
            out[m] = float((d - rec).norm() / d.norm())
    return out


def test_exact_recovery_at_true_rank(make_tuned, tiny_base_path, extract_tiny):
    tuned = make_tuned(rank=4)
    rep = extract_tiny(tuned, rank=4, conv_rank=4, dtype="fp32")
    res = rep.result
    assert len(res.layers) == N_LAYERS and not res.skipped
    assert res.max_error < 2e-5
    errs = lora_errors(res.path, tiny_base_path, tuned)
    assert max(errs.values()) < 2e-5
    # the reported errors are the errors of the stored factors
    for r in res.layers[:50]:
        assert r.rel_error == pytest.approx(errs[r.module], abs=1e-6)
    lora = read_lora(res.path)
    assert set(lora.layers) == set(layer_names(tiny_base_path))
    assert {la.rank for la in lora.layers.values()} == {4}


def test_error_equals_tail_singular_values(make_tuned, extract_tiny):
    res = extract_tiny(make_tuned(rank=4), rank=2, conv_rank=2, dtype="fp32").result
    s = torch.tensor([1.0, 0.5, 0.25, 0.125])
    want = truncation_error(s, 2)   # sqrt(sum tail s^2) / ||s||, about 0.2425
    for r in res.layers:
        assert r.rel_error == pytest.approx(want, rel=2e-4), r.module
        assert r.energy == pytest.approx(1 - want**2, rel=1e-3)


def test_full_rank_reconstructs_exactly(full_rank_lora, tiny_base_path):
    tuned, rep = full_rank_lora
    res = rep.result
    assert len(res.layers) == N_LAYERS
    assert all(r.method == "full" for r in res.layers)
    assert res.max_error < 1e-5
    errs = lora_errors(res.path, tiny_base_path, tuned)
    assert max(errs.values()) < 1e-5
    shapes = layer_names(tiny_base_path)
    for r in res.layers:
        m, n = shapes[r.module][0], math.prod(shapes[r.module][1:])
        assert r.rank == min(m, n)


def test_randomized_within_one_percent_of_exact_on_noisy_deltas(make_tuned, tiny_base_path, lora_settings, tmp_path):
    tuned = make_tuned(rank=16, noise=0.3, seed=5)
    rep = extract(str(tiny_base_path), str(tuned), rank=8, conv_rank=4, dtype="fp32", output=tmp_path / "r.safetensors",
                  settings=lora_settings, svd=SVDSettings(method="randomized"))
    deltas = true_deltas(tiny_base_path, tuned)
    worst = 0.0
    for r in rep.result.layers:
        if r.method != "randomized":
            continue
        with single_thread_below(deltas[r.module].numel()):
            exact = truncation_error(torch.linalg.svdvals(deltas[r.module].double()), r.rank)
        worst = max(worst, r.rel_error / exact)
    assert sum(r.method == "randomized" for r in rep.result.layers) > 700
    assert 0.999 < worst <= 1.01


def test_budget_beats_fixed_ranks_at_equal_size(varied_tuned, tiny_base_path, extract_tiny):
    fixed = extract_tiny(varied_tuned, rank=8, conv_rank=8).result
    budget = extract_tiny(varied_tuned, budget=fixed.size_bytes).result
    assert budget.size_bytes <= fixed.size_bytes

    def total_sq_error(res):
        return sum((r.rel_error * r.norm) ** 2 for r in res.layers) + sum(
            0 for _ in res.skipped)

    lost_fixed, lost_budget = total_sq_error(fixed), total_sq_error(budget)
    skipped_energy = 0.0
    if budget.skipped:
        norms = {r.module: r.norm for r in fixed.layers}
        skipped_energy = sum(norms[s.module] ** 2 for s in budget.skipped)
    assert lost_budget + skipped_energy < 0.8 * lost_fixed
    ranks = {r.rank for r in budget.layers}
    assert len(ranks) > 3   # ranks really differ per layer


def test_budget_file_fits_and_too_small_budget_fails(varied_tuned, tiny_base_path, lora_settings, tmp_path):
    out = tmp_path / "b.safetensors"
    rep = extract(str(tiny_base_path), str(varied_tuned), budget="1MB", output=out, settings=lora_settings)
    assert out.stat().st_size <= 1_000_000
    assert rep.result.policy.kind == "budget"
    with pytest.raises(LoRAError, match="budget"):
        extract(str(tiny_base_path), str(varied_tuned), budget="10KB", output=tmp_path / "c.safetensors",
                settings=lora_settings)
    assert not (tmp_path / "c.safetensors").exists()


def test_energy_policy_meets_fraction(varied_tuned, extract_tiny):
    res = extract_tiny(varied_tuned, energy=0.9, dtype="fp32").result
    assert len(res.layers) == N_LAYERS
    assert min(r.energy for r in res.layers) >= 0.9 - 1e-4
    # and is not wasteful: steep layers need far fewer components than flat ones
    assert min(r.rank for r in res.layers) == 1 and max(r.rank for r in res.layers) >= 20
    capped = extract_tiny(varied_tuned, energy=0.99, max_rank=4, dtype="fp32").result
    assert max(r.rank for r in capped.layers) == 4


@pytest.mark.parametrize(("dtype", "torch_dtype", "tol"), [("bf16", torch.bfloat16, 1e-2), ("fp16", torch.float16, 2e-3),
                                                           ("fp32", torch.float32, 2e-5)])
def test_storage_dtypes(make_tuned, extract_tiny, dtype, torch_dtype, tol):
    res = extract_tiny(make_tuned(rank=4), rank=4, conv_rank=4, dtype=dtype).result
    lora = read_lora(res.path)
    la = next(iter(lora.layers.values()))
    assert la.down.dtype == torch_dtype and la.up.dtype == torch_dtype
    assert lora.info["dtype"] == dtype
    assert lora.raw_metadata["ss_mixed_precision"] == {"fp32": "no"}.get(dtype, dtype)   # kohya's names
    assert res.max_error < tol


def test_alpha_rescales_factors_not_delta(make_tuned, extract_tiny):
    plain = read_lora(extract_tiny(make_tuned(rank=4), rank=4, conv_rank=4, dtype="fp32").result.path)
    scaled = read_lora(extract_tiny(make_tuned(rank=4), rank=4, conv_rank=4, dtype="fp32", alpha=1.0).result.path)
    for m in list(plain.layers)[:40]:
        a, b = plain.layers[m], scaled.layers[m]
        assert a.alpha == 4.0 and b.alpha == 1.0
        assert torch.allclose(a.delta(), b.delta(), atol=1e-7, rtol=1e-5)


def test_zero_delta_layers_skipped_and_listed(make_tuned, tiny_base_path, extract_tiny):
    names = list(layer_names(tiny_base_path))
    changed = tuple(names[::100])
    res = extract_tiny(make_tuned(rank=4, layers=changed), rank=4, conv_rank=4).result
    assert {r.module for r in res.layers} == set(changed)
    assert len(res.skipped) == N_LAYERS - len(changed)
    assert all("zero delta" in s.reason for s in res.skipped)
    lora = read_lora(res.path)
    assert set(lora.layers) == set(changed)
    assert len(lora.info["skipped"]) == N_LAYERS - len(changed)


def test_metadata_records_hashes_policy_and_errors(make_tuned, extract_tiny):
    rep = extract_tiny(make_tuned(rank=4), rank=4, conv_rank=4, dtype="fp32")
    lora = read_lora(rep.result.path)
    info = lora.info
    assert info["base_sha256"] == rep.base["sha256"] and info["tuned_sha256"] == rep.tuned["sha256"]
    assert info["policy"] == {"kind": "fixed", "rank": 4, "conv_rank": 4}
    assert info["format_version"] == 1
    assert len(info["layers"]) == N_LAYERS
    m, (rank, err) = next(iter(info["layers"].items()))
    assert rank == 4 and err < 1e-4
    meta = lora.raw_metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_sd_model_hash"] == rep.base["sha256"]
    assert len(meta["lbm_registry"]) < 120_000   # compact: ~100 bytes per layer


def test_uncaptured_bias_changes_are_reported(tiny_base_path, lora_settings, tmp_path):
    from lbm_registry.lbm.checkpoint import CheckpointReader, save_safetensors

    r = CheckpointReader(tiny_base_path)
    sd = {k: v.clone() for k, v in r.items()}
    sd["denoiser.conv_in.weight"] += 0.01
    sd["denoiser.conv_in.bias"] += 0.5
    tuned = save_safetensors(sd, tmp_path / "t.safetensors", r.metadata)
    rep = extract(str(tiny_base_path), str(tuned), output=tmp_path / "o.safetensors", settings=lora_settings)
    assert [u["key"] for u in rep.result.uncaptured] == ["denoiser.conv_in.bias"]
    assert len(rep.result.layers) == 1 and len(rep.result.skipped) == N_LAYERS - 1


def test_output_is_deterministic(make_tuned, tiny_base_path, lora_settings, tmp_path):
    tuned = make_tuned(rank=16, noise=0.2, seed=9)
    kw = dict(rank=8, conv_rank=4, settings=lora_settings, svd=SVDSettings(method="randomized"))
    a = extract(str(tiny_base_path), str(tuned), output=tmp_path / "a.safetensors", **kw).result
    b = extract(str(tiny_base_path), str(tuned), output=tmp_path / "b.safetensors", **kw).result
    la, lb = read_lora(a.path), read_lora(b.path)
    for m in la.layers:
        assert torch.equal(la.layers[m].down, lb.layers[m].down)


# -- bad inputs: one line, LBMError, no output ----------------------------------------------
def _fails(exc_type, match, base, tuned, out, settings, **kw):
    with pytest.raises(exc_type, match=match) as exc:
        extract(str(base), str(tuned), output=out, settings=settings, **kw)
    assert isinstance(exc.value, LBMError)
    assert "\n" not in str(exc.value)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp left
    return exc.value


def test_missing_file(tiny_base_path, lora_settings, tmp_path):
    _fails(LBMError, "not found", tiny_base_path, tmp_path / "nope.safetensors", tmp_path / "o.safetensors",
           lora_settings)


def test_truncated_file(make_tuned, tiny_base_path, lora_settings, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = make_tuned(rank=4).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _fails(CheckpointError, "truncated", tiny_base_path, cut, tmp_path / "o.safetensors", lora_settings)


def test_nan_in_tuned(tiny_base_path, lora_settings, tmp_path):
    from lbm_registry.lbm.checkpoint import CheckpointReader, save_safetensors

    r = CheckpointReader(tiny_base_path)
    sd = {k: v.clone() for k, v in r.items()}
    key = "denoiser.up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2.weight"
    sd[key][3, 5] = float("nan")
    bad = save_safetensors(sd, tmp_path / "nan.safetensors", r.metadata)
    err = _fails(CheckpointError, "NaN or Inf", tiny_base_path, bad, tmp_path / "o.safetensors", lora_settings)
    assert key in str(err) and "nan.safetensors" in str(err)
    sd[key][3, 5] = 0.0
    sd["denoiser.conv_in.bias"][0] = float("inf")
    bad2 = save_safetensors(sd, tmp_path / "inf.safetensors", r.metadata)
    _fails(CheckpointError, "conv_in.bias", tiny_base_path, bad2, tmp_path / "o.safetensors", lora_settings)


def test_architecture_mismatch(tiny_base_path, other_arch_path, lora_settings, tmp_path):
    _fails(ArchitectureError, "wrong shape", tiny_base_path, other_arch_path, tmp_path / "o.safetensors", lora_settings)
    _fails(ArchitectureError, "wrong shape", other_arch_path, tiny_base_path, tmp_path / "o.safetensors", lora_settings)


def test_key_mismatch_without_config(tiny_base_path, lora_settings, tmp_path):
    """Without lbm_config metadata the two files are compared with each other."""
    from lbm_registry.lbm.checkpoint import CheckpointReader, save_safetensors

    r = CheckpointReader(tiny_base_path)
    sd = {k: v.clone() for k, v in r.items()}
    base = save_safetensors(sd, tmp_path / "base_nometa.safetensors", {})
    sd.pop("denoiser.mid_block.attentions.0.proj_in.weight")
    tuned = save_safetensors(sd, tmp_path / "tuned_nometa.safetensors", {})
    _fails(ArchitectureError, "missing", base, tuned, tmp_path / "o.safetensors", lora_settings)


def test_not_an_lbm_checkpoint(tiny_base_path, full_rank_lora, lora_settings, tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    save_file({"foo.weight": torch.zeros(3, 3)}, str(junk))
    _fails(ArchitectureError, "not an LBM checkpoint", junk, tiny_base_path, tmp_path / "o.safetensors", lora_settings)
    _fails(ArchitectureError, "not an LBM checkpoint", tiny_base_path, junk, tmp_path / "o.safetensors", lora_settings)
    lora_file = full_rank_lora[1].result.path   # a LoRA is not a model
    _fails(ArchitectureError, "LBM checkpoint", tiny_base_path, lora_file, tmp_path / "o.safetensors", lora_settings)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello world, not weights")
    _fails(CheckpointError, "not a safetensors", tiny_base_path, text, tmp_path / "o.safetensors", lora_settings)


@pytest.mark.parametrize("kw", [dict(rank=0), dict(conv_rank=-1), dict(max_rank=0), dict(energy=2.0),
                                dict(dtype="int8"), dict(alpha=0.0), dict(budget="lots")])
def test_bad_options(tiny_base_path, make_tuned, lora_settings, tmp_path, kw):
    _fails(LoRAError, None, tiny_base_path, make_tuned(rank=4), tmp_path / "o.safetensors", lora_settings, **kw)


def test_identical_inputs(tiny_base_path, lora_settings, tmp_path):
    _fails(LoRAError, "same file", tiny_base_path, tiny_base_path, tmp_path / "o.safetensors", lora_settings)


def test_budget_summary_counts_rank_zero_layers(varied_tuned, extract_tiny, capsys):
    """Layers a budget gives rank 0 keep their whole delta: they count with rel. error 1.0 in
    every summary, and lists of them state their totals (issue 11, item 8)."""
    from lbm_registry.cli.lora import _render_extract

    rep = extract_tiny(varied_tuned, budget="1MB")
    res = rep.result
    dropped = [s for s in res.skipped if s.rel_error == 1.0]
    assert len(dropped) > 4
    errs = [r.rel_error for r in res.layers] + [1.0] * len(dropped)
    assert res.mean_error == pytest.approx(sum(errs) / len(errs)) and res.max_error == 1.0
    d = rep.to_dict(layers=False)
    assert d["layers_counted"] == len(res.layers) + len(dropped)
    assert d["rank_histogram"]["0"] == len(dropped)
    _render_extract(d)
    out = capsys.readouterr().out
    assert f"{len(dropped)} with rank 0 count as 1.0" in out and f"(+{len(dropped) - 4} more)" in out
