"""Training that fits and scales: data parallel (2 gloo workers), accumulation, gradient
checkpointing, cached latents, mixed precision, epochs and progress. Tiny twin, 32 px, few steps."""

from __future__ import annotations

import pytest
import torch

from lbm_registry.errors import TrainingError

pytestmark = pytest.mark.usefixtures("train_threads")

COMMON = {"resolution": 64, "max_steps": 3, "validation_shards": [], "num_sample_images": 0,
          "checkpoint_interval": 1, "keep_checkpoints": 10, "learning_rate": 3e-3}


def _fit(cfg, tmp_path, **kw):
    from lbm_registry.api.train import build_lora_trainer
    from lbm_registry.settings import WorkspaceSettings

    settings = WorkspaceSettings.resolve(home=tmp_path / "home")
    trainer, _ = build_lora_trainer(cfg, settings=settings, progress=False, **kw)
    return trainer, trainer.fit()


def _factors(path):
    from lbm_registry.lora.format import read_lora

    lora = read_lora(path)
    return {n: torch.cat([la.down.flatten(), la.up.flatten()]) for n, la in lora.layers.items()}


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel_diff(a, b, start):
    """|a - b| relative to how far training moved a from the start."""
    num = torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in a))
    den = torch.sqrt(sum(((a[n] - start[n]) ** 2).sum() for n in a))
    assert den > 0
    return float(num / den)


