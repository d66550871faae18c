"""Training API: fine-tune a LoRA on webdataset shards (and register it), a brief full
fine-tune for the demo, and synthetic data.

This is where references, the registry and the training math meet: ``train/`` knows nothing
about the registry, the CLI knows nothing about torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbm_registry.settings import WorkspaceSettings

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from lbm_registry.api.registry import ResolvedAsset
    from lbm_registry.lbm.config import LBMConfig
    from lbm_registry.lora.format import LoRAFile
    from lbm_registry.train.config import TrainConfig
    from lbm_registry.train.distributed import DistContext
    from lbm_registry.train.loop import LoRATrainer, TrainResult


@dataclass
class TrainingInputs:
    """Everything a run was built from (what the lineage records)."""

    config: TrainConfig
    lbm: LBMConfig
    base: ResolvedAsset
    parent: ResolvedAsset | None
    lora: LoRAFile
    train_shards: list[Path]
    validation_shards: list[Path]
    device: torch.device
    datasets: list[dict[str, str]] = field(default_factory=list)


def parse_set_option(values: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as config overrides (for the CLI, which goes through the API)."""
    from lbm_registry.train.config import parse_set_option as parse

    return parse(values)


def load_training_config(config: TrainConfig | str | Path,
                         overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML path or an existing config, with dotted-key overrides."""
    from lbm_registry.train.config import TrainConfig, load_train_config, train_config_from_dict

    if isinstance(config, TrainConfig):
        if not overrides:
            return config
        out = train_config_from_dict(config.to_dict(), overrides, "<config>")
        out._notes = list(config.notes)
        return out
    return load_train_config(config, overrides)


def _lbm_config_for(base: ResolvedAsset, explicit: str | Path | None) -> LBMConfig:
    """The LBM architecture: the explicit config, else the registered one, else the file's own."""
    from lbm_registry.errors import ConfigError
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.config import config_from_dict, load_config
    from lbm_registry.lbm.loading import config_from_checkpoint

    if explicit is not None:
        return load_config(explicit)
    if base.config:
        return config_from_dict(base.config, f"{base.label} config")
    with CheckpointReader(base.path) as reader:
        cfg = config_from_checkpoint(reader)
    if cfg is None:
        raise ConfigError(f"{base.label} carries no LBM config: set model_config in the training config")
    return cfg


def run_folder(cfg: TrainConfig, settings: WorkspaceSettings, resume: bool) -> Path:
    """``output_dir`` if set; else a fresh ``<home>/training/<name>-<timestamp>`` folder, or with
    ``resume`` the newest such folder holding a checkpoint (``name`` = the register name or ``lora``)."""
    import time

    from lbm_registry.errors import TrainingError
    from lbm_registry.train.state import latest_checkpoint

    if cfg.output_dir is not None:
        return Path(cfg.output_dir)
    root = settings.home / "training"
    name = cfg.register_name or "lora"
    if resume:
        runs = sorted(p for p in root.glob(f"{name}-*") if latest_checkpoint(p) is not None)
        if not runs:
            raise TrainingError(f"nothing to resume: no '{name}' run with a checkpoint in {root} "
                                "(pass --output-dir to name the run folder)")
        return runs[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = root / f"{name}-{stamp}", 2
    while folder.exists():
        folder, n = root / f"{name}-{stamp}-{n}", n + 1
    return folder


def _resolve_field(cfg: TrainConfig, field: str, settings: WorkspaceSettings,
                   kinds: tuple[str, ...]) -> ResolvedAsset:
    """Resolve the reference in config field ``field``, naming the field when it fails: the
    reference may be a default of the config file the user never typed."""
    from lbm_registry.api.registry import resolve
    from lbm_registry.errors import RefError

    ref = getattr(cfg, field)
    try:
        return resolve(ref, settings, kinds=kinds)
    except RefError as exc:
        fresh = field == "lora" and "unknown" in str(exc)
        raise RefError(f"{field} {ref!r} (training option {field}): {exc}"
                       + ("; or start a fresh LoRA with new_lora" if fresh else ""),
                       cli=f"{field} {ref!r} (config key {field}, option --{field}): {exc.cli_message}"
                           + ("; or start a fresh LoRA with --set new_lora.rank=8" if fresh else "")) from None


def _parent_lora(cfg: TrainConfig, base: ResolvedAsset,
                 settings: WorkspaceSettings) -> tuple[ResolvedAsset | None, LoRAFile | None]:
    from lbm_registry.errors import LoRAError
    from lbm_registry.lora.format import read_lora

    if cfg.lora is None:
        return None, None
    parent = _resolve_field(cfg, "lora", settings, ("lora",))
    lora = read_lora(parent.path)
    made_for = lora.base_sha256
    from lbm_registry.api.registry import lora_fits_base

    if not lora_fits_base(made_for, lora.info.get("base_tensor_sha256"), base):
        raise LoRAError(f"LoRA {parent.label} was made for base sha256 {(made_for or '?')[:12]}, "
                        f"but the base {base.label} is {base.sha256[:12]}")
    return parent, lora


def _cheap_checks(cfg: TrainConfig, settings: WorkspaceSettings) -> None:
    """The refusals that need no torch (a taken name, an unknown base or LoRA), before torch is imported."""
    from lbm_registry.api.registry import check_name_free

    if cfg.register_name:
        check_name_free(cfg.register_name, "lora", settings)
    _resolve_field(cfg, "base", settings, ("base", "model"))
    if cfg.lora is not None:
        _resolve_field(cfg, "lora", settings, ("lora",))


def check_training(cfg: TrainConfig, settings: WorkspaceSettings) -> tuple[Any, ...]:
    """Every start-up check that needs no model weights (references, data, shapes, module
    patterns, options): run before loading anything, and by ``--num-processes`` before
    starting workers. Returns ``(base, lbm, train_shards, val_shards, parent, lora)``."""
    from lbm_registry.api.registry import check_name_free
    from lbm_registry.errors import ConfigError

    if cfg.register_name:
        check_name_free(cfg.register_name, "lora", settings)
    if cfg.cache_latents != "no" and cfg.pixel_loss is not None:
        raise ConfigError("cache_latents needs the images only for a pixel_loss: turn one of them off")
    base = _resolve_field(cfg, "base", settings, ("base", "model"))   # refused before torch loads

    from lbm_registry.lbm.model import build_model, pick_device
    from lbm_registry.train.data import expand_shards
    from lbm_registry.train.inject import check_lora_fits, match_modules, new_lora_file
    from lbm_registry.train.loop import check_optimizer_available, check_output_folder

    lbm = _lbm_config_for(base, cfg.model_config_path)
    training_buckets(cfg, lbm)
    if cfg.output_dir is not None:
        check_output_folder(cfg.output_dir)
    train_shards = expand_shards(cfg.train_shards, "train_shards")
    val_shards = expand_shards(cfg.validation_shards, "validation_shards")
    parent, lora = _parent_lora(cfg, base, settings)
    meta_denoiser = build_model(lbm, meta=True).denoiser  # shapes only: checks before any loading
    if lora is None:
        assert cfg.new_lora is not None
        n = cfg.new_lora
        lora = new_lora_file(meta_denoiser, rank=n.rank, conv_rank=n.conv_rank, alpha=n.alpha,
                             conv_alpha=n.conv_alpha, targets=n.targets, seed=cfg.seed)
    check_lora_fits(lora, meta_denoiser)
    match_modules(lora.layers, cfg.trainable_lora_modules, what="LoRA module")
    from lbm_registry.train.schedule import check_schedule

    check_schedule(cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.lr_scheduler_kwargs, cfg.max_steps,
                   has_validation=bool(val_shards))

    check_optimizer_available(cfg.optimizer, pick_device(cfg.device))
    return base, lbm, train_shards, val_shards, parent, lora


def training_buckets(cfg: TrainConfig, lbm: LBMConfig) -> list[tuple[int, int]] | None:
    """The aspect buckets of a run (None: every image at ``resolution``), every size checked
    against the architecture's pixel multiple."""
    from lbm_registry.errors import ConfigError
    from lbm_registry.train.buckets import default_buckets

    m = lbm.pixel_multiple
    h, w = cfg.size
    if h % m or w % m:
        shown = str(h) if h == w else f"{h}x{w}"
        raise ConfigError(f"resolution {shown} must be a multiple of {m} for the '{lbm.name}' architecture")
    if cfg.aspect_buckets is False:
        return None
    if cfg.aspect_buckets is True:
        return default_buckets(cfg.size, m)
    chosen = [(int(a), int(b)) for a, b in cfg.aspect_buckets]
    bad = [f"{a}x{b}" for a, b in chosen if a < m or b < m or a % m or b % m]
    if not chosen or bad:
        raise ConfigError(f"aspect_buckets: every bucket must be [height, width], multiples of {m} for the "
                          f"'{lbm.name}' architecture" + (f" (not {', '.join(bad)})" if bad else ""))
    return chosen


def build_lora_trainer(config: TrainConfig, *, settings: WorkspaceSettings | None = None,
                       console: Console | None = None, progress: bool = True,
                       resume: bool | None = None, err_console: Console | None = None,
                       dist: DistContext | None = None) -> tuple[LoRATrainer, TrainingInputs]:
    """Resolve the base/LoRA, check data and losses, load the model and inject the LoRA.

    Every check that can fail does so here, before any training: unknown references, a LoRA
    for another base, missing shards, an image size the model cannot take, LPIPS weights that
    are not cached, an MLflow store that cannot be reached, an invalid ``register`` name, and
    (when ``resume`` is given) an output folder that holds another run or nothing to resume.
    """
    settings = settings or WorkspaceSettings.resolve()
    _cheap_checks(config, settings)

    import torch

    from lbm_registry.lbm.loading import load_lbm
    from lbm_registry.lbm.model import pick_device
    from lbm_registry.registry.runs import make_tracker
    from lbm_registry.train.cache import LatentCache
    from lbm_registry.train.data import PairStream, shard_hashes
    from lbm_registry.train.distributed import DistContext
    from lbm_registry.train.loop import (
        LoRATrainer,
        autocast_dtype,
        check_optimizer_available,
        check_output_dir,
    )
    from lbm_registry.train.losses import build_pixel_loss, latent_loss_fn
    from lbm_registry.train.objective import BridgeObjective

    settings = settings or WorkspaceSettings.resolve()
    if dist is None:
        dist = DistContext(device=pick_device(config.device))
    folder = str(run_folder(config, settings, bool(resume))) if dist.is_main else None
    cfg = config.model_copy(update={"output_dir": dist.broadcast(folder)})  # one run folder for all
    cfg._notes = list(config.notes)
    if resume is not None and dist.is_main:
        check_output_dir(cfg.output_dir, resume)
    base, lbm, train_shards, val_shards, parent, lora = check_training(cfg, settings)
    cfg = with_save_dtype(cfg, lora if parent is not None else None)

    device = dist.device if dist.device is not None else pick_device(cfg.device)
    check_optimizer_available(cfg.optimizer, device)
    pixel = None
    if cfg.pixel_loss is not None:  # LPIPS availability is checked here, not mid-run
        pixel = build_pixel_loss(cfg.pixel_loss.kind, lpips_net=cfg.pixel_loss.lpips_net,
                                 lpips_random_backbone=cfg.pixel_loss.lpips_random_backbone, device=device)
    objective = BridgeObjective.create(
        lbm, latent_loss_fn(cfg.latent_loss), timesteps=cfg.timesteps, probabilities=cfg.timestep_probabilities,
        bridge_noise_sigma=cfg.bridge_noise_sigma, pixel_loss=pixel,
        pixel_weight=cfg.pixel_loss.weight if cfg.pixel_loss else 0.0, latent_sample=cfg.latent_sample,
        pixel_crop_size=cfg.pixel_loss.crop_size if cfg.pixel_loss else None)
    datasets = shard_hashes([*train_shards, *val_shards]) if cfg.register_name else []

    # frozen base weights in the autocast dtype on GPU; the trained LoRA factors stay fp32 (master copy)
    amp = autocast_dtype(device, cfg.mixed_precision)
    base_dtype = amp if (amp is not None and device.type == "cuda") else torch.float32
    model = load_lbm(base.path, lbm, device=device, dtype=base_dtype)
    from lbm_registry.api.registry import tensor_sha_of

    lora_info = {"base_sha256": base.sha256, "base_ref": base.label, "base_tensor_sha256": tensor_sha_of(base),
                 "base_config": lbm.name}
    if parent is not None:
        lora_info.update(parent_sha256=parent.sha256, parent_ref=parent.label)

    buckets = training_buckets(cfg, lbm)
    common = {"source_key": cfg.source_key, "target_key": cfg.target_key, "resolution": cfg.resolution,
              "buckets": buckets, "on_bad_sample": cfg.on_bad_sample}
    train_stream = PairStream(train_shards, shuffle=True, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, **common)
    val_stream = PairStream(val_shards, shuffle=False, **common) if val_shards else None

    cache = None
    if cfg.cache_latents != "no":
        short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[base_dtype]
        from lbm_registry.train.buckets import size_tag

        cache = LatentCache(cfg.cache_latents, size_tag(cfg.size, buckets),
                            root=Path(cfg.output_dir) / "latent_cache", vae_tag=f"{base.sha256[:12]}-{short}",
                            with_std=cfg.latent_sample == "sample")

    tracker = make_tracker(cfg.mlflow and dist.is_main, settings.effective_tracking_uri, cfg.experiment,
                           home=settings.home, run_name=cfg.register_name or Path(cfg.output_dir).name,
                           tags={"lbm.base_sha256": base.sha256, "lbm.kind": "lora-training"})
    try:
        trainer = LoRATrainer(cfg, model=model, lora=lora, objective=objective, train_stream=train_stream,
                              val_stream=val_stream, device=device, lora_info=lora_info, tracker=tracker,
                              console=console, progress=progress, err_console=err_console, dist=dist,
                              latent_cache=cache)
    except BaseException:
        tracker.end("FAILED")
        raise
    inputs = TrainingInputs(cfg, lbm, base, parent, lora, train_shards, val_shards, device, datasets)
    return trainer, inputs


def with_save_dtype(cfg: TrainConfig, parent: LoRAFile | None) -> TrainConfig:
    """``cfg`` with ``save_dtype: null`` resolved: the parent LoRA's dtype (a bf16 parent gives a
    bf16 child), fp32 for a new LoRA. Resolved once, before training, so the run writes, records
    and registers one dtype."""
    if cfg.save_dtype is not None:
        return cfg
    out = cfg.model_copy(update={"save_dtype": _lora_dtype(parent) if parent is not None else "fp32"})
    out._notes = list(cfg.notes)
    return out


def _lora_dtype(lora: LoRAFile) -> str:
    """A LoRA file's storage dtype as the CLI names it (fp32/bf16/fp16)."""
    from lbm_registry.lora.format import SHORT_DTYPE_NAMES

    recorded = str(lora.info.get("dtype") or "")
    if recorded in ("fp32", "bf16", "fp16"):
        return recorded
    first = next(iter(lora.layers.values()), None)
    return SHORT_DTYPE_NAMES.get(first.down.dtype, "fp32") if first is not None else "fp32"


def lora_facts(lora: LoRAFile, result: TrainResult, dtype: str) -> dict[str, Any]:
    """Catalog facts for a trained LoRA (``policy: trained``)."""
    linear = [la for la in lora.layers.values() if not la.is_conv]
    conv = [la for la in lora.layers.values() if la.is_conv]
    alphas = {la.alpha for la in lora.layers.values()}
    return {
        "rank": max((la.rank for la in linear), default=0),
        "conv_rank": max((la.rank for la in conv), default=0),
        "policy": "trained",
        "alpha": max(alphas) if alphas else None,
        "dtype": dtype,
        "n_layers": len(lora.layers),
        "layers": [{"module": la.module, "kind": la.kind, "shape": list(la.weight_shape), "rank": la.rank,
                    "alpha": la.alpha} for la in lora.layers.values()],
        "trained_modules": list(result.trained_modules),
        "steps": result.steps,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "initial_val_loss": result.initial_val_loss,
    }


def register_trained_lora(result: TrainResult, inputs: TrainingInputs, name: str,
                          settings: WorkspaceSettings) -> ResolvedAsset:
    """Register the trained file as the next version of ``name`` with its full lineage."""
    from lbm_registry.api.registry import register_asset
    from lbm_registry.lora.format import read_lora

    lora = read_lora(result.lora_path)
    dtype = str(lora.info.get("dtype") or inputs.config.save_dtype or "fp32")
    lineage: dict[str, Any] = {"base": inputs.base, "datasets": inputs.datasets,
                               "training_config": inputs.config.to_dict()}
    if inputs.parent is not None:
        lineage["parent"] = inputs.parent
    metrics = {k: v for k, v in {"train_loss": result.train_loss, "val_loss": result.val_loss,
                                 "initial_val_loss": result.initial_val_loss, "steps": result.steps,
                                 "trainable_params": result.trainable_params}.items() if v is not None}
    artifacts = {p.name: p for p in (result.samples_path, result.loss_plot) if p is not None and p.is_file()}
    tags = {"lbm.train_run_id": result.run_id} if result.run_id else None
    from lbm_registry.api.run.probe import first_pair, probe_artifacts

    pair = first_pair(inputs.validation_shards, source_key=inputs.config.source_key,
                      target_key=inputs.config.target_key,
                      resolution=inputs.config.resolution) if inputs.validation_shards else None
    artifacts.update(probe_artifacts(Path(result.output_dir), base_path=inputs.base.path, config=inputs.lbm,
                                     lora_path=result.lora_path, kind="lora", source=pair[0] if pair else None,
                                     reference=pair[1] if pair else None))
    return register_asset(result.lora_path, name=name, kind="lora", settings=settings, config=inputs.lbm.to_dict(),
                          facts=lora_facts(lora, result, dtype), lineage=lineage, metrics=metrics,
                          artifacts=artifacts, params={"optimizer": inputs.config.optimizer,
                                                       "learning_rate": inputs.config.learning_rate,
                                                       "batch_size": inputs.config.batch_size},
                          tags=tags)


def train_lora(config: TrainConfig | str | Path, overrides: Mapping[str, Any] | None = None, *,
               settings: WorkspaceSettings | None = None, resume: bool = False, progress: bool = True,
               console: Console | None = None, err_console: Console | None = None,
               json_output: bool = False) -> dict[str, Any]:
    """Fine-tune a LoRA as ``config`` says (plus dotted-key ``overrides``) and register it when
    ``register`` is set. Returns a JSON-safe summary (paths, losses, parameter counts, ref).

    With ``num_processes > 1`` this launches that many local data-parallel workers (see
    :mod:`lbm_registry.train.launch`); started by ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE``
    set) it is one of the workers: every process trains its share, only rank 0 logs to MLflow,
    writes checkpoints and the LoRA, and registers it."""
    settings = settings or WorkspaceSettings.resolve()
    cfg = load_training_config(config, overrides)
    _cheap_checks(cfg, settings)

    from lbm_registry.train.distributed import init_distributed, launched_world_size

    err_console = err_console or console
    if launched_world_size() <= 1 and cfg.num_processes > 1:
        from lbm_registry.train.launch import launch_local
        from lbm_registry.train.loop import check_output_dir

        for note in cfg.notes:
            _note(err_console, note)
        folder = run_folder(cfg, settings, resume)
        check_output_dir(folder, resume)
        cfg = cfg.model_copy(update={"output_dir": str(folder)})
        check_training(cfg, settings)  # bad references, data or options: one line now, not from N workers
        return launch_local(cfg, settings=settings, entry=f"{__name__}:train_lora", resume=resume,
                            json_output=json_output)
    dist = init_distributed(cfg.device)
    if dist.is_main:
        for note in cfg.notes:
            _note(err_console, note)
    trainer, inputs = build_lora_trainer(cfg, settings=settings, console=console, progress=progress, resume=resume,
                                         err_console=err_console, dist=dist)
    result = trainer.fit(resume=resume)
    cfg = trainer.cfg
    out: dict[str, Any] = {
        "output_dir": str(result.output_dir), "lora_path": str(result.lora_path), "steps": result.steps,
        "epochs": result.epochs, "train_loss": result.train_loss, "val_loss": result.val_loss,
        "initial_val_loss": result.initial_val_loss, "trainable_params": result.trainable_params,
        "lora_params": result.lora_params, "total_params": result.total_params,
        "trained_modules": len(result.trained_modules), "lora_modules": len(inputs.lora.layers),
        "skipped_samples": result.skipped_samples, "resumed_from": result.resumed_from,
        "samples": str(result.samples_path) if result.samples_path else None,
        "loss_plot": str(result.loss_plot) if result.loss_plot else None,
        "base": inputs.base.label, "parent": inputs.parent.label if inputs.parent else None,
        "mlflow_run_id": result.run_id, "device": str(inputs.device),
        "num_processes": dist.world_size, "global_batch": trainer.global_batch, "process_rank": dist.rank,
    }
    if cfg.register_name and dist.is_main:
        from lbm_registry.errors import LBMError

        try:
            asset = register_trained_lora(result, inputs, cfg.register_name, settings)
        except LBMError as exc:  # the training itself is safe on disk: say how to retry
            raise type(exc)(f"{exc} (the trained LoRA is at {result.lora_path}; rerun with --resume "
                            f"--register {cfg.register_name} to retry registering)") from exc
        out.update(ref=asset.label, sha256=asset.sha256, registered_path=str(asset.path))
    dist.barrier()
    return out


def _note(console: Console | None, message: str) -> None:
    if console is not None:
        from rich.markup import escape

        console.print(f"[cyan]note:[/] {escape(message)}", soft_wrap=True)


def finetune_full(base_path: str | Path, config: LBMConfig | str | Path | None = None,
                  shards: str | Iterable[str] | None = None, steps: int = 20, lr: float = 1e-4,
                  output: str | Path | None = None, seed: int = 0, *, train_shards: str | Iterable[str] | None = None,
                  batch_size: int = 2, resolution: int = 64, device: str = "auto", source_key: str = "source.jpg",
                  target_key: str = "target.jpg", progress: Callable[[int, int, float], None] | None = None) -> Path:
    """Fine-tune ALL denoiser weights briefly (bridge matching, AdamW) and save a full LBM checkpoint.

    Why: the demo needs a genuine full fine-tune to extract a LoRA from. The VAE stays frozen.
    ``config`` may be None when the base checkpoint carries its config; ``train_shards`` is an
    alias of ``shards``. Deterministic for a seed on a given machine. ``progress(step, steps,
    loss)`` is called after every step (the demo prints a line now and then from it).
    """
    import torch

    from lbm_registry.errors import ConfigError, DataError
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.config import LBMConfig, load_config
    from lbm_registry.lbm.loading import config_from_checkpoint, load_lbm, save_lbm
    from lbm_registry.lbm.model import pick_device
    from lbm_registry.registry.blobs import sha256_file
    from lbm_registry.train.data import PairStream, expand_shards
    from lbm_registry.train.loop import autocast_context
    from lbm_registry.train.losses import latent_loss_fn
    from lbm_registry.train.objective import BridgeObjective

    if steps < 1 or lr <= 0:
        raise ConfigError("finetune_full needs steps >= 1 and lr > 0")
    shards = shards if shards is not None else train_shards
    if shards is None or output is None:
        raise ConfigError("finetune_full needs shards and an output path")
    if isinstance(config, LBMConfig):
        lbm = config
    elif config is not None:
        lbm = load_config(config)
    else:
        with CheckpointReader(base_path) as reader:
            lbm = config_from_checkpoint(reader)
        if lbm is None:
            raise ConfigError(f"{base_path} carries no LBM config: pass one")
    if resolution % lbm.pixel_multiple:
        raise ConfigError(f"resolution {resolution} must be a multiple of {lbm.pixel_multiple}")
    dev = pick_device(device)
    model = load_lbm(base_path, lbm, device=dev, dtype=torch.float32)
    model.denoiser.requires_grad_(True).train()
    params = [p for p in model.denoiser.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # the latent mean: this stand-in fine-tune feeds the demo, whose printed numbers the README shows
    objective = BridgeObjective.create(lbm, latent_loss_fn("l2"), latent_sample="mean")
    stream = PairStream(expand_shards([shards] if isinstance(shards, str) else shards), source_key=source_key,
                        target_key=target_key, resolution=resolution, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    autocast = autocast_context(dev, "auto")
    step, epoch = 0, 0
    while step < steps:
        got = False
        for batch in stream.batches(batch_size, epoch=epoch):
            got = True
            with autocast():
                loss = objective(model, batch.source.to(dev), batch.target.to(dev), gen)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if progress is not None:
                progress(step, steps, float(loss.detach()))
            if step >= steps:
                break
        if not got:
            raise DataError("no usable samples in the shards")
        epoch += 1
    model.requires_grad_(False).eval()
    model.num_iterations.fill_(step)
    meta = {"lbm_registry_finetune": json.dumps({"base_sha256": sha256_file(base_path), "steps": step, "lr": lr,
                                                 "seed": seed, "resolution": resolution})}
    return save_lbm(model, output, metadata=meta)


def synth_data(output: str | Path, n: int, *, resolution: int = 128, seed: int = 0, shard_size: int = 64,
               prefix: str = "synth") -> dict[str, Any]:
    """Write synthetic relighting shards; returns their paths and a brace pattern for configs."""
    from lbm_registry.errors import DataError
    from lbm_registry.ranges import check_resolution, check_seed
    from lbm_registry.train.synth import shard_pattern, write_synth_shards

    check_resolution(resolution)  # before the output folder exists: a refusal creates nothing
    check_seed(seed)
    try:
        paths = write_synth_shards(output, n, resolution=resolution, seed=seed, shard_size=shard_size, prefix=prefix)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return {"shards": [str(p) for p in paths], "pattern": shard_pattern(paths), "n": n,
            "resolution": resolution, "seed": seed}
