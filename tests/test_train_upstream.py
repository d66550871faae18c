"""Training as upstream LBM trains it (issue 21): the pixel loss's clamp and random window, VGG
LPIPS, posterior-sampled latents, and the original scripts' config files run as they are.

Tests never run upstream's code: they check our behaviour against the facts read from it
(gojasper/LBM ``LBMModel.forward``/``pixel_loss``, its ``AutoencoderKLDiffusers.encode``, and the
LoRA scripts of yonderwonder-ai/LBM_lora)."""

from __future__ import annotations

import pytest
import torch

from lbm_registry.errors import ConfigError

pytestmark = pytest.mark.usefixtures("train_threads")


@pytest.fixture(scope="module")
def tiny_model(tiny_base_path, tiny_config):
    from lbm_registry.lbm.loading import load_lbm

    return load_lbm(tiny_base_path, tiny_config).requires_grad_(False)


def _objective(tiny_config, **kw):
    from lbm_registry.train.losses import latent_loss_fn
    from lbm_registry.train.objective import BridgeObjective

    return BridgeObjective.create(tiny_config, latent_loss_fn("l2"), **kw)


def test_pixel_window_follows_upstreams_rule(tiny_config):
    """512 px window = 64 latents: at 480x640 (60x80 latents) the height is taken whole and the
    width starts at 16 - k, k uniform in [0, 16), i.e. anywhere in 1..16; the image window is the
    same window, 8x."""
    from lbm_registry.train.losses import latent_loss_fn

    obj = _objective(tiny_config, pixel_loss=latent_loss_fn("l1"))
    assert obj.pixel_crop == 64 and obj.vae_factor == 8
    g = torch.Generator().manual_seed(0)
    starts = [obj.crop_offset((60, 80), g) for _ in range(400)]
    assert {r for r, _ in starts} == {0} and {c for _, c in starts} == set(range(1, 17))
    assert obj.crop_offset((64, 64), g) == (0, 0) and obj.crop_offset((32, 48), g) == (0, 0)  # small: whole

    z = torch.randn(2, 4, 60, 80)
    images = torch.arange(2 * 3 * 480 * 640, dtype=torch.float32).view(2, 3, 480, 640)
    zw, xw = obj.pixel_window(z, images, [(0, 5), (0, 16)])
    assert zw.shape == (2, 4, 60, 64) and xw.shape == (2, 3, 480, 512)
    assert torch.equal(zw[1], z[1, :, :, 16:80]) and torch.equal(xw[1], images[1, :, :, 128:640])
    assert torch.equal(xw[0], images[0, :, :, 40:552])
    with pytest.raises(ConfigError, match="crop_size 100 must be a multiple of 8"):
        _objective(tiny_config, pixel_loss=latent_loss_fn("l1"), pixel_crop_size=100)
    assert _objective(tiny_config, pixel_loss=latent_loss_fn("l1"), pixel_crop_size=None).pixel_crop is None


