"""Pydantic configs for an LBM model (denoiser, VAE, scheduler, bridge settings).

Configs are YAML files (see ``configs/``). Unknown keys are errors, so a typo never
silently builds a different architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from lbm_registry.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DenoiserConfig(_Strict):
    """Arguments of diffusers' ``UNet2DConditionModel`` that LBM sets."""

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    attention_head_dim: tuple[int, ...] = (5, 10, 20)
    cross_attention_dim: tuple[int, ...] = (320, 640, 1280)
    use_linear_projection: bool = True
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    sample_size: int | None = None

    @model_validator(mode="after")
    def _check(self) -> DenoiserConfig:
        n = len(self.block_out_channels)
        for field in ("down_block_types", "up_block_types", "transformer_layers_per_block",
                      "attention_head_dim", "cross_attention_dim"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{field} needs {n} entries (one per block), got {len(getattr(self, field))}")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(f"block width {ch} is not divisible by norm_num_groups={self.norm_num_groups}")
        return self

    def diffusers_kwargs(self) -> dict[str, Any]:
        kw = self.model_dump(exclude_none=True)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class VAEConfig(_Strict):
    """Arguments of diffusers' ``AutoencoderKL`` (SDXL VAE by default)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 0.13025

    def diffusers_kwargs(self) -> dict[str, Any]:
        kw = self.model_dump()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class SchedulerConfig(_Strict):
    """``FlowMatchEulerDiscreteScheduler`` settings."""

    num_train_timesteps: int = 1000
    shift: float = 1.0


class BridgeConfig(_Strict):
    """Bridge-matching settings: training timesteps, bridge noise, sample keys."""

    timesteps: tuple[int, ...] = (250, 500, 750, 1000)
    timestep_probabilities: tuple[float, ...] | None = None
    bridge_noise_sigma: float = Field(0.005, ge=0.0)
    source_key: str = "source_image"
    target_key: str = "target_image"
    conditioning_images_keys: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> BridgeConfig:
        p = self.timestep_probabilities
        if p is not None:
            if len(p) != len(self.timesteps):
                raise ValueError("timestep_probabilities needs one entry per timestep")
            if abs(sum(p) - 1.0) > 1e-6 or min(p) < 0:
                raise ValueError("timestep_probabilities must be >= 0 and sum to 1")
        return self


class InferenceConfig(_Strict):
    """Image handling at inference: the aspect buckets are scaled to ``base_resolution``."""

    base_resolution: int = 1024
    steps: int = Field(1, ge=1)


class LBMConfig(_Strict):
    """A whole LBM model. ``name`` is informational. ``notes``: what translating a config written
    for upstream LBM did (see :mod:`lbm_registry.lbm.upstream_config`), empty for ours."""

    name: str = "lbm"
    denoiser: DenoiserConfig = DenoiserConfig()
    vae: VAEConfig = VAEConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    bridge: BridgeConfig = BridgeConfig()
    inference: InferenceConfig = InferenceConfig()
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @model_validator(mode="after")
    def _check(self) -> LBMConfig:
        latent = self.vae.latent_channels
        want_in = latent * (1 + len(self.bridge.conditioning_images_keys))
        if self.denoiser.in_channels != want_in:
            raise ValueError(
                f"denoiser.in_channels={self.denoiser.in_channels} but the latent ({latent}) plus "
                f"{len(self.bridge.conditioning_images_keys)} concatenated condition(s) need {want_in}"
            )
        if self.denoiser.out_channels != latent:
            raise ValueError(f"denoiser.out_channels must equal vae.latent_channels ({latent})")
        return self

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (VAE and UNet downsampling)."""
        return self.vae.downsample_factor * self.denoiser.downsample_factor

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_validation_error(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"invalid config {source}: {loc}: {msg}{more}"


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> LBMConfig:
    """Validate a plain dict (e.g. a config stored in the catalog) into an :class:`LBMConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping, got {type(data).__name__}")
    try:
        return LBMConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def builtin_config_dir() -> Path:
    """The built-in configs, shipped inside the package (``lbm_registry/configs``; the
    repository's ``configs/`` is a link to it), so a plain ``pip install`` finds them too."""
    return Path(__file__).resolve().parents[1] / "configs"


def builtin_configs(kind: str = "model") -> list[str]:
    """Names of the built-in configs of ``kind``: ``model`` (an LBM architecture: a top-level
    ``denoiser``) or ``training`` (the rest, e.g. ``lora-finetune``)."""
    out = []
    for c in sorted(builtin_config_dir().glob("*.yaml")):
        is_model = any(line.startswith("denoiser:") for line in c.read_text().splitlines())
        if is_model == (kind == "model"):
            out.append(c.stem)
    return out


def resolve_config_path(path: str | Path, kind: str = "model") -> Path:
    """Accept a path, or the name of a built-in config (``lbm-tiny``); a name not found gets
    suggestions among the built-ins of ``kind`` (see :func:`builtin_configs`). A path that is
    not a regular file (``/dev/null``, a FIFO, a folder) is refused as such, not reported missing."""
    p = Path(path)
    if p.is_file():
        return p
    if p.exists():
        what = "a folder" if p.is_dir() else "not a regular file (a device or a pipe)"
        raise ConfigError(f"config {path} is {what}: give a YAML file")
    for cand in (builtin_config_dir() / p.name, builtin_config_dir() / f"{p.name}.yaml"):
        if cand.is_file():  # any built-in by its exact name: the caller says if it is the wrong kind
            return cand
    builtins = builtin_configs(kind)   # suggestions: only configs of the kind asked for
    import difflib

    close = difflib.get_close_matches(p.stem, builtins, n=3, cutoff=0.6)
    hint = (f"; did you mean {', '.join(close)}?" if close else
            f" (built-in: {', '.join(builtins)})" if builtins and not p.parent.parts else "")
    raise ConfigError(f"config not found: {path}{hint}")


def upstream_config(data: dict[str, Any], source: str, name: str | None = None) -> LBMConfig:
    """Our config for upstream LBM's model config ``data``, its translation notes attached."""
    from lbm_registry.lbm.upstream_config import translate_upstream

    translated, notes = translate_upstream(data, source, name=name)
    cfg = config_from_dict(translated, f"{source} (translated from upstream LBM)")
    cfg._notes = notes
    return cfg


def load_config(path: str | Path) -> LBMConfig:
    """Load and validate an LBM YAML config; errors name the file and the first bad field.

    Upstream LBM's flat model config (``backbone_signature``, ``unet_input_channels``, ...) is
    accepted too, translated (the notes say how, see :attr:`LBMConfig.notes`)."""
    import yaml

    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {p}: {str(exc).splitlines()[0]}") from None
    if data is None:
        raise ConfigError(f"config {p} is empty")
    from lbm_registry.lbm.upstream_config import looks_upstream

    if looks_upstream(data):
        return upstream_config(data, str(p))
    return config_from_dict(data, str(p))
