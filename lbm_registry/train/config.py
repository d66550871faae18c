"""The training config (``configs/lora-finetune.yaml``), validated strictly.

Why strict: a typo in a training config (``learning_rte``) would otherwise silently train with
the default for hours. Unknown keys are errors; every error names the file and the field.
Every key can be overridden (the CLI maps its options and ``--set KEY=VALUE`` onto
:func:`apply_overrides`).

Relative paths (shards, model_config, base/lora paths, output_dir) are taken relative to the
current directory, like every other path on the command line. ``--config`` also accepts the name
of a built-in config (``lora-finetune``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from lbm_registry.errors import ConfigError
from lbm_registry.ranges import MAX_RESOLUTION, MAX_SEED, MIN_RESOLUTION


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewLoRAConfig(_Strict):
    """Start a fresh LoRA instead of fine-tuning an existing one.

    ``down`` is initialised like ``nn.Linear`` (Kaiming-uniform) and ``up`` at zero, so the
    model starts exactly at the base and the first gradient step already moves it.
    """

    rank: int = Field(8, ge=1, description="Rank of Linear layers (clamped to the layer's smallest side).")
    conv_rank: int = Field(0, ge=0, description="Rank of Conv2d layers; 0 leaves convolutions out.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha for Linear layers (default: rank).")
    conv_alpha: float | None = Field(None, gt=0, description="LoRA alpha for convs (default: conv_rank).")
    targets: list[str] = Field(default_factory=lambda: ["*"],
                               description="Module names: a plain name is a substring; globs and 're:REGEX' "
                                           "match whole names.")

    @field_validator("targets", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class PixelLossConfig(_Strict):
    """An extra loss on the decoded one-step prediction, in pixel space, as upstream computes it:
    on a random ``crop_size`` window (cut from the latent before decoding), the decoded image
    clamped to [-1, 1]. LPIPS uses VGG by default, as upstream and the original configs do."""

    kind: Literal["l1", "l2", "lpips"]
    weight: float = Field(1.0, gt=0)
    lpips_net: Literal["alex", "vgg"] = "vgg"
    crop_size: int | None = Field(
        512, ge=8, description="Side of the random window the pixel loss sees (upstream's pixel_loss_max_size); "
                               "a side no longer than it is taken whole; null = the whole image.")
    lpips_random_backbone: bool = Field(
        False, description="Tests only: build LPIPS with a random backbone (never downloads, meaningless as a metric).")


class TrainConfig(_Strict):
    """Everything one training run needs. See ``configs/lora-finetune.yaml`` for the documentation."""

    # -- model -------------------------------------------------------------------------------
    base: str = Field(description="REF of the base model (registry name or path).")
    model_config_path: str | None = Field(None, alias="model_config",
                                          description="LBM config YAML; optional when the base carries one.")
    lora: str | None = Field(None, description="REF of the LoRA to fine-tune.")
    new_lora: NewLoRAConfig | None = None
    trainable_lora_modules: list[str] = Field(default_factory=lambda: ["*"])

    # -- data --------------------------------------------------------------------------------
    train_shards: list[str] = Field(min_length=1)
    validation_shards: list[str] = Field(default_factory=list)
    source_key: str | list[str] = Field(
        "source.jpg", description="Sample entry of the input image; a name without an extension matches any "
                                  "image extension; a list: the first entry present.")
    target_key: str | list[str] = "target.jpg"
    resolution: int | tuple[int, int] = Field(
        256, description="Training image side, or [height, width] (480x640 on the command line).")
    aspect_buckets: bool | list[tuple[int, int]] = Field(
        False, description="Group samples by aspect ratio: true = upstream's 11 buckets at the pixel count of "
                           "resolution, or a list of [height, width].")
    on_bad_sample: Literal["error", "skip"] = "error"
    shuffle_buffer: int = Field(64, ge=1)

    # -- optimisation ------------------------------------------------------------------------
    batch_size: int = Field(4, ge=1, description="Samples per process per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0)
    optimizer: Literal["adamw", "adamw8bit", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_steps: int | None = Field(1000, ge=1)
    epochs: int | None = Field(None, ge=1)
    lr_scheduler: str = Field("constant", description="Learning-rate schedule: a diffusers get_scheduler name or "
                                                      "a torch.optim.lr_scheduler class upstream uses.")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps (diffusers schedules).")
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict,
                                                description="Extra arguments of the schedule.")
    seed: int = Field(0, ge=0, le=MAX_SEED)   # the ranges every command takes (lbm_registry.ranges)

    # -- objective ---------------------------------------------------------------------------
    timesteps: list[int] | None = None
    timestep_probabilities: list[float] | None = None
    bridge_noise_sigma: float | None = Field(None, ge=0)
    latent_loss: Literal["l2", "l1"] = "l2"
    latent_sample: Literal["sample", "mean"] = Field(
        "sample", description="Training latents: a seeded sample of the VAE posterior (upstream) or its mean.")
    pixel_loss: PixelLossConfig | None = None

    # -- validation, checkpoints, outputs ----------------------------------------------------
    validation_interval: int = Field(100, ge=1)
    validation_max_samples: int | None = Field(64, ge=1)
    num_sample_images: int = Field(4, ge=0)
    checkpoint_interval: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    output_dir: str | None = Field(
        None, description="Run folder; None = <workspace>/training/<register name or 'lora'>-<timestamp>.")
    save_dtype: Literal["fp32", "bf16", "fp16"] | None = Field(
        None, description="dtype of the trained LoRA file; None = the parent LoRA's (fp32 for a new LoRA).")
    device: str = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    cache_latents: Literal["no", "memory", "disk"] = "no"
    num_processes: int = Field(1, ge=1, description="Local data-parallel worker processes (lbm-reg train).")
    mlflow: bool = True
    experiment: str = "lbm-registry-train"
    register_name: str | None = Field(None, alias="register",
                                      description="Register the result as a new version of this LoRA name.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """What was translated or ignored when this came from an original LBM config."""
        return self._notes

    @field_validator("cache_latents", mode="before")
    @classmethod
    def _cache_bool(cls, v: Any) -> Any:
        if v is True:
            return "memory"
        if v is False or v is None:
            return "no"
        return v

    @field_validator("resolution", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if isinstance(v, str):  # "480x640" or "64", from the command line
            parts = v.lower().replace(" ", "").split("x")
            if not all(p.isdigit() for p in parts) or len(parts) not in (1, 2):
                raise ValueError(f"use a side in pixels (512) or HEIGHTxWIDTH (480x640), got {v!r}")
            v = [int(p) for p in parts]
        if isinstance(v, list | tuple) and len(v) == 1:
            v = v[0]
        return v

    @field_validator("resolution")
    @classmethod
    def _size_range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        sides = (v, v) if isinstance(v, int) else v
        if not all(MIN_RESOLUTION <= side <= MAX_RESOLUTION for side in sides):
            raise ValueError(f"image sides must be from {MIN_RESOLUTION} to {MAX_RESOLUTION} pixels")
        return v

    @field_validator("source_key", "target_key")
    @classmethod
    def _entry(cls, v: str | list[str]) -> str | list[str]:
        if not v or any(not k for k in ([v] if isinstance(v, str) else v)):
            raise ValueError("name a sample entry (source.jpg, or source_image for any image extension)")
        return v

    @property
    def size(self) -> tuple[int, int]:
        """``resolution`` as (height, width)."""
        r = self.resolution
        return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))

    @field_validator("lr_scheduler", mode="before")
    @classmethod
    def _schedule(cls, v: Any) -> Any:
        return "constant" if v is None else v

    @field_validator("lr_scheduler")
    @classmethod
    def _known_schedule(cls, v: str) -> str:
        from lbm_registry.train.schedule import SCHEDULES

        if v not in SCHEDULES:
            raise ValueError(f"unknown schedule {v!r}: use one of {', '.join(SCHEDULES)}")
        return v

    @field_validator("lr_scheduler_kwargs", mode="before")
    @classmethod
    def _no_kwargs(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("train_shards", "validation_shards", "trainable_lora_modules", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not v.startswith("cuda:"):
            raise ValueError("use auto, cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.lora is None) == (self.new_lora is None):
            raise ValueError("give exactly one of 'lora' (a LoRA REF to fine-tune) or 'new_lora' (rank/targets)")
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give max_steps or epochs (or both: training stops at the first reached)")
        if not self.trainable_lora_modules:
            raise ValueError("trainable_lora_modules is empty: nothing would train")
        p = self.timestep_probabilities
        if p is not None:
            if self.timesteps is not None and len(p) != len(self.timesteps):
                raise ValueError("timestep_probabilities needs one entry per timestep")
            if min(p) < 0 or abs(sum(p) - 1.0) > 1e-6:
                raise ValueError("timestep_probabilities must be >= 0 and sum to 1")
        if self.timesteps is not None and (not self.timesteps or min(self.timesteps) < 1):
            raise ValueError("timesteps must be a non-empty list of integers >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with the YAML key names (recorded as the training config in the lineage)."""
        return self.model_dump(mode="json", by_alias=True)