def test_pixel_loss_decodes_the_window_then_clamps(tiny_model, tiny_config):
    """The pixel loss = loss(clamp(decode(window of the one-step latent), -1, 1), window of the
    target): the window is cut from the latent before decoding, the decode is clamped."""
    from lbm_registry.train.losses import latent_loss_fn

    seen = []

    def l2(pred, target):
        seen.append((pred.detach(), target.detach()))
        return torch.nn.functional.mse_loss(pred, target)

    obj = _objective(tiny_config, pixel_loss=l2, pixel_weight=2.0, pixel_crop_size=32)
    g = torch.Generator().manual_seed(3)
    z_src, z_tgt = torch.randn(2, 4, 8, 16, generator=g) * 40, torch.randn(2, 4, 8, 16, generator=g) * 40
    target = torch.rand(2, 3, 64, 128, generator=g) * 2 - 1
    sigma, eps, crops = torch.tensor([0.5, 1.0]), torch.randn(2, 4, 8, 16, generator=g), [(2, 7), (1, 12)]
    with torch.no_grad():
        out = obj.loss_from_latents(tiny_model, z_src, z_tgt, sigma, eps, target, crops)
        from lbm_registry.lbm.sampler import bridge_interpolant

        x_t, _ = bridge_interpolant(z_src, z_tgt, sigma, obj.bridge_noise_sigma, noise=eps)
        z_hat = x_t - sigma.view(-1, 1, 1, 1) * tiny_model.velocity(x_t, sigma)
        windows = torch.stack([z_hat[0, :, 2:6, 7:11], z_hat[1, :, 1:5, 12:16]])
        raw = tiny_model.vae.decode(windows)
    assert raw.abs().max() > 1  # the clamp matters here
    pred, tgt = seen[0]
    assert pred.shape == (2, 3, 32, 32) and pred.min() >= -1 and pred.max() <= 1
    torch.testing.assert_close(pred, raw.clamp(-1, 1))
    torch.testing.assert_close(tgt, torch.stack([target[0, :, 16:48, 56:88], target[1, :, 8:40, 96:128]]))
    torch.testing.assert_close(out["loss"], out["latent_loss"] + 2.0 * out["pixel_loss"])
    assert float(out["pixel_loss"]) == pytest.approx(float(torch.nn.functional.mse_loss(raw.clamp(-1, 1), tgt)))
    assert latent_loss_fn("l2")(raw, tgt) != pytest.approx(float(out["pixel_loss"]))


def test_lpips_is_vgg_unless_named_and_a_missing_backbone_is_one_clear_error(tmp_path, monkeypatch):
    from lbm_registry.train.config import PixelLossConfig
    from lbm_registry.train.losses import build_pixel_loss

    assert PixelLossConfig(kind="lpips").lpips_net == "vgg"
    assert PixelLossConfig(kind="lpips", lpips_net="alex").lpips_net == "alex"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    with pytest.raises(ConfigError, match=r"lpips needs the vgg backbone weights cached at .*vgg16-[0-9a-f]+\.pth "
                                          r"\(nothing is downloaded\).*lpips_net: alex if that one is cached"):
        build_pixel_loss("lpips")
    with pytest.raises(ConfigError, match="lpips needs the alex backbone"):  # the one it names, never the other
        build_pixel_loss("lpips", lpips_net="alex")


def test_training_latents_are_a_seeded_posterior_sample_by_default(train_config, tmp_path):
    """Upstream trains on ``latent_dist.sample()``: here mean + std * noise, the noise drawn from the
    sample's own seed (so every layout and a resume draw the same); ``latent_sample: mean`` keeps the mean."""
    from lbm_registry.api.train import build_lora_trainer
    from lbm_registry.settings import WorkspaceSettings
    from lbm_registry.train.objective import sample_seed

    cfg = train_config(validation_shards=[], num_sample_images=0)
    assert cfg.latent_sample == "sample"
    trainer, _ = build_lora_trainer(cfg, settings=WorkspaceSettings.resolve(home=tmp_path / "home"), progress=False)
    obj = trainer.objective
    micro = trainer.prepare_micro(0, [0, 1])
    raws = [trainer.train_stream.order(0)[q] for q in (0, 1)]
    src = torch.stack([trainer.train_stream.decode(r)[0] for r in raws])
    with torch.no_grad():
        dist = trainer.model.vae.vae_model.encode(src).latent_dist
    sf = trainer.model.vae.scaling_factor
    noise = torch.stack([obj.draw(sample_seed(cfg.seed, 0, q), (4, 8, 8)).posterior[0] for q in (0, 1)])
    torch.testing.assert_close(micro.z_src, dist.mean * sf + dist.std * sf * noise)
    assert (micro.z_src - dist.mean * sf).abs().max() > 1e-3
    torch.testing.assert_close(trainer.prepare_micro(0, [0, 1]).z_src, micro.z_src, rtol=0, atol=0)  # seeded

    obj.sample_posterior = False  # latent_sample: mean
    torch.testing.assert_close(trainer.prepare_micro(0, [0, 1]).z_src, dist.mean * sf)


