"""Upstream LBM's model config, translated into ours.

Upstream (gojasper/LBM) describes a model with a flat YAML, the keyword arguments of its
``inference.utils._get_model_from_config``: ``backbone_signature``, ``unet_input_channels``,
``vae_num_channels``, ``bridge_noise_sigma``, ``selected_timesteps``, ``prob``, ``source_key``,
``target_key``, ``conditioning_images_keys``/``conditioning_masks_keys``, ``timestep_sampling``,
the loss settings. Its checkpoints record the same model as ``LBMConfig.to_dict()`` (the original
``create_exact_base_model.py`` stores the YAML as ``source_config`` and that dict as ``config``;
Lightning keeps the dict in ``hyper_parameters.model_config``).

The architecture upstream builds is fixed whatever the backbone: the SDXL-shaped UNet and the
SDXL VAE of our ``lbm-relighting`` config, with ``unet_input_channels`` in and
``vae_num_channels`` out. :func:`translate_upstream` therefore starts from that config and maps
the keys that have a meaning here, with one note for what was mapped and one for what was
ignored (and why), as ``train`` does for the original training configs. Where a key is absent
it takes upstream's default, not ours (``bridge_noise_sigma`` 0.0, ``target_key``
``source_image_paste``): the same YAML must build the same model. Training keys are refused: a
training config is not a model config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lbm_registry.errors import ConfigError

#: Keys of upstream's model YAML (``_get_model_from_config``) and of its ``LBMConfig.to_dict()``.
MODEL_KEYS = frozenset({
    "backbone_signature", "unet_input_channels", "vae_num_channels", "timestep_sampling", "selected_timesteps",
    "prob", "conditioning_images_keys", "conditioning_masks_keys", "source_key", "target_key",
    "bridge_noise_sigma", "logit_mean", "logit_std", "pixel_loss_type", "latent_loss_type",
    "latent_loss_weight", "pixel_loss_weight", "pixel_loss_max_size", "mask_key", "input_key", "name",
    "ucg_keys",
})
#: Keys only upstream (not our nested config) writes at the top level: their presence marks a config as upstream's.
MARKERS = MODEL_KEYS - {"name"}
#: Keys of upstream's (and the original LoRA scripts') *training* YAML.
TRAINING_KEYS = frozenset({
    "train_shards", "validation_shards", "batch_size", "learning_rate", "optimizer", "num_steps", "log_interval",
    "resume_from_checkpoint", "max_epochs", "save_interval", "save_ckpt_path", "wandb_project",
    "base_model_path", "lora_weights_path", "trainable_lora_modules", "path_config",
})
#: upstream's own defaults (``_get_model_from_config``) for the keys that shape the model we build.
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "unet_input_channels": 4, "vae_num_channels": 4, "bridge_noise_sigma": 0.0, "source_key": "source_image",
    "target_key": "source_image_paste", "timestep_sampling": "log_normal", "conditioning_images_keys": [],
    "conditioning_masks_keys": [],
}
_IGNORED = {
    "backbone_signature": "upstream builds the same SDXL-shaped UNet and SDXL VAE whatever the backbone; "
                          "weights come from --sdxl-unet / --vae or the checkpoint",
    "logit_mean": "training timesteps are drawn from bridge.timesteps",
    "logit_std": "training timesteps are drawn from bridge.timesteps",
    "pixel_loss_type": "a training setting (the training config's pixel_loss)",
    "pixel_loss_weight": "a training setting (the training config's pixel_loss)",
    "pixel_loss_max_size": "a training setting",
    "latent_loss_type": "a training setting (the training config's latent_loss)",
    "latent_loss_weight": "a training setting",
    "mask_key": "no masked loss here",
    "input_key": "unused by LBM",
    "ucg_keys": "no classifier-free guidance in LBM",
    "name": "upstream's class name",
}


def _architecture_file() -> Path:
    """The architecture upstream builds: our built-in ``lbm-relighting`` config (in the folder
    :func:`lbm_registry.lbm.config.builtin_config_dir` names; spelled out here because
    ``lbm.config`` imports this module, not the other way round)."""
    return Path(__file__).resolve().parents[1] / "configs" / "lbm-relighting.yaml"


def looks_upstream(data: Any) -> bool:
    """A mapping written the upstream way (flat keys such as ``unet_input_channels``)."""
    return isinstance(data, Mapping) and any(k in MARKERS or k in TRAINING_KEYS for k in data)


def translate_upstream(data: Mapping[str, Any], source: str = "<config>", *,
                       name: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Our config dict (see :class:`~lbm_registry.lbm.config.LBMConfig`) for upstream's model
    config ``data``, and the notes saying what was mapped and what was ignored. Its ``name`` is
    ``lbm-upstream`` unless given (upstream's config names no task: relighting, depth and normals
    models share it; the name shows in LoRAs' ``modelspec.architecture``).

    Raises :class:`ConfigError` (one line) for a training config, for keys that are neither ours
    nor upstream's, and for what this cannot build (concatenated masks)."""
    training = sorted(k for k in data if k in TRAINING_KEYS)
    if training:
        raise ConfigError(f"{source} is a training config ({', '.join(training[:3])}): give the model config "
                          "(the YAML that goes with the weights: backbone_signature, unet_input_channels, ...)")
    unknown = sorted(k for k in data if k not in MODEL_KEYS)
    if unknown:
        raise ConfigError(f"invalid config {source}: {unknown[0]}: unknown field (neither ours nor upstream LBM's)")
    import yaml

    out: dict[str, Any] = yaml.safe_load(_architecture_file().read_text())
    out["name"] = name or "lbm-upstream"
    got = {**UPSTREAM_DEFAULTS, **{k: v for k, v in data.items() if v is not None or k not in UPSTREAM_DEFAULTS}}
    mapped: list[str] = []
    ignored: list[str] = []
    defaults = [k for k in ("bridge_noise_sigma", "target_key") if k not in data]

    out["denoiser"]["in_channels"] = got["unet_input_channels"]
    out["denoiser"]["out_channels"] = got["vae_num_channels"]
    out["vae"]["latent_channels"] = got["vae_num_channels"]
    for key, ours in (("unet_input_channels", "denoiser.in_channels"),
                      ("vae_num_channels", "denoiser.out_channels/vae.latent_channels")):
        if key in data:
            mapped.append(f"{key} -> {ours}")
    bridge = out["bridge"]
    for key, ours in (("bridge_noise_sigma", "bridge_noise_sigma"), ("source_key", "source_key"),
                      ("target_key", "target_key"), ("conditioning_images_keys", "conditioning_images_keys")):
        bridge[ours] = got[key]
        if key in data:
            mapped.append(f"{key} -> bridge.{ours}")
    if got.get("conditioning_masks_keys"):
        raise ConfigError(f"{source}: conditioning_masks_keys {got['conditioning_masks_keys']} are not supported "
                          "(masks concatenated to the latent)")
    if "conditioning_masks_keys" in data:
        ignored.append("conditioning_masks_keys (empty)")
    sampling = got.get("timestep_sampling")
    if got.get("selected_timesteps") is not None:
        bridge["timesteps"] = list(got["selected_timesteps"])
        mapped.append("selected_timesteps -> bridge.timesteps")
    if got.get("prob") is not None:
        bridge["timestep_probabilities"] = list(got["prob"])
        mapped.append("prob -> bridge.timestep_probabilities")
    if sampling == "custom_timesteps":
        if "timestep_sampling" in data:
            mapped.append("timestep_sampling: custom_timesteps (the bridge.timesteps draw)")
    else:
        ignored.append(f"timestep_sampling: {sampling}{' (upstream default)' if 'timestep_sampling' not in data else ''}"
                       f" (training draws from bridge.timesteps {bridge['timesteps']}, as custom_timesteps)")
    for key, why in _IGNORED.items():
        if key in data:
            ignored.append(f"{key} ({why})")
    notes = []
    if mapped:
        notes.append("upstream LBM model config translated: " + ", ".join(mapped))
    if defaults:
        notes.append("absent keys take upstream's defaults: "
                     + ", ".join(f"{k} = {UPSTREAM_DEFAULTS[k]!r}" for k in defaults))
    if ignored:
        notes.append("ignored upstream keys: " + "; ".join(ignored))
    return out, notes