def _format_error(exc: ValidationError, source: str, overrides: Mapping[str, Any] | None = None) -> str:
    """One line naming where the bad value came from: the file, or an override (a CLI option
    or ``--set``), which the file must not be blamed for."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
    if first["type"] == "missing":
        msg = "required field is missing"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    given = {k.replace("-", "_"): v for k, v in (overrides or {}).items() if v is not None}
    for key, value in given.items():
        if loc == key or loc.startswith(key + "."):
            return f"invalid training option {key}={value!r} (given as an override, not in {source}): {msg}{more}"
    return f"invalid training config {source}: {loc}: {msg}{more}"


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-key ``overrides`` set (``None`` values are ignored).

    Setting ``lora`` drops a ``new_lora`` block from the file (and vice versa), so
    ``--lora REF`` on the command line wins over a config that starts a fresh LoRA.
    """
    import copy

    out = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        parts = key.replace("-", "_").split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
        if parts == ["lora"]:
            out.pop("new_lora", None)
        elif parts[0] == "new_lora":
            out.pop("lora", None)
    return out


def train_config_from_dict(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                           source: str = "<dict>") -> TrainConfig:
    """Validate a plain dict (plus overrides) into a :class:`TrainConfig` with a one-line error."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"invalid training config {source}: expected a mapping, got {type(data).__name__}")
    from lbm_registry.train.original import looks_original, translate_original_config

    notes: list[str] = []
    data = dict(data)
    if {"denoiser", "vae"} <= set(data) and not set(data) & own_keys():
        raise ConfigError(f"{source} is an LBM model config, not a training config: give a training config "
                          f"(like configs/lora-finetune.yaml), and this one as its model_config if needed")
    if looks_original(data, own_keys()):
        data, notes = translate_original_config(data, own_keys())
    merged = apply_overrides(data, overrides)
    try:
        cfg = TrainConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source, overrides)) from None
    cfg._notes = notes
    return cfg


def own_keys() -> set[str]:
    """Top-level keys of our training config (field names and YAML aliases)."""
    out: set[str] = set()
    for name, f in TrainConfig.model_fields.items():
        out.add(name)
        if f.alias:
            out.add(f.alias)
    return out


def load_train_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Load ``path`` (YAML, or a built-in name like ``lora-finetune``), apply ``overrides``, validate."""
    import yaml

    from lbm_registry.lbm.config import resolve_config_path

    try:
        p = resolve_config_path(path, kind="training")
    except ConfigError as exc:
        raise ConfigError(f"training {exc}") from None
    try:
        data = yaml.safe_load(p.read_text()) or {}   # an empty file: every setting from the overrides
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {p}: {str(exc).splitlines()[0]}") from None
    return train_config_from_dict(data, overrides, str(p))


def parse_set_option(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None
    return out