# The keys of yonderwonder-ai/LBM_lora's lora/lora_relight_config.yaml, as it is (paths filled in).
LORA_RELIGHT_CONFIG = """\
train_shards:
  - "{train}"
validation_shards:
  - "{val}"

# Path to the exact base model created by create_exact_base_model.py
base_model_path: "{base}"

# Path to pre-existing LoRA weights to continue training.
lora_weights_path: "{lora}"

trainable_lora_modules:
  - "attn1"
  - "attn2"
  - "up_blocks"

# Training parameters
wandb_project: null
batch_size: 4
learning_rate: 0.0002
optimizer: "AdamW"
save_ckpt_path: "{out}"
log_interval: 100
max_epochs: 50
save_interval: 1000
num_steps: [1, 2, 4]
"""

# The keys of gojasper/LBM-style upstream training configs (examples/training/config/*.yaml, with the
# relighting keys): no base or LoRA (upstream builds from the Hub), `pipe:cat` shards, YAML's string "4e-5".
UPSTREAM_RELIGHT_CONFIG = """\
wandb_project: lbm-relighting
timestep_sampling: custom_timesteps
unet_input_channels: 4
vae_num_channels: 4
selected_timesteps: [250, 500, 750, 1000]
prob: [0.25, 0.25, 0.25, 0.25]
pixel_loss_type: lpips # l1 l2
pixel_loss_weight: 10.0
latent_loss_type: l2 # l1 l2
latent_loss_weight: 1.0
bridge_noise_sigma: 0.005
conditioning_images_keys: []
conditioning_masks_keys: []
source_key: source_image
target_key: target_image
train_shards:
  - pipe:cat {train}
validation_shards:
  - pipe:cat {val}
batch_size: 4
learning_rate: 4e-5
learning_rate_scheduler: StepLR
learning_rate_scheduler_kwargs: {{step_size: 1, gamma: 0.5}}
optimizer: AdamW
num_steps: [1, 4]
log_interval: 500
resume_from_checkpoint: true
max_epochs: 50
save_interval: 5000
save_ckpt_path: {out}
"""


@pytest.fixture(scope="module")
def attn_lora(tmp_path_factory, tiny_config, tiny_base_path):
    """A LoRA with attn1, attn2 and up_blocks layers (every pattern of the original config matches)."""
    from lbm_registry.lbm.model import build_model
    from lbm_registry.lora.format import write_lora
    from lbm_registry.registry.blobs import sha256_file
    from lbm_registry.train.inject import new_lora_file

    lora = new_lora_file(build_model(tiny_config, meta=True).denoiser, rank=2, conv_rank=2, seed=1,
                         targets=["*attn1.to_q", "*attn2.to_v", "up_blocks.2.resnets.0.conv1"])
    lora.info["base_sha256"] = sha256_file(tiny_base_path)
    return write_lora(lora, tmp_path_factory.mktemp("attn") / "my_lora.safetensors", dtype=torch.float32)


