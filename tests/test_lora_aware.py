"""Activation-aware extraction end to end: statistics, extraction, reuse, budget, held-out validation."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.aware import CALIB_RES
from fixtures.lora import true_deltas

from lbm_registry.api.assets.lora import extract, validate
from lbm_registry.errors import LoRAError
from lbm_registry.lora.format import read_lora

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _calibration_batch(tiny_config, aware_images):
    """The images the statistics were computed on, prepared as extraction prepared them."""
    from lbm_registry.api.assets.calibration import image_tensor, list_inputs, take

    chosen, _ = take(list_inputs([str(aware_images["calibration"])]), None)
    return [image_tensor(data, item.label, tiny_config, CALIB_RES) for item, data in chosen]


def _layer_inputs(model, images):
    """module -> (n, d) input vectors of every LoRA-able layer at sigma 1 (one-step inference),
    captured independently of lora/calibrate.py."""
    from torch import nn

    from lbm_registry.lbm.model import weight_layers

    got: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in weight_layers(model.denoiser).items():
        def hook(m, args, name=name):
            x = args[0].detach().float()
            if isinstance(m, nn.Conv2d):
                cols = nn.functional.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
                x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            else:
                x = x.reshape(-1, x.shape[-1])
            got.setdefault(name, []).append(x)
        handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for img in images:
            model.velocity(model.vae.encode(img), torch.ones(1))
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def test_statistics_are_the_layers_input_moments(aware_stats, aware_tuned, aware_images, tiny_config):
    from lbm_registry.lbm.loading import load_lbm
    from lbm_registry.lora.calibrate import StatsFile

    rep, stats_path = aware_stats
    sf = StatsFile(stats_path)
    assert sf.info["model"] == "tuned" and sf.info["samples"] == 3 and len(sf.info["images"]) == 3
    assert sf.modes() == {"full": 792}
    # layers fed one tensor share one statistic
    assert sf.group_of("mid_block.attentions.0.transformer_blocks.0.attn1.to_k") == \
        sf.group_of("mid_block.attentions.0.transformer_blocks.0.attn1.to_v")
    xs = _layer_inputs(load_lbm(aware_tuned, tiny_config), _calibration_batch(tiny_config, aware_images))
    for module in ("conv_in", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.resnets.0.conv1",
                   "up_blocks.1.resnets.2.conv_shortcut", "down_blocks.1.attentions.0.proj_in",
                   "mid_block.attentions.0.transformer_blocks.3.ff.net.2", "time_embedding.linear_1"):
        x = xs[module].double()
        st = sf.stats(sf.group_of(module))
        assert st.n == x.shape[0], module
        torch.testing.assert_close(st.moment.double(), x.T @ x / x.shape[0], rtol=2e-4, atol=1e-6)


def test_calibrated_beats_plain_on_every_layer_of_the_calibration_batch(aware_stats, aware_tuned, aware_images,
                                                                       tiny_base_path, tiny_config, extract_tiny):
    from lbm_registry.lbm.loading import load_lbm

    rep, _ = aware_stats
    plain = read_lora(extract_tiny(aware_tuned, rank=4, conv_rank=2, dtype="fp32").result.path)
    cal = read_lora(rep.result.path)
    assert rep.calibration["outcome"] == {"whitened (full)": 792}
    deltas = true_deltas(tiny_base_path, aware_tuned)
    xs = _layer_inputs(load_lbm(aware_tuned, tiny_config), _calibration_batch(tiny_config, aware_images))
    better = 0
    for module, dw in deltas.items():
        x = xs[module]
        ep = float(torch.linalg.matrix_norm((dw - plain.layers[module].delta(torch.float32).reshape(dw.shape)) @ x.T))
        ec = float(torch.linalg.matrix_norm((dw - cal.layers[module].delta(torch.float32).reshape(dw.shape)) @ x.T))
        assert ec <= ep * (1 + 1e-4) + 1e-6, module
        better += ec < 0.99 * ep
    assert better >= 0.9 * len(deltas)
    # the report's own numbers say the same, per layer
    for r in rep.result.layers:
        assert r.out_error <= r.plain_out_error
    assert rep.calibration["mean_out_error"] < 0.8 * rep.calibration["mean_plain_out_error"]


def test_reused_statistics_give_the_same_factors(aware_stats, aware_tuned, tiny_base_path, lora_settings,
                                                         tmp_path):
    rep, stats_path = aware_stats
    again = extract(str(tiny_base_path), str(aware_tuned), rank=4, conv_rank=2, dtype="fp32",
                    output=tmp_path / "again.safetensors", settings=lora_settings, calibration_stats=str(stats_path))
    first, second = read_lora(rep.result.path), read_lora(again.result.path)
    for m, layer in first.layers.items():
        assert torch.equal(layer.down, second.layers[m].down) and torch.equal(layer.up, second.layers[m].up), m
    assert "calibrate_s" not in again.timings       # no model run: the statistics were read back
    cal = second.info["calibration"]
    assert cal["reused_from"] == str(stats_path)
    assert cal["stats_sha256"] == rep.calibration["stats_sha256"]
    assert cal["inputs_sha256"] == rep.calibration["inputs_sha256"]


@pytest.mark.slow
def test_energy_policy_reads_the_output_spectrum(aware_stats, aware_tuned, tiny_base_path, lora_settings, tmp_path):
    _, stats_path = aware_stats
    en = extract(str(tiny_base_path), str(aware_tuned), energy=0.8, output=tmp_path / "e.safetensors",
                 settings=lora_settings, calibration_stats=str(stats_path))
    assert all(r.out_error <= r.plain_out_error for r in en.result.layers)
    # the policy reads the OUTPUT spectrum: at most a few layers keep less than 80% of their output
    assert sum(r.out_error**2 > 0.2 + 1e-3 for r in en.result.layers) <= 8


@pytest.mark.slow
def test_same_inputs_same_bytes(aware_stats, aware_tuned, aware_images, tiny_base_path, lora_settings, tmp_path):
    rep, stats_path = aware_stats
    stats2 = tmp_path / "stats.safetensors"
    out = extract(str(tiny_base_path), str(aware_tuned), rank=4, conv_rank=2, dtype="fp32",
                  output=tmp_path / "c.safetensors", settings=lora_settings,
                  calibrate=[str(aware_images["calibration"])], calibration_resolution=CALIB_RES, stats_output=stats2)
    assert stats2.read_bytes() == stats_path.read_bytes()
    assert out.result.path.read_bytes() == rep.result.path.read_bytes()


def test_budget_by_output_error_never_exceeds_the_budget(aware_stats, aware_tuned, tiny_base_path, lora_settings,
                                                         tmp_path):
    _, stats_path = aware_stats
    budget = 700_000   # the tiny twin's header alone is ~0.5 MB
    rep = extract(str(tiny_base_path), str(aware_tuned), budget=budget, output=tmp_path / f"b{budget}.safetensors",
                  settings=lora_settings, calibration_stats=str(stats_path))
    assert rep.result.size_bytes <= budget
    assert all(r.out_error <= r.plain_out_error for r in rep.result.layers)
    plain = extract(str(tiny_base_path), str(aware_tuned), budget=700_000, output=tmp_path / "p.safetensors",
                    settings=lora_settings)
    cal = read_lora(tmp_path / "b700000.safetensors")
    # output error per byte is another allocation than weight error per byte
    assert {m: la.rank for m, la in cal.layers.items()} != {m: la.rank for m, la in read_lora(plain.result.path).layers.items()}


@pytest.mark.slow
def test_registered_statistics_round_trip(aware_tuned, aware_images, tiny_base_path, workspace, tmp_path, cli):
    from lbm_registry.api.registry import fetch_artifact, lineage_tree, resolve, show

    rep = extract(str(tiny_base_path), str(aware_tuned), rank=4, conv_rank=2, register="aware", settings=workspace,
                  calibrate=[str(aware_images["calibration"])], calibration_samples=2, calibration_resolution=CALIB_RES)
    asset = resolve("aware@1", workspace, ("lora",))
    cal = asset.facts["calibration"]
    assert cal["samples"] == 2 and len(cal["images"]) == 2 and cal["inputs_sha256"] == rep.calibration["inputs_sha256"]
    assert cal["outcome"] and cal["model_sha256"] == asset.facts["tuned_sha256"]
    path = fetch_artifact(asset, "calibration/stats.safetensors", tmp_path, workspace)
    from lbm_registry.registry.blobs import sha256_file

    assert sha256_file(path) == cal["stats_sha256"]
    assert show("aware@1", workspace) and lineage_tree("aware@1", workspace)
    # a second extraction at another rank, by reference
    rc, out, err = cli("--home", workspace.home, "extract", "--base", tiny_base_path, "--tuned", aware_tuned,
                       "--rank", "8", "--conv-rank", "4", "--calibration-stats", "aware@1", "--register", "aware8",
                       "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["calibration"]["reused_from"] == "aware@1" and d["calibration"]["stats_sha256"] == cal["stats_sha256"]


def test_stats_of_another_model_are_refused(aware_stats, make_tuned, tiny_base_path, lora_settings, tmp_path):
    _, stats_path = aware_stats
    with pytest.raises(LoRAError, match="statistics of model"):
        extract(str(tiny_base_path), str(make_tuned(rank=4)), rank=4, output=tmp_path / "x.safetensors",
                settings=lora_settings, calibration_stats=str(stats_path))
    assert not (tmp_path / "x.safetensors").exists()


def test_validate_measures_on_held_out_images_only(aware_stats, aware_tuned, aware_images, tiny_base_path,
                                                   lora_settings):
    rep, _ = aware_stats
    lora = str(rep.result.path)
    v = validate(lora, base=str(tiny_base_path), tuned=str(aware_tuned), settings=lora_settings, functional=False,
                 images=[str(aware_images["calibration"]), str(aware_images["heldout"])], resolution=CALIB_RES)
    h = v.held_out
    assert h["images"] == 2 and h["calibration_images_excluded"] == 3
    assert any("calibration images of this LoRA: left out" in n for n in v.notes)
    assert 0 < h["functional_error"] < h["base_error"] and h["psnr"] > h["base_psnr"]
    assert not set(h["images_sha256"]) & set(rep.calibration["images"])
    with pytest.raises(LoRAError, match="calibration images of this LoRA"):
        validate(lora, base=str(tiny_base_path), tuned=str(aware_tuned), settings=lora_settings,
                 images=[str(aware_images["calibration"])], resolution=CALIB_RES, functional=False)


@pytest.mark.parametrize("args,needle", [
    (["--calibrate", "{missing}"], "not found"),
    (["--calibrate", "{calib}", "--calibration-stats", "x.safetensors"], "exclusive"),
    (["--damping", "0.1"], "needs --calibrate"),
    (["--calibrate", "{calib}", "--damping", "-1"], "--damping"),
    (["--calibrate", "{calib}", "--calibration-samples", "0"], "--calibration-samples"),
    (["--calibrate", "{calib}", "--calibration-resolution", "30"], "multiple of"),
    (["--calibrate", "{calib}", "--calibration-memory", "lots"], "invalid size"),
    (["--calibration-stats", "{calib}"], "not a calibration statistics file"),
    (["--calibration-stats", "nope@1"], "nope"),
])
def test_bad_calibration_options_are_one_line(args, needle, tiny_base_path, aware_tuned, aware_images, tmp_path, cli):
    sub = {"{missing}": str(tmp_path / "missing"), "{calib}": str(aware_images["calibration"])}
    rc, out, err = cli("--home", tmp_path / "home", "extract", "--base", tiny_base_path, "--tuned", aware_tuned,
                       "--output", tmp_path / "x.safetensors", *[sub.get(a, a) for a in args])
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "home").exists()


def test_stats_file_round_trips_exactly(tmp_path):
    from lbm_registry.lbm.checkpoint import save_safetensors
    from lbm_registry.lora.calibrate import META_KEY, CalibrationStats, GroupStats, StatsFile

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 40, generator=g)
    c = x @ x.T / 40
    c = (c + c.T) / 2
    stats = CalibrationStats({"a": GroupStats(["a", "a2"], "full", 40, c),
                              "b": GroupStats(["b"], "diag", 12, torch.rand(5, generator=g))},
                             {"model_sha256": "ab" * 32, "images": ["cd" * 32]})
    p1 = stats.save(tmp_path / "s1.safetensors")
    p2 = stats.save(tmp_path / "s2.safetensors")
    assert p1.read_bytes() == p2.read_bytes()                       # reproducible bytes
    assert p1.stat().st_size < 4 * 49 + 4096                         # the full matrix is stored once (packed)
    back = StatsFile(p1).load()
    assert back.info == stats.info and set(back.groups) == {"a", "b"}
    for name, gs in stats.groups.items():
        assert torch.equal(back.groups[name].moment, gs.moment) and back.groups[name].members == gs.members
        assert back.groups[name].n == gs.n and back.groups[name].mode == gs.mode
    assert StatsFile(p1).group_of("a2") == "a" and StatsFile(p1).group_of("zz") is None
    # damaged files: one clear LoRAError each
    import json

    meta = {META_KEY: json.dumps(stats.header())}
    save_safetensors({"a.full": torch.zeros(3)}, tmp_path / "bad.safetensors", meta)
    with pytest.raises(LoRAError, match="statistics of b are missing"):
        StatsFile(tmp_path / "bad.safetensors")
    save_safetensors({"a.full": torch.zeros(3), "b.diag": torch.zeros(5)}, tmp_path / "bad2.safetensors", meta)
    with pytest.raises(LoRAError, match="expected 28"):
        StatsFile(tmp_path / "bad2.safetensors").stats("a")
    save_safetensors({"x": torch.zeros(3)}, tmp_path / "plain.safetensors", {})
    with pytest.raises(LoRAError, match="not a calibration statistics file"):
        StatsFile(tmp_path / "plain.safetensors")


def test_calibration_options_are_checked_before_torch(tiny_base_path, aware_images, tmp_path, cli_probe_many):
    """Bad calibration options answer in a fraction of a second: no torch, no model."""
    from lbm_registry.api import calibration
    from lbm_registry.lora import calibrate, whiten

    assert calibration.DEFAULT_MEMORY == calibrate.DEFAULT_MEMORY
    assert calibration.DEFAULT_DAMPING == whiten.DEFAULT_DAMPING
    common = ["--home", str(tmp_path / "h"), "extract", "--base", str(tiny_base_path), "--tuned", str(tiny_base_path),
              "--output", str(tmp_path / "x.safetensors")]
    runs = cli_probe_many([common + ["--calibrate", str(aware_images["calibration"]), "--damping", "0"],
                           common + ["--calibrate", str(tmp_path / "nothing-here")],
                           common + ["--stats-output", str(tmp_path / "s.safetensors")]])
    for r in runs:
        assert r["rc"] == 2 and len(r["err"].strip().splitlines()) == 1, r
        assert "torch" not in r["heavy"], r


def test_memory_rule_gives_full_statistics_to_the_narrow_layers():
    from lbm_registry.lora.calibrate import plan_modes

    dims = {"a": 10, "b": 100, "c": 1000, "d": 100}
    assert plan_modes(dims, 10**9) == {"a": "full", "b": "full", "c": "full", "d": "full"}
    # room for the diagonals and the two 100-wide ones, not for the 1000-wide one
    budget = 4 * (10 + 100 + 1000 + 100) + 4 * (10 * 10 + 100 * 100 * 2)
    assert plan_modes(dims, budget) == {"a": "full", "b": "full", "c": "diag", "d": "full"}
    assert set(plan_modes(dims, 1).values()) == {"diag"}
    assert plan_modes(dims, 10**9, full_max_dim=100)["c"] == "diag"
