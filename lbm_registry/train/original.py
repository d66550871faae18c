"""Run a training config written for the original LBM scripts.

The original relighting LoRA config (``lora_relight_config.yaml``) and the upstream training
scripts spell things their own way: ``base_model_path``, ``lora_weights_path``,
``max_epochs``, ``selected_timesteps``/``prob``, ``latent_loss_type``, ``save_ckpt_path``,
Lightning's ``precision: bf16-mixed`` and ``accumulate_grad_batches`` ... Rather than making a
user rewrite it, :func:`translate_original_config` maps every key that has a meaning here onto
ours and drops the ones that do not (Hub model names, W&B settings, Lightning strategies),
returning one note per decision so nothing happens silently. Keys that are neither ours nor
known original keys stay errors: a typo must not pass as "ignored".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# original key -> our key (same meaning, value taken as is)
RENAMED: dict[str, str] = {
    "base_model_path": "base",
    "lora_weights_path": "lora",
    "max_epochs": "epochs",
    "num_epochs": "epochs",
    "max_train_steps": "max_steps",
    "selected_timesteps": "timesteps",
    "prob": "timestep_probabilities",
    "latent_loss_type": "latent_loss",
    "save_ckpt_path": "output_dir",
    "save_interval": "checkpoint_interval",
    "checkpointing_steps": "checkpoint_interval",
    "log_interval": "validation_interval",
    "wandb_project": "experiment",
    "accumulate_grad_batches": "gradient_accumulation_steps",
    "gradient_clip_val": "max_grad_norm",
    "image_size": "resolution",
}

# original key -> why it has no effect here
IGNORED: dict[str, str] = {
    "backbone_signature": "the architecture comes from the base checkpoint / model_config",
    "vae_num_channels": "the architecture comes from the base checkpoint / model_config",
    "unet_input_channels": "the architecture comes from the base checkpoint / model_config",
    "timestep_sampling": "timesteps are drawn from `timesteps` with `timestep_probabilities`",
    "logit_mean": "timesteps are drawn from `timesteps` with `timestep_probabilities`",
    "logit_std": "timesteps are drawn from `timesteps` with `timestep_probabilities`",
    "num_steps": "validation samples use the LBM config's inference steps",
    "conditioning_images_keys": "no extra conditioning inputs in LoRA training",
    "conditioning_masks_keys": "no extra conditioning inputs in LoRA training",
    "mask_key": "no masked loss in LoRA training",
    "learning_rate_scheduler": "constant learning rate",
    "learning_rate_scheduler_kwargs": "constant learning rate",
    "resume_from_checkpoint": "pass --resume",
    "path_config": "the LBM config is model_config",
    "config_yaml": "the LBM config is model_config",
    "wandb_entity": "runs are logged to MLflow",
    "wandb_run_name": "runs are logged to MLflow",
    "strategy": "use --num-processes N or accelerate launch / torchrun",
    "devices": "use --num-processes N or accelerate launch / torchrun",
    "num_nodes": "use accelerate launch / torchrun on each node",
    "lora_dropout": "no LoRA dropout",
}

_PRECISION = {"bf16-mixed": "bf16", "bf16": "bf16", "bf16-true": "bf16", "16-mixed": "fp16", "16": "fp16",
              "fp16": "fp16", "32": "no", "32-true": "no", "fp32": "no", "no": "no"}

ORIGINAL_KEYS = frozenset(RENAMED) | frozenset(IGNORED) | {
    "precision", "optimizer", "optimizer_kwargs", "pixel_loss_type", "pixel_loss_weight",
    "latent_loss_weight", "lora_rank", "lora_alpha", "lora_target_modules", "rank"}


def looks_original(data: Mapping[str, Any], own_keys: set[str]) -> bool:
    """True when ``data`` uses keys only the original scripts know (so it needs translating)."""
    return any(k in ORIGINAL_KEYS and k not in own_keys for k in data)


def translate_original_config(data: Mapping[str, Any], own_keys: set[str]) -> tuple[dict[str, Any], list[str]]:
    """Map an original-style config onto ours. Returns ``(translated, notes)``: one note for what
    was mapped and one for what was ignored (and why)."""
    out: dict[str, Any] = {}
    mapped: list[str] = []
    ignored: list[str] = []
    for key, value in data.items():
        if key in own_keys and key not in ("optimizer", "mixed_precision"):
            out[key] = value
        elif key in RENAMED:
            ours = RENAMED[key]
            if key == "num_epochs" and "max_epochs" in data:
                continue
            out[ours] = value
            mapped.append(f"{key} -> {ours}")
        elif key in IGNORED:
            ignored.append(f"{key} ({IGNORED[key]})")
        elif key in ("precision", "mixed_precision"):
            mp = _PRECISION.get(str(value).lower())
            if mp is None:
                out["mixed_precision"] = value  # let validation name the bad value
            else:
                out["mixed_precision"] = mp
                if key != "mixed_precision" or mp != value:
                    mapped.append(f"{key}: {value} -> mixed_precision: {mp}")
        elif key == "optimizer":
            name = str(value).lower().replace("_", "").replace("-", "")
            table = {"adamw": "adamw", "adam": "adamw", "sgd": "sgd", "adamw8bit": "adamw8bit",
                     "adamw8": "adamw8bit"}
            out["optimizer"] = table.get(name, value)
            if out["optimizer"] != value:
                mapped.append(f"optimizer: {value} -> {out['optimizer']}")
        elif key == "optimizer_kwargs":
            kwargs = dict(value or {})
            for k in ("weight_decay", "momentum"):
                if k in kwargs:
                    out[k] = kwargs.pop(k)
                    mapped.append(f"optimizer_kwargs.{k} -> {k}")
            if kwargs:
                ignored.append(f"optimizer_kwargs {sorted(kwargs)} (default optimizer settings)")
        elif key in ("pixel_loss_type", "pixel_loss_weight", "latent_loss_weight"):
            continue  # handled below, together
        elif key in ("lora_rank", "rank", "lora_alpha", "lora_target_modules"):
            continue  # handled below: only meaningful for a fresh LoRA
        else:
            out[key] = value  # unknown: validation reports it as an unknown field
    weight = data.get("pixel_loss_weight")
    kind = data.get("pixel_loss_type")
    if kind is not None and weight not in (None, 0, 0.0):
        out["pixel_loss"] = {"kind": str(kind).lower(), "weight": weight}
        mapped.append("pixel_loss_type/pixel_loss_weight -> pixel_loss")
    elif kind is not None or weight is not None:
        ignored.append("pixel_loss_type/pixel_loss_weight (weight 0: no pixel loss)")
    if data.get("latent_loss_weight") not in (None, 1, 1.0):
        ignored.append("latent_loss_weight (the latent loss has weight 1; scale learning_rate instead)")
    rank = data.get("lora_rank", data.get("rank"))
    fresh_keys = [k for k in ("lora_rank", "rank", "lora_alpha", "lora_target_modules") if k in data]
    if fresh_keys and "lora" not in out and "new_lora" not in out:
        new: dict[str, Any] = {}
        if rank is not None:
            new["rank"] = rank
        if data.get("lora_alpha") is not None:
            new["alpha"] = data["lora_alpha"]
        if data.get("lora_target_modules") is not None:
            new["targets"] = data["lora_target_modules"]
        out["new_lora"] = new
        mapped.append(f"{'/'.join(fresh_keys)} -> new_lora")
    elif fresh_keys:
        ignored.append(f"{'/'.join(fresh_keys)} (the LoRA's own ranks and alphas are kept)")
    notes = []
    if mapped:
        notes.append("original LBM config translated: " + ", ".join(mapped))
    if ignored:
        notes.append("ignored original keys: " + "; ".join(ignored))
    return out, notes
