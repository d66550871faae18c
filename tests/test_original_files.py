"""The original scripts' and upstream LBM's files, as they are (issue 21 items 9-11).

The tests write those files themselves, in the layouts the original code writes: the
``exact_base.ckpt`` of ``create_exact_base_model.py`` (a torch pickle ``{"model_state_dict":
..., "config": ..., "source_config": ...}``), a Lightning ``.ckpt`` of upstream's trainer
(``state_dict`` under ``model.``, ``lpips_loss.*`` tensors, upstream's config objects pickled in
``hyper_parameters``), upstream's model config YAML, and LoRA files of
``extract_lora_native.py`` (rank clipped to a layer's smallest side, alpha left at the rank asked).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from lbm_registry.errors import CheckpointError

UPSTREAM_MODEL_YAML = """\
backbone_signature: stabilityai/stable-diffusion-xl-base-1.0
vae_num_channels: 4
unet_input_channels: 4
timestep_sampling: custom_timesteps
selected_timesteps: [250, 500, 750, 1000]
prob: [0.25, 0.25, 0.25, 0.25]
conditioning_images_keys: []
conditioning_masks_keys: []
source_key: source_image
target_key: target_image
bridge_noise_sigma: 0.005
"""

UPSTREAM_LBM_CONFIG = {   # upstream's LBMConfig.to_dict(), as the original scripts store it
    "name": "LBMConfig", "input_key": "image", "source_key": "source_image", "target_key": "target_image",
    "mask_key": None, "latent_loss_weight": 1.0, "latent_loss_type": "l2", "pixel_loss_type": "lpips",
    "pixel_loss_max_size": 512, "pixel_loss_weight": 10.0, "timestep_sampling": "custom_timesteps",
    "logit_mean": None, "logit_std": None, "selected_timesteps": [250, 500, 750, 1000],
    "prob": [0.25, 0.25, 0.25, 0.25], "bridge_noise_sigma": 0.005,
}


def upstream_state_dict(base_path: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The tensors of an upstream LBMModel: ``denoiser.*``, ``vae.vae_model.*`` and the
    ``num_iterations`` counter (an fp32 Parameter upstream), in the model's dtype."""
    from lbm_registry.lbm.checkpoint import CheckpointReader

    with CheckpointReader(base_path) as reader:
        sd = {k: v.clone().to(dtype) if v.is_floating_point() else v.clone() for k, v in reader.items()}
    sd["num_iterations"] = torch.tensor(0.0)
    return sd


def write_exact_base_ckpt(base_path: Path, dest: Path) -> Path:
    """``create_exact_base_model.py``'s ``exact_base.ckpt``."""
    import yaml

    torch.save({
        "model_state_dict": upstream_state_dict(base_path),
        "config": dict(UPSTREAM_LBM_CONFIG),
        "backbone_signature": "stabilityai/stable-diffusion-xl-base-1.0",
        "architecture": "LBM",
        "torch_dtype": "torch.bfloat16",
        "source_config": yaml.safe_load(UPSTREAM_MODEL_YAML),
        "initialization": "exact_architecture_match",
        "created_from": "inference_config_initialization",
        "lpips_excluded": True,
        "note": "LPIPS can be loaded separately during training if needed",
    }, dest)
    return dest


def write_lightning_ckpt(base_path: Path, dest: Path) -> Path:
    """A Lightning checkpoint of upstream's ``TrainingPipeline``: tensors under ``model.``,
    LPIPS' VGG under ``model.lpips_loss.``, upstream's ``TrainingConfig`` object pickled in
    ``hyper_parameters`` (its class made importable here only while saving)."""
    from dataclasses import dataclass, field

    mods = {n: types.ModuleType(n) for n in ("lbm", "lbm.trainer", "lbm.trainer.training_config")}

    @dataclass
    class TrainingConfig:
        experiment_id: str | None = None
        learning_rate: float = 4e-5
        trainable_params: list = field(default_factory=lambda: ["./*"])

    TrainingConfig.__module__ = "lbm.trainer.training_config"
    TrainingConfig.__qualname__ = "TrainingConfig"
    mods["lbm.trainer.training_config"].TrainingConfig = TrainingConfig
    sd = {"model." + k: v for k, v in upstream_state_dict(base_path, torch.float32).items()}
    sd["model.lpips_loss.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
    sd["model.lpips_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    ckpt = {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": "", "best_model_score": None}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4e-5, "params": [0, 1]}]}],
            "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": {"pipeline_config": TrainingConfig(), "verbose": False,
                                 "model_config": dict(UPSTREAM_LBM_CONFIG)}}
    saved = {n: sys.modules.get(n) for n in mods}
    sys.modules.update(mods)
    try:
        torch.save(ckpt, dest)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return dest


def mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Is ``tensor``'s memory a mapping of ``path`` (``/proc/self/maps``)? Not a copy in RAM."""
    ptr = tensor.untyped_storage().data_ptr()
    want = os.path.realpath(path)
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return len(parts) == 6 and parts[5].strip() == want
    return False


@pytest.fixture(scope="module")
def exact_base_ckpt(tiny_base_path, tmp_path_factory) -> Path:
    return write_exact_base_ckpt(tiny_base_path, tmp_path_factory.mktemp("orig") / "exact_base.ckpt")


# -- item 9: reading the original checkpoints --------------------------------------------------
def test_original_exact_base_ckpt_is_read_memory_mapped(exact_base_ckpt, tiny_base_path):
    from lbm_registry.lbm.checkpoint import CheckpointReader

    with CheckpointReader(tiny_base_path) as ours, CheckpointReader(exact_base_ckpt) as orig:
        assert orig.keys() == ours.keys()
        w = orig.get("denoiser.conv_in.weight")
        assert torch.equal(w, ours.get("denoiser.conv_in.weight").to(torch.bfloat16))
        if sys.platform.startswith("linux"):
            assert mapped_from(w, exact_base_ckpt)          # the 5 GB file is not copied into RAM
        assert "lbm_config" not in orig.metadata          # its recorded config is full-size, the file tiny
        assert any("not used" in n for n in orig.notes)


def test_lightning_ckpt_with_upstream_objects_is_read_without_their_code(tiny_base_path, tmp_path):
    """upstream's TrainingConfig is not importable here: it is read as an inert stand-in
    (never imported or run); ``model.`` is stripped and ``lpips_loss.*`` dropped."""
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.loading import load_lbm

    path = write_lightning_ckpt(tiny_base_path, tmp_path / "last.ckpt")
    assert "lbm" not in sys.modules or not hasattr(sys.modules.get("lbm"), "trainer")
    with CheckpointReader(tiny_base_path) as ours, CheckpointReader(path) as ckpt:
        assert ckpt.keys() == ours.keys()
    from lbm_registry.lbm.config import load_config

    model = load_lbm(path, load_config("lbm-tiny"))
    assert torch.equal(model.denoiser.conv_out.weight, CheckpointReader(tiny_base_path).get("denoiser.conv_out.weight"))


class _Shell:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_with_code_stays_a_one_line_refusal(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"model_state_dict": {"w": torch.ones(2)}, "hook": _Shell()}, path)
    from lbm_registry.lbm.checkpoint import CheckpointReader

    with pytest.raises(CheckpointError, match=r"arbitrary code \((posix|os|nt)\.system\)") as err:
        CheckpointReader(path)
    assert "\n" not in str(err.value)


def test_exact_base_ckpt_imports_and_serves_as_base_path(exact_base_ckpt, tiny_base_path, make_tuned, cli,
                                                          fresh_settings, tmp_path):
    """``import --kind base`` of the original file (converted to safetensors, bit for bit), and
    the file as ``--base PATH`` of extract and validate; the LoRA extracted against the .ckpt
    fits the base registered from it (same tensor bytes)."""
    from lbm_registry.api.registry import resolve
    from lbm_registry.api.run.infer import plan_load
    from lbm_registry.lbm.checkpoint import CheckpointReader

    s = fresh_settings()
    home = ["--home", str(s.home)]
    rc, out, err = cli(*home, "import", exact_base_ckpt, "--kind", "base", "--name", "orig-base",
                       "--config", "lbm-tiny", "--probe", "off")
    assert rc == 0, err
    base = resolve("orig-base", s)
    assert base.facts["converted_from"] == "exact_base.ckpt" and len(base.facts["source_sha256"]) == 64
    with CheckpointReader(base.path) as reg, CheckpointReader(exact_base_ckpt) as orig:
        assert reg.keys() == orig.keys()
        assert all(torch.equal(reg.get(k), orig.get(k)) for k in reg.keys())

    tuned = make_tuned(rank=4, seed=5, scale=0.05)
    lora = tmp_path / "from-ckpt.safetensors"
    rc, out, err = cli(*home, "extract", "--base", exact_base_ckpt, "--tuned", tuned, "--rank", "4",
                       "--conv-rank", "4", "--output", lora)
    assert rc == 0, err
    rc, out, err = cli(*home, "validate", lora, "--base", exact_base_ckpt, "--tuned", tuned)
    assert rc == 0, err
    plan = plan_load(str(lora), settings=s)   # no --base, no --force: found by its tensor bytes
    assert plan.base.ref == base.ref and not plan.warnings


