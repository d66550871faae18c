"""Build the LBM model (denoiser, VAE, scheduler) from a config, with no network access.

The module tree reproduces upstream LBM's state-dict layout exactly: ``denoiser.*`` is a
diffusers ``UNet2DConditionModel``, ``vae.vae_model.*`` a diffusers ``AutoencoderKL``, and
``num_iterations`` a scalar buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from lbm_registry.lbm.config import LBMConfig

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

DENOISER_PREFIX = "denoiser."
VAE_PREFIX = "vae.vae_model."


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def build_denoiser(config: LBMConfig) -> UNet2DConditionModel:
    """The denoiser UNet, randomly initialised by diffusers (seed with ``torch.manual_seed``)."""
    from diffusers import UNet2DConditionModel

    with _quiet_diffusers():
        return UNet2DConditionModel(**config.denoiser.diffusers_kwargs())


def build_vae(config: LBMConfig) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    with _quiet_diffusers():
        return AutoencoderKL(**config.vae.diffusers_kwargs())


def build_scheduler(config: LBMConfig) -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    with _quiet_diffusers():
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.scheduler.num_train_timesteps, shift=config.scheduler.shift
        )


class VAEWrapper(nn.Module):
    """Holds the ``AutoencoderKL`` under ``vae_model`` like upstream, and does the scaling.

    ``encode``/``decode`` are the one place latents are made and turned back into pixels
    (inference, serving, probes, training previews): upstream's behaviour is ``sample=True`` and
    ``tiled=True``; the mean and the whole-image decode stay options."""

    def __init__(self, vae: AutoencoderKL, scaling_factor: float, downsample: int = 8, out_channels: int = 3) -> None:
        super().__init__()
        self.vae_model = vae
        self.scaling_factor = scaling_factor
        self.downsample = downsample
        self.out_channels = out_channels

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents: the posterior's mean, or with ``sample`` a draw
        ``mean + std * eps`` (diffusers' formula; ``eps`` drawn in float32 from ``generator``, one
        per sample if a list, and rounded to the VAE's dtype, so bf16 and fp32 runs of the same
        seed draw the same sample)."""
        dist = self.vae_model.encode(images).latent_dist
        if sample:
            from lbm_registry.lbm.sampler import standard_normal

            eps = standard_normal(dist.mean.shape, generator, dist.mean.device).to(dist.mean.dtype)
            z = dist.mean + dist.std * eps
        else:
            z = dist.mean
        return z * self.scaling_factor

    def decode(self, latents: torch.Tensor, tiled: bool = True) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (unclamped). ``tiled``: a latent with a side over
        128 is decoded in upstream's overlapping, Gaussian-blended tiles (float32 out, see
        :mod:`lbm_registry.lbm.tiling`); otherwise, and for smaller latents, in one piece."""
        from lbm_registry.lbm.tiling import needs_tiling, tiled_decode

        z = latents / self.scaling_factor
        if tiled and needs_tiling(*z.shape[-2:]):
            return tiled_decode(lambda t: self.vae_model.decode(t).sample, z, scale=self.downsample,
                                out_channels=self.out_channels)
        return self.vae_model.decode(z).sample


class LBMModel(nn.Module):
    """Denoiser + VAE + scheduler. ``velocity`` is the only network call of the bridge."""

    def __init__(self, config: LBMConfig, denoiser: nn.Module, vae: AutoencoderKL) -> None:
        super().__init__()
        self.config = config
        self.denoiser = denoiser
        self.vae = VAEWrapper(vae, config.vae.scaling_factor, config.vae.downsample_factor,
                              config.vae.out_channels)
        self.register_buffer("num_iterations", torch.zeros((), dtype=torch.int64))
        self.scheduler = build_scheduler(config)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Bridge time ``sigma`` in [0, 1] -> the denoiser's timestep ``sigma * T``, in float32
        whatever the network's dtype (bf16 would turn 750 into 752), as upstream passes it."""
        return sigma.to(torch.float32) * self.config.scheduler.num_train_timesteps

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor,
                 conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """v = denoiser(x, t). No encoder_hidden_states: attn2 acts as a second self-attention.

        The timestep stays float32 (diffusers builds its sinusoidal embedding from it, then casts
        the embedding to the network's dtype)."""
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        inp = x if conditioning is None else torch.cat([x, conditioning], dim=1)
        return self.denoiser(inp, self.timestep(sigma), encoder_hidden_states=None).sample


def build_model(config: LBMConfig, *, device: str | torch.device = "cpu", meta: bool = False,
                seed: int | None = None) -> LBMModel:
    """Build an LBM model from config.

    ``meta=True`` builds on the meta device: no memory is allocated, so the full
    2.4 B-parameter model can be inspected anywhere. ``seed`` makes the random init reproducible.
    """
    if meta:
        with torch.device("meta"):
            return LBMModel(config, build_denoiser(config), build_vae(config))
    gen_state = None
    if seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        model = LBMModel(config, build_denoiser(config), build_vae(config))
    finally:
        if gen_state is not None:
            torch.random.set_rng_state(gen_state)
    return model.to(device)


def weight_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The LoRA-able layers: every Linear/Conv2d whose ``.weight`` has ndim >= 2, by module name."""
    return {
        name: m for name, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.ndim >= 2
    }


def expected_shapes(config: LBMConfig) -> dict[str, tuple[int, ...]]:
    """Full state-dict key -> shape of the model this config builds (computed on meta)."""
    model = build_model(config, meta=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def denoiser_weight_layer_shapes(config: LBMConfig) -> dict[str, tuple[int, ...]]:
    """Denoiser module name (no prefix) -> weight shape, for every LoRA-able layer."""
    model = build_model(config, meta=True)
    return {name: tuple(m.weight.shape) for name, m in weight_layers(model.denoiser).items()}


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu. Unknown names and a CUDA request without a
    GPU are one-line :class:`ConfigError`\ s (see :mod:`lbm_registry.lbm.device`)."""
    from lbm_registry.lbm.device import check_device

    device = check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on GPU, fp32 on CPU."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        from lbm_registry.errors import ConfigError

        raise ConfigError(f"unknown dtype {dtype!r}: use auto, fp32, bf16 or fp16")
    return table[dtype]