@pytest.fixture(scope="module")
def reference_1x4(train_threads, tmp_path_factory, train_config_factory):
    """1 process x batch 4, 3 steps (2 per epoch: crosses an epoch), a checkpoint every step."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = train_config_factory(tmp, batch_size=4, **COMMON)
    _, result = _fit(cfg, tmp)
    return result


@pytest.fixture(scope="module")
def train_config_factory(tiny_base_path, start_lora_path, synth_shards):
    from fixtures.train import TRAINED_PATTERNS

    from lbm_registry.train.config import train_config_from_dict

    def make(tmp, **overrides):
        data = {"base": str(tiny_base_path), "lora": str(start_lora_path),
                "train_shards": [str(p) for p in synth_shards["train"]],
                "trainable_lora_modules": list(TRAINED_PATTERNS), "shuffle_buffer": 3, "mlflow": False,
                "output_dir": str(tmp / "run"), "device": "cpu", "validation_interval": 1000}
        data.update(overrides)
        return train_config_from_dict(data)

    return make


def test_accumulation_matches_a_bigger_batch(reference_1x4, train_config_factory, start_lora_path, tmp_path):
    cfg = train_config_factory(tmp_path, batch_size=2, gradient_accumulation_steps=2, **COMMON)
    trainer, result = _fit(cfg, tmp_path)
    assert trainer.global_batch == 4 and result.steps == 3
    start = _factors(start_lora_path)
    assert _rel_diff(_factors(result.lora_path), _factors(reference_1x4.lora_path), start) < 1e-3
    # the per-step losses are the same numbers too
    ref = [v for _, v in reference_1x4.history["train"]]
    got = [v for _, v in result.history["train"]]
    assert got == pytest.approx(ref, rel=1e-4)


def test_two_processes_match_one_and_resume_after_an_interrupt(reference_1x4, train_config_factory,
                                                               start_lora_path, tmp_path):
    """`lbm-reg train --num-processes 2` (2 gloo workers x batch 2) == 1 x 4; Ctrl-C (SIGINT to the
    process group) makes rank 0 save a checkpoint, and resuming in the 2-process mode ends where the
    uninterrupted run does. Only rank 0 wrote checkpoints and the LoRA."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from lbm_registry.api.train import train_lora
    from lbm_registry.settings import WorkspaceSettings
    from lbm_registry.train.state import list_checkpoints

    settings = WorkspaceSettings.resolve(home=tmp_path / "home")
    start = _factors(start_lora_path)
    cfg = train_config_factory(tmp_path, batch_size=2, num_processes=2, **{**COMMON, "max_steps": 1000})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if v is not None}))
    proc = subprocess.Popen([sys.executable, "-m", "lbm_registry.cli.main", "--home", str(settings.home), "train",
                             "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while not list_checkpoints(cfg.output_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    saved = list_checkpoints(cfg.output_dir)
    stopped_at = int(saved[-1].name.split("-")[1])
    assert 1 <= stopped_at < 3, saved
    ref_first = list_checkpoints(reference_1x4.output_dir)[0] / "lora.safetensors"  # step 1
    assert _rel_diff(_factors(saved[0] / "lora.safetensors"), _factors(ref_first), start) < 1e-3

    resumed = train_lora(cfg, {"max_steps": 3}, settings=settings, progress=False, resume=True)
    assert resumed["num_processes"] == 2 and resumed["global_batch"] == 4
    assert resumed["resumed_from"] == stopped_at and resumed["steps"] == 3 and resumed["epochs"] == 1
    assert _rel_diff(_factors(resumed["lora_path"]), _factors(reference_1x4.lora_path), start) < 1e-3
    assert [c.name for c in list_checkpoints(cfg.output_dir)][-1] == "step-00000003"


def test_multi_process_start_up_errors_come_before_any_worker(train_config_factory, tmp_path, monkeypatch):
    import torch.distributed.launcher.api as launcher

    from lbm_registry.api.train import train_lora
    from lbm_registry.errors import LoRAError
    from lbm_registry.settings import WorkspaceSettings

    settings = WorkspaceSettings.resolve(home=tmp_path / "home")
    monkeypatch.setattr(launcher, "elastic_launch", lambda *a, **k: pytest.fail("workers started"))
    cfg = train_config_factory(tmp_path, batch_size=2, num_processes=2, trainable_lora_modules=["attn3"], **COMMON)
    with pytest.raises(LoRAError, match="^pattern 'attn3' matches no LoRA module among"):
        train_lora(cfg, settings=settings, progress=False)


def test_gradient_checkpointing_gives_the_same_lora(train_config_factory, start_lora_path, tmp_path):
    start = _factors(start_lora_path)
    runs = []
    for on in (False, True):
        cfg = train_config_factory(tmp_path / str(on), batch_size=2, gradient_checkpointing=on,
                                   **{**COMMON, "max_steps": 2})
        trainer, result = _fit(cfg, tmp_path / str(on))
        assert trainer.model.denoiser.is_gradient_checkpointing == on
        runs.append(_factors(result.lora_path))
    assert _rel_diff(runs[1], runs[0], start) < 1e-5


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_latents_give_the_same_result(mode, reference_1x4, train_config_factory, start_lora_path, tmp_path):
    cfg = train_config_factory(tmp_path, batch_size=4, cache_latents=mode, **COMMON)
    trainer, result = _fit(cfg, tmp_path)
    cache = trainer.latent_cache
    assert cache.misses == 8 and cache.hits == 4  # epoch 1 encodes all 8; step 3 reads 4 back
    if mode == "disk":
        files = sorted((result.output_dir / "latent_cache").rglob("*.safetensors"))
        assert len(files) == 8 and all("64px" in str(f) for f in files)
    start = _factors(start_lora_path)
    assert _rel_diff(_factors(result.lora_path), _factors(reference_1x4.lora_path), start) < 1e-5


def test_epochs_are_counted_right_and_progress_shows_the_last_values(train_config_factory, tmp_path, shared_sample,
                                                                     synth_shards):
    """4 passes over one sample say 4; the progress bar's final line has the final validation value."""
    import io

    from rich.console import Console

    from lbm_registry.train.synth import write_synth_shards

    one = write_synth_shards(tmp_path / "one", 1, resolution=32, seed=3, shard_size=1, prefix="one")
    out, err = io.StringIO(), io.StringIO()
    cfg = train_config_factory(tmp_path, train_shards=[str(one[0])], validation_shards=[str(synth_shards["val"][0])],
                               batch_size=1, max_steps=4, resolution=32, num_sample_images=0,
                               validation_interval=3, validation_max_samples=2)
    from lbm_registry.api.train import build_lora_trainer
    from lbm_registry.settings import WorkspaceSettings

    trainer, _ = build_lora_trainer(cfg, settings=WorkspaceSettings.resolve(home=tmp_path / "home"), progress=True,
                                    console=Console(file=out, width=200), err_console=Console(file=err, width=200))
    result = trainer.fit()
    assert result.steps == 4 and result.epochs == 4
    assert [s for s, _ in result.history["val"]] == [0, 3, 4]
    assert f"val {result.val_loss:.4f}" in out.getvalue().strip().splitlines()[-1]
    assert "epoch 4" in out.getvalue().strip().splitlines()[-1]


def test_adamw8bit_needs_bitsandbytes_and_a_gpu(train_config_factory, tmp_path):
    import lbm_registry.lbm.loading as loading

    cfg = train_config_factory(tmp_path, optimizer="adamw8bit", **COMMON)
    real = loading.load_lbm
    loading.load_lbm = lambda *a, **k: pytest.fail("model loaded before the optimizer check")
    try:
        with pytest.raises(TrainingError, match="adamw8bit needs a CUDA GPU"):
            _fit(cfg, tmp_path)
    finally:
        loading.load_lbm = real


def test_fp16_mixed_precision_keeps_fp32_master_lora(train_config_factory, tmp_path):
    """fp16 autocast with a gradient scaler; the LoRA factors stay fp32 and the run resumes exactly."""
    cfg = train_config_factory(tmp_path, batch_size=2, mixed_precision="fp16", **{**COMMON, "max_steps": 2})
    trainer, result = _fit(cfg, tmp_path)
    assert trainer.scaler is not None
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(v)) for _, v in result.history["train"])


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_entry_point(reference_1x4, train_config_factory, start_lora_path, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m lbm_registry.cli.main train ...` (gloo on a
    CPU-only machine): every process joins the job, rank 0 picks the folder, the LoRA is the 1 x 4 one."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    cfg = train_config_factory(tmp_path, batch_size=2, **COMMON)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if v is not None}))
    out = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         "-m", "lbm_registry.cli.main", "--home", str(tmp_path / "home"), "train", "--config", str(path), "--json"],
        capture_output=True, text=True, env={**os.environ, "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml")})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout[out.stdout.index("{"):out.stdout.rindex("}") + 1])
    assert result["num_processes"] == 2 and result["steps"] == 3
    start = _factors(start_lora_path)
    assert _rel_diff(_factors(result["lora_path"]), _factors(reference_1x4.lora_path), start) < 1e-3


@pytest.mark.slow  # the grouping itself: test_train_data.py::test_non_square_resolution_and_aspect_buckets
def test_aspect_buckets_train_the_same_in_every_layout_and_with_cached_latents(train_config_factory, pair_shard,
                                                                               start_lora_path, tmp_path):
    """Non-square data in aspect buckets: batch 4 == batch 2 x accumulation 2 with cached latents
    (each step one bucket, partly filled buckets at the end of the epoch)."""
    shard = pair_shard(tmp_path / "mixed.tar", [(96, 32)] * 5 + [(32, 96)] * 3, seed=4)
    common = {**COMMON, "train_shards": [str(shard)], "aspect_buckets": True, "max_steps": 3}
    runs = []
    for name, kw in (("a", {"batch_size": 4}),
                     ("b", {"batch_size": 2, "gradient_accumulation_steps": 2, "cache_latents": "memory"})):
        trainer, result = _fit(train_config_factory(tmp_path / name, **common, **kw), tmp_path / name)
        assert result.steps == 3 and result.epochs == 1  # 4 wide, then 1 wide and 3 tall
        runs.append(_factors(result.lora_path))
    assert trainer.train_stream.buckets[:2] == [(32, 128), (64, 64)] and (32, 96) in trainer.train_stream.buckets
    assert trainer.latent_cache.misses == 8
    assert _rel_diff(runs[1], runs[0], _factors(start_lora_path)) < 1e-3
