"""Load and save whole LBM models with strict architecture checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lbm_registry.lbm.checkpoint import CheckpointReader, save_safetensors
from lbm_registry.lbm.config import LBMConfig
from lbm_registry.lbm.header import (
    CONFIG_METADATA_KEY,
    OPTIONAL_KEYS,
    SafetensorsHeader,
    checkpoint_shapes,
    config_from_metadata,
    verify_shapes,
)
from lbm_registry.lbm.model import LBMModel, build_model

__all__ = ["CONFIG_METADATA_KEY", "OPTIONAL_KEYS", "checkpoint_shapes", "config_from_checkpoint", "load_lbm",
           "save_lbm", "verify_checkpoint"]


def verify_checkpoint(reader: CheckpointReader | SafetensorsHeader, config: LBMConfig, *,
                      denoiser_only: bool = False, model: LBMModel | None = None) -> None:
    """Raise ArchitectureError unless ``reader`` holds exactly the model ``config`` describes.

    Needs no model: the key/shape table comes from the config (``model``, when one is already
    built, is used instead of the table).
    """
    expected = None if model is None else {k: tuple(v.shape) for k, v in model.state_dict().items()}
    verify_shapes(reader.shapes(), config, reader.path, denoiser_only=denoiser_only, expected=expected)


def load_lbm(path: str | Path, config: LBMConfig, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = torch.float32, check_nan: bool = True) -> LBMModel:
    """Load a full LBM checkpoint strictly (keys and shapes) into a fresh model.

    ``dtype=None`` keeps every tensor as stored (on the CPU: views of the memory-mapped file, no
    copy), for :func:`lbm_registry.lbm.upcast.compute_in`."""
    reader = CheckpointReader(path)
    verify_checkpoint(reader, config)   # from the key/shape table: a wrong file fails before any model
    model = build_model(config, meta=True)
    if check_nan:
        reader.check_finite()
    sd = dict(reader.items())
    if "num_iterations" not in sd:
        sd["num_iterations"] = torch.zeros((), dtype=torch.int64)
    model.load_state_dict(sd, strict=True, assign=True)
    model.num_iterations = model.num_iterations.to(torch.int64)
    model = model.to(device=device)
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.eval().requires_grad_(False)
    return model


def model_state_for_saving(model: LBMModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v
    return sd


def save_lbm(model: LBMModel, dest: str | Path, *, dtype: torch.dtype | None = None,
             metadata: dict[str, str] | None = None) -> Path:
    """Write a full LBM checkpoint (``denoiser.*``, ``vae.vae_model.*``, ``num_iterations``)
    atomically. The config travels in the metadata so the file is self-describing."""
    meta = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()), "format": "pt"}
    meta.update(metadata or {})
    return save_safetensors(model_state_for_saving(model, dtype), dest, meta)


def config_from_checkpoint(reader: CheckpointReader | SafetensorsHeader) -> LBMConfig | None:
    """The config embedded by :func:`save_lbm`, if any."""
    return config_from_metadata(reader.metadata, reader.path)