# -- item 10: upstream's model config ----------------------------------------------------------
def test_upstream_model_config_builds_our_lbm_relighting_architecture(tmp_path):
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.model import expected_shapes

    path = tmp_path / "config.yaml"
    path.write_text(UPSTREAM_MODEL_YAML)
    cfg = load_config(path)
    ours = load_config("lbm-relighting")
    theirs_shapes, our_shapes = expected_shapes(cfg), expected_shapes(ours)
    assert theirs_shapes == our_shapes
    assert len([k for k in theirs_shapes if k.startswith("denoiser.")]) == 1676
    assert cfg.bridge.timesteps == (250, 500, 750, 1000) and cfg.bridge.bridge_noise_sigma == 0.005
    assert any("unet_input_channels -> denoiser.in_channels" in n for n in cfg.notes)
    assert any("backbone_signature" in n for n in cfg.notes)
    assert not ours.notes


def test_upstream_config_takes_upstreams_defaults_and_refuses_what_it_cannot_build(tmp_path):
    from lbm_registry.errors import ConfigError
    from lbm_registry.lbm.config import load_config

    bare = tmp_path / "bare.yaml"
    bare.write_text("unet_input_channels: 4\nvae_num_channels: 4\n")
    cfg = load_config(bare)
    assert cfg.bridge.bridge_noise_sigma == 0.0 and cfg.bridge.target_key == "source_image_paste"
    assert any("upstream's defaults" in n for n in cfg.notes)
    assert any("log_normal" in n for n in cfg.notes)
    training = tmp_path / "surface.yaml"
    training.write_text(UPSTREAM_MODEL_YAML + "train_shards: [a.tar]\nbatch_size: 4\n")
    with pytest.raises(ConfigError, match="is a training config"):
        load_config(training)
    typo = tmp_path / "typo.yaml"
    typo.write_text(UPSTREAM_MODEL_YAML + "bridge_noise_sigm: 0.1\n")
    with pytest.raises(ConfigError, match="bridge_noise_sigm: unknown field"):
        load_config(typo)
    masks = tmp_path / "masks.yaml"
    masks.write_text(UPSTREAM_MODEL_YAML.replace("conditioning_masks_keys: []", "conditioning_masks_keys: [mask]"))
    with pytest.raises(ConfigError, match="conditioning_masks_keys"):
        load_config(masks)


def test_base_create_takes_the_upstream_config_with_notes_on_stderr(cli, tmp_path, monkeypatch):
    """``base create --config`` with upstream's YAML: same architecture as our default, the
    translation on stderr (the tiny twin stands in, with upstream's keys, for speed)."""
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.config import load_config
    from lbm_registry.lbm.header import checkpoint_shapes

    path = tmp_path / "config.yaml"
    path.write_text(UPSTREAM_MODEL_YAML)
    full = load_config(path)
    assert checkpoint_shapes(full) == checkpoint_shapes(load_config("lbm-relighting"))
    import lbm_registry.lbm.upstream_config as up

    tiny = tmp_path / "tiny-arch"   # the translation starts from this folder's lbm-relighting.yaml
    tiny.mkdir()
    (tiny / "lbm-relighting.yaml").write_text((Path(__file__).resolve().parents[1] / "configs" / "lbm-tiny.yaml")
                                              .read_text())
    monkeypatch.setattr(up, "_architecture_file", lambda: tiny / "lbm-relighting.yaml")
    out = tmp_path / "base.safetensors"
    rc, stdout, err = cli("base", "create", "--config", path, "--output", out)
    assert rc == 0, err
    assert "note:" in err and "unet_input_channels -> denoiser.in_channels" in err
    with CheckpointReader(out) as reader:
        assert "lbm_config" in reader.metadata and len(reader.shapes("denoiser.")) == 1676