def test_the_original_lora_relight_config_runs_as_it_is(tmp_path, tiny_base_path, attn_lora, synth_shards, capsys):
    import json

    from lbm_registry.cli.main import main
    from lbm_registry.train.config import load_train_config

    cfg = tmp_path / "lora_relight_config.yaml"
    cfg.write_text(LORA_RELIGHT_CONFIG.format(train=synth_shards["train"][0], val=synth_shards["val"][0],
                                              base=tiny_base_path, lora=attn_lora, out=tmp_path / "out"))
    loaded = load_train_config(cfg)
    assert loaded.resolution == (480, 640) and loaded.max_steps is None and loaded.epochs == 50
    assert loaded.experiment == "lbm-registry-train" and loaded.optimizer == "adamw"
    main(["--home", str(tmp_path / "home"), "train", "--config", str(cfg), "--device", "cpu", "--no-mlflow",
          "--max-steps", "1", "--resolution", "32x64", "--set", "num_sample_images=0", "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["steps"] == 1 and out["output_dir"] == str(tmp_path / "out")
    for note in ("wandb_project: null", "lora_weights_path -> lora", "base_model_path -> base",
                 "resolution: 480x640", "max_steps: none", "log_interval -> validation_interval",
                 "num_steps (", "pixel_loss: {kind: lpips, weight: 10}"):
        assert note in captured.err, note


@pytest.fixture
def upstream_config(tmp_path, tiny_base_path, start_lora_path, pair_shard):
    """upstream's relighting training config over shards with `source_image.jpg` entries (training)
    and the `source.jpg` ones its pipeline renames (validation); the CLI arguments to run it."""
    train = pair_shard(tmp_path / "train.tar", [(64, 32)] * 3, names=("source_image.jpg", "target_image.png"))
    val = pair_shard(tmp_path / "val.tar", [(64, 32)], names=("source.jpg", "target.jpg"), seed=1)
    cfg = tmp_path / "relight.yaml"
    cfg.write_text(UPSTREAM_RELIGHT_CONFIG.format(train=train, val=val, out=tmp_path / "out"))
    args = ["--home", str(tmp_path / "home"), "train", "--config", str(cfg), "--base", str(tiny_base_path),
            "--lora", str(start_lora_path), "--device", "cpu", "--no-mlflow", "--max-steps", "2", "--batch-size",
            "2", "--resolution", "32x64", "--set", "num_sample_images=0", "--json"]
    return cfg, train, args


def test_upstream_training_config_translates_and_wants_vgg_lpips(upstream_config, tmp_path, monkeypatch, capsys):
    """upstream's keys as they are; `pixel_loss_type: lpips` is LPIPS with VGG: one clear line, before
    any model loads, when its weights are not cached (never AlexNet instead)."""
    from lbm_registry.cli.main import main
    from lbm_registry.train.config import load_train_config

    cfg, train, args = upstream_config
    loaded = load_train_config(cfg, {"base": "b", "lora": "l"})
    assert loaded.learning_rate == 4e-5 and loaded.lr_scheduler == "StepLR" and loaded.epochs == 50
    assert loaded.lr_scheduler_kwargs == {"step_size": 1, "gamma": 0.5} and loaded.max_steps is None
    assert loaded.pixel_loss.kind == "lpips" and loaded.pixel_loss.lpips_net == "vgg"
    assert loaded.pixel_loss.weight == 10 and loaded.pixel_loss.crop_size == 512
    assert loaded.train_shards == [str(train)] and loaded.resolution == (480, 640)
    assert loaded.source_key == ["source_image", "source.jpg"] and loaded.timesteps == [250, 500, 750, 1000]
    assert loaded.experiment == "lbm-relighting" and loaded.bridge_noise_sigma == 0.005

    import lbm_registry.lbm.loading as loading

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    monkeypatch.setattr(loading, "load_lbm", lambda *a, **k: pytest.fail("model loaded before the LPIPS check"))
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: pixel_loss lpips needs the vgg backbone weights cached at "), err[-1]
    assert "source_key: source_image -> [source_image, source.jpg]" in "\n".join(err)
    assert "(LPIPS with VGG, as upstream)" in "\n".join(err) and "pipe:cat FILE -> FILE" in "\n".join(err)


@pytest.mark.slow
def test_upstream_training_config_runs_on_both_entry_layouts(upstream_config, capsys, tmp_path):
    import json

    from lbm_registry.cli.main import main

    *_, args = upstream_config
    main([*args, "--set", "pixel_loss.lpips_random_backbone=true"])  # stands in for the cached VGG
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["steps"] == 2 and out["val_loss"] is not None  # both entry layouts were read
    from lbm_registry.train.state import latest_checkpoint, load_checkpoint

    state = load_checkpoint(latest_checkpoint(tmp_path / "out")).state
    assert [lr for _, lr in state.lr_history] == pytest.approx([4e-5, 2e-5])  # StepLR(step_size=1, gamma=0.5)
