"""Load and save whole LBM models with strict architecture checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lbm_registry.lbm.checkpoint import (
    CheckpointReader,
    check_architecture,
    check_finite,
    save_safetensors,
)
from lbm_registry.lbm.config import LBMConfig
from lbm_registry.lbm.model import DENOISER_PREFIX, LBMModel, build_model

OPTIONAL_KEYS = ("num_iterations",)
CONFIG_METADATA_KEY = "lbm_config"


def verify_checkpoint(reader: CheckpointReader, config: LBMConfig, *, denoiser_only: bool = False,
                      model: LBMModel | None = None) -> None:
    """Raise ArchitectureError unless ``reader`` holds exactly the model ``config`` describes.

    ``model``: that model already built (on the meta device), to avoid building it twice.
    """
    model = model if model is not None else build_model(config, meta=True)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    actual = reader.shapes()
    if denoiser_only:
        expected = {k: v for k, v in expected.items() if k.startswith(DENOISER_PREFIX)}
        actual = {k: v for k, v in actual.items() if k.startswith(DENOISER_PREFIX)}
    check_architecture(actual, expected, reader.path, f"LBM checkpoint for '{config.name}'",
                       allow_missing=OPTIONAL_KEYS)


def load_lbm(path: str | Path, config: LBMConfig, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, check_nan: bool = True) -> LBMModel:
    """Load a full LBM checkpoint strictly (keys and shapes) into a fresh model."""
    reader = CheckpointReader(path)
    model = build_model(config, meta=True)   # building costs seconds at full size: once, not twice
    verify_checkpoint(reader, config, model=model)
    sd = {}
    for key, t in reader.items():
        if check_nan:
            check_finite(key, t, reader.path)
        sd[key] = t
    if "num_iterations" not in sd:
        sd["num_iterations"] = torch.zeros((), dtype=torch.int64)
    model.load_state_dict(sd, strict=True, assign=True)
    model.num_iterations = model.num_iterations.to(torch.int64)
    model = model.to(device=device)
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


def config_from_checkpoint(reader: CheckpointReader) -> LBMConfig | None:
    """The config embedded by :func:`save_lbm`, if any."""
    from lbm_registry.lbm.config import config_from_dict

    raw = reader.metadata.get(CONFIG_METADATA_KEY)
    if not raw:
        return None
    return config_from_dict(json.loads(raw), f"{reader.path} metadata")