_RSS_PROBE = r"""
import sys, torch
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
path, how = sys.argv[1], sys.argv[2]
before = anon()
if how == "reader":
    from lbm_registry.lbm.checkpoint import CheckpointReader
    reader = CheckpointReader(path)
    reader.check_finite()
    held = [reader.get(k) for k in reader.keys()]
else:
    held = list(torch.load(path, weights_only=True)["model_state_dict"].values())
total = sum(float(t.float().sum()) for t in held)   # every page touched, every tensor still held
print(anon() - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_a_large_ckpt_is_not_copied_into_memory(tmp_path):
    """The property behind "a 5 GB exact_base.ckpt must not need 2x its size in memory", on a
    256 MB file: with every tensor read and held, the reader's anonymous memory (what cannot be
    paged back to the file) grows by a small fraction of the file, where a plain torch.load
    grows by the whole file."""
    import subprocess

    path = tmp_path / "exact_base.ckpt"
    g = torch.Generator().manual_seed(0)
    torch.save({"model_state_dict": {f"denoiser.w{i}": torch.randn(1024, 1024, generator=g) for i in range(64)},
                "architecture": "LBM"}, path)
    size = path.stat().st_size

    def grew(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path), how], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        return int(out.stdout.strip().splitlines()[-1])

    assert grew("torch.load") > 0.9 * size      # the probe sees a copy when there is one
    assert grew("reader") < 0.2 * size


# -- item 11: the original extractor's alpha -----------------------------------------------------
def write_original_lora(base_path: Path, tuned_path: Path, dest: Path, rank: int = 32, conv_rank: int = 16) -> Path:
    """A LoRA as ``extract_lora_native.py`` writes it: SVD of each changed layer's delta, the
    rank clipped to the layer's smallest side, ``alpha`` = the rank asked for, bf16 everything,
    3x3 convs as (r, in, 3, 3) down / (out, r, 1, 1) up, its own metadata (no lbm_registry entry)."""
    import json

    from safetensors.torch import save_file

    from lbm_registry.lbm.checkpoint import CheckpointReader

    out = {}
    with CheckpointReader(base_path) as base, CheckpointReader(tuned_path) as tuned:
        for key in base.keys():
            w = base.get(key)
            if not (key.startswith("denoiser.") and key.endswith(".weight") and w.ndim >= 2):
                continue
            diff = tuned.get(key).float() - w.float()
            if diff.abs().max() < 0.001:
                continue
            conv = diff.ndim == 4
            asked = conv_rank if conv else rank
            u, s, vh = torch.linalg.svd(diff.flatten(1), full_matrices=False)   # the same leading factors
            r = min(asked, *diff.flatten(1).shape, len(s))
            root = s[:r].clamp(min=0).sqrt()
            up, down = u[:, :r] * root[None], vh[:r] * root[:, None]
            if conv:
                up, down = up[..., None, None], down.reshape(r, *diff.shape[1:])
            name = key[: -len(".weight")]
            out[f"{name}.lora_up.weight"] = up.to(torch.bfloat16).contiguous()
            out[f"{name}.lora_down.weight"] = down.to(torch.bfloat16).contiguous()
            out[f"{name}.alpha"] = torch.tensor(asked, dtype=torch.bfloat16)
    save_file(out, str(dest), metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
        "ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)}),
        "ss_base_model_version": "sdxl_v10", "lbm_extraction_method": "all_layers_analysis",
        "lbm_native_naming": "true", "ss_creation_time": "1758739667"})
    return dest


#: the layers the tuned twin changes (the original skips unchanged ones): conv_in/out, the first block
ORIGINAL_LAYERS = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
                   "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2", "down_blocks.0.resnets.0.time_emb_proj",
                   "mid_block.attentions.0.transformer_blocks.0.attn1.to_q")


@pytest.fixture(scope="module")
def original_lora(tiny_base_path, make_tuned, tmp_path_factory):
    tuned = make_tuned(rank=4, seed=7, scale=0.3, layers=ORIGINAL_LAYERS)
    return tuned, write_original_lora(tiny_base_path, tuned, tmp_path_factory.mktemp("orig-lora") / "my_lora.safetensors")


def test_clipped_alpha_is_found_where_the_original_extractor_leaves_it(original_lora, tiny_base_path, tmp_path):
    from lbm_registry.lora.alpha import clipped_alpha_of
    from lbm_registry.lora.format import read_lora

    tuned, path = original_lora
    assert set(read_lora(path).layers) == set(ORIGINAL_LAYERS)
    found = clipped_alpha_of(read_lora(path))   # rank 32/16: only conv_out (4 outputs) is clipped below its alpha
    assert set(found.layers) == {"conv_out"} and found.layers["conv_out"] == (4, 16.0) and found.max_scale == 4
    assert "1 layer (largest scale 4x" in found.line()
    full = write_original_lora(tiny_base_path, tuned, tmp_path / "full.safetensors", rank=9999, conv_rank=9999)
    found = clipped_alpha_of(read_lora(full))   # "full rank": every layer, 9999 stored in bf16 as 9984
    assert set(found.layers) == set(ORIGINAL_LAYERS)
    assert found.max_scale == pytest.approx(9984 / 4) and found.layers["down_blocks.0.resnets.0.conv1"] == (32, 9984)
    assert found.layers["time_embedding.linear_2"] == (128, 9984)   # 9984 / 32 = 312 on the 32-wide layers
    ours = read_lora(full)
    ours.info = {"format_version": 1}               # a file we wrote is never flagged
    assert not clipped_alpha_of(ours)


def test_import_layers_and_validate_name_the_alpha_and_fix_alpha_registers_alpha_rank(
        original_lora, tiny_base_path, cli, fresh_settings):
    from mlflow.tracking import MlflowClient

    from lbm_registry.api.assets.lora import validate
    from lbm_registry.api.registry import resolve
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.registry.blobs import sha256_file

    tuned, path = original_lora
    s = fresh_settings()
    home = ["--home", str(s.home)]
    assert cli(*home, "import", tiny_base_path, "--kind", "base", "--name", "b", "--probe", "off")[0] == 0
    rc, out, err = cli(*home, "import", path, "--kind", "lora", "--name", "orig", "--base", "b", "--probe", "off")
    assert rc == 0, err
    text = " ".join(out.split())
    assert "alpha above a clipped rank on 1 layer (largest scale 4x, e.g. conv_out: rank 4, alpha 16)" in text
    assert "--fix-alpha" in text
    as_is = resolve("orig", s)
    assert as_is.sha256 == sha256_file(path) and as_is.facts["alpha_clipped"]["layers"] == 1   # byte for byte

    rc, out, err = cli(*home, "layers", "orig")
    assert rc == 0 and "alpha above a clipped rank on 1 layer" in " ".join(err.split())
    report = validate("orig", tuned=str(tuned), functional=False, settings=s)
    row = next(r for r in report.layers if r["module"] == "conv_out")
    assert row["rel_error"] == pytest.approx(3.0, abs=0.05)            # scaled 4x: 4D - D
    assert row["rel_error_alpha_at_rank"] < 0.05 and "alpha 16 > its clipped rank 4" in row["cause"]
    assert any("Their error is alpha's" in n for n in report.notes)
    assert report.summary["worst"][0]["module"] == "conv_out" and "cause" in report.summary["worst"][0]

    rc, out, err = cli(*home, "import", path, "--kind", "lora", "--name", "orig-fixed", "--base", "b",
                       "--fix-alpha", "--allow-duplicate", "--probe", "off")
    assert rc == 0, err
    fixed = resolve("orig-fixed", s)
    assert fixed.facts["alpha_fixed"]["modules"] == {"conv_out": [4, 16.0]}
    assert fixed.facts["source_sha256"] == sha256_file(path)
    assert "alpha = rank on 1 layer (was up to 4x)" in fixed.facts["policy"]
    with CheckpointReader(fixed.path) as new, CheckpointReader(path) as old:
        assert float(new.get("denoiser.conv_out.alpha")) == 4.0
        assert float(new.get("denoiser.conv_in.alpha")) == float(old.get("denoiser.conv_in.alpha")) == 16.0
        assert torch.equal(new.get("denoiser.conv_out.lora_up.weight"), old.get("denoiser.conv_out.lora_up.weight"))
    client = MlflowClient(s.effective_tracking_uri)
    run = client.get_run(client.get_model_version("orig-fixed", str(fixed.version)).run_id)
    assert run.data.params["alpha_fix"] == "alpha = rank on 1 layer (was up to 4x)"
    row = next(r for r in validate("orig-fixed", tuned=str(tuned), functional=False, settings=s).layers
               if r["module"] == "conv_out")
    assert row["rel_error"] < 0.05 and "cause" not in row
