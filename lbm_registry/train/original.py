"""Run a training config written for the original LBM scripts.

The original relighting LoRA config (``lora_relight_config.yaml``) and upstream LBM's training
configs (``examples/training/config/*.yaml``) spell things their own way: ``base_model_path``,
``lora_weights_path``, ``max_epochs``, ``selected_timesteps``/``prob``, ``latent_loss_type``,
``save_ckpt_path``, ``learning_rate_scheduler``, Lightning's ``precision: bf16-mixed`` and
``accumulate_grad_batches`` ... Rather than making a user rewrite it,
:func:`translate_original_config` maps every key that has a meaning here onto ours and drops the
ones that do not (Hub model names, W&B settings, Lightning strategies), returning one note per
decision so nothing happens silently. Keys that are neither ours nor known original keys stay
errors: a typo must not pass as "ignored".

What the original scripts did without a key says so is made explicit too: they resize every
image to 480x640 (``resolution``), train for ``max_epochs`` with no step cap, read
``source.jpg``/``target.jpg`` entries that their data pipeline renames ``source_image``/
``target_image`` (the names upstream's configs use), and build LPIPS with VGG.
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
    "learning_rate_scheduler": "lr_scheduler",
    "learning_rate_scheduler_kwargs": "lr_scheduler_kwargs",
    "pixel_loss_max_size": "pixel_loss.crop_size",
    "accumulate_grad_batches": "gradient_accumulation_steps",
    "gradient_clip_val": "max_grad_norm",
    "image_size": "resolution",
}

# original key -> why it has no effect here
IGNORED: dict[str, str] = {
    "backbone_signature": "the architecture comes from the base checkpoint / model_config",
    "vae_num_channels": "the architecture comes from the base checkpoint / model_config",
    "unet_input_channels": "the architecture comes from the base checkpoint / model_config",
    "logit_mean": "log_normal timestep sampling is not supported: timesteps come from `timesteps`",
    "logit_std": "log_normal timestep sampling is not supported: timesteps come from `timesteps`",
    "num_steps": "validation samples use the LBM config's inference steps",
    "conditioning_images_keys": "no extra conditioning inputs in LoRA training",
    "conditioning_masks_keys": "no extra conditioning inputs in LoRA training",
    "mask_key": "no masked loss in LoRA training",
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
    "latent_loss_weight", "lora_rank", "lora_alpha", "lora_target_modules", "rank", "wandb_project",
    "timestep_sampling"}

# what the original scripts do when their config does not say
ORIGINAL_RESOLUTION = [480, 640]       # torchvision Resize((480, 640)) in every original data pipeline
# upstream's relighting pipelines read these entries and rename them to the keys their configs name
RELIGHT_ENTRIES = {"source_image": "source.jpg", "target_image": "target.jpg"}
UPSTREAM_TIMESTEPS = 1000              # `timestep_sampling: uniform` = every scheduler timestep, 1..1000


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
            if ours.startswith("pixel_loss."):
                continue  # handled below, with the pixel loss
            if key == "learning_rate_scheduler" and value is None:
                value = "constant"
            out[ours] = value
            mapped.append(f"{key} -> {ours}")
        elif key == "wandb_project":
            if value is None or str(value).lower() in ("null", "none", ""):
                ignored.append("wandb_project: null (runs are logged to MLflow; experiment keeps its default)")
            else:
                out["experiment"] = value
                mapped.append("wandb_project -> experiment")
        elif key == "timestep_sampling":
            _timestep_sampling(str(value), data, out, mapped, ignored)
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
        pixel: dict[str, Any] = {"kind": str(kind).lower(), "weight": weight}
        if pixel["kind"] == "lpips":
            pixel["lpips_net"] = "vgg"  # upstream builds lpips.LPIPS(net="vgg")
        if data.get("pixel_loss_max_size") is not None:
            pixel["crop_size"] = data["pixel_loss_max_size"]
        out["pixel_loss"] = pixel
        mapped.append("pixel_loss_type/pixel_loss_weight" + ("/pixel_loss_max_size" if "crop_size" in pixel else "")
                      + " -> pixel_loss" + (" (LPIPS with VGG, as upstream)" if pixel["kind"] == "lpips" else ""))
    elif kind is not None or weight is not None or "pixel_loss_max_size" in data:
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
    _implicit(data, out, mapped)
    notes = []
    if mapped:
        notes.append("original LBM config translated: " + ", ".join(mapped))
    if ignored:
        notes.append("ignored original keys: " + "; ".join(ignored))
    if "lora_weights_path" in data and "pixel_loss_type" not in data:
        notes.append("the original LoRA script also trained with the pixel loss stored in the base checkpoint's "
                     "config (LPIPS with VGG, weight 10, as create_exact_base_model.py writes it): add "
                     "pixel_loss: {kind: lpips, weight: 10} to train that objective (it needs the VGG weights cached)")
    return out, notes


def _timestep_sampling(value: str, data: Mapping[str, Any], out: dict[str, Any], mapped: list[str],
                       ignored: list[str]) -> None:
    """upstream's ``timestep_sampling``: ``custom_timesteps`` = ``selected_timesteps`` with ``prob``
    (mapped on their own); ``uniform`` = every timestep 1..1000 alike."""
    if value == "custom_timesteps":
        return
    if value == "uniform" and "selected_timesteps" not in data:
        out["timesteps"] = list(range(1, UPSTREAM_TIMESTEPS + 1))
        out.pop("timestep_probabilities", None)
        mapped.append(f"timestep_sampling: uniform -> timesteps: 1..{UPSTREAM_TIMESTEPS} (uniform)")
    else:
        ignored.append(f"timestep_sampling: {value} (not supported: timesteps come from `timesteps`, by default "
                       "the LBM config's)")


def _implicit(data: Mapping[str, Any], out: dict[str, Any], mapped: list[str]) -> None:
    """Make explicit what the original scripts do when the config does not say."""
    for key in ("train_shards", "validation_shards"):  # webdataset's `pipe:cat FILE` is the file
        shards = out.get(key)
        items = [shards] if isinstance(shards, str) else shards
        if isinstance(items, list) and any(isinstance(x, str) and x.startswith("pipe:cat ") for x in items):
            out[key] = [x[len("pipe:cat "):].strip() if isinstance(x, str) and x.startswith("pipe:cat ") else x
                        for x in items]
            mapped.append(f"{key}: pipe:cat FILE -> FILE")
    if "resolution" not in out:
        out["resolution"] = list(ORIGINAL_RESOLUTION)
        mapped.append("resolution: 480x640 (what the original scripts resize to)")
    if "epochs" in out and "max_steps" not in out:
        out["max_steps"] = None
        mapped.append("max_steps: none (training runs max_epochs, as Lightning does)")
    for key in ("source_key", "target_key"):
        name = out.get(key)
        if isinstance(name, str) and name.lower() in RELIGHT_ENTRIES:
            entry = RELIGHT_ENTRIES[name.lower()]
            out[key] = [name, entry]
            mapped.append(f"{key}: {name} -> [{name}, {entry}] ({name}.<any image extension>, else the {entry} "
                          f"entry upstream's relighting pipeline renames {name})")
