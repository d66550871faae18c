"""The LBM bridge-matching objective (DESIGN.md), on the real VAE + denoiser path.

For a pair (source, target) with VAE latent means z_src, z_tgt and a timestep t drawn from the
configured timesteps (sigma = t / T)::

    x_t   = sigma z_src + (1 - sigma) z_tgt + bns sqrt(sigma (1 - sigma)) eps
    v     = z_src - z_tgt                       (the regression target)
    v_hat = model.velocity(x_t, sigma)

Since z_src = z_tgt + v, x_t = z_tgt + sigma v + noise, so the one-step estimate of the target
latent is ``z_tgt_hat = x_t - sigma * v_hat`` (exact up to the tiny bridge noise). The optional
pixel loss compares ``decode(z_tgt_hat)`` with the target image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lbm_registry.lbm.config import LBMConfig
from lbm_registry.lbm.model import LBMModel
from lbm_registry.lbm.sampler import bridge_interpolant
from lbm_registry.train.losses import LossFn


@dataclass
class BridgeObjective:
    timesteps: torch.Tensor          # (K,) float, in [1, T]
    probabilities: torch.Tensor      # (K,) sums to 1
    num_train_timesteps: int
    bridge_noise_sigma: float
    latent_loss: LossFn
    pixel_loss: LossFn | None = None
    pixel_weight: float = 0.0

    @classmethod
    def create(cls, lbm: LBMConfig, latent_loss: LossFn, *, timesteps: list[int] | None = None,
               probabilities: list[float] | None = None, bridge_noise_sigma: float | None = None,
               pixel_loss: LossFn | None = None, pixel_weight: float = 1.0) -> BridgeObjective:
        """Defaults come from the LBM config's ``bridge`` section; overrides are validated here."""
        from lbm_registry.errors import ConfigError

        T = lbm.scheduler.num_train_timesteps
        ts = list(timesteps if timesteps is not None else lbm.bridge.timesteps)
        if probabilities is None and timesteps is None:
            probabilities = lbm.bridge.timestep_probabilities
        if any(t < 1 or t > T for t in ts):
            raise ConfigError(f"timesteps must lie in [1, {T}] (num_train_timesteps), got {ts}")
        probs = list(probabilities) if probabilities is not None else [1.0 / len(ts)] * len(ts)
        if len(probs) != len(ts):
            raise ConfigError(f"timestep_probabilities has {len(probs)} entries for {len(ts)} timesteps")
        bns = lbm.bridge.bridge_noise_sigma if bridge_noise_sigma is None else bridge_noise_sigma
        return cls(torch.tensor(ts, dtype=torch.float32), torch.tensor(probs, dtype=torch.float64),
                   T, float(bns), latent_loss, pixel_loss, pixel_weight if pixel_loss is not None else 0.0)

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.multinomial(self.probabilities, n, replacement=True, generator=generator)
        return self.timesteps[idx] / self.num_train_timesteps

    @torch.no_grad()
    def encode(self, model: LBMModel, images: torch.Tensor) -> torch.Tensor:
        """VAE latent mean (scaled), without gradients: the VAE is frozen."""
        return model.vae.encode(images)

    def draw(self, sample_seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigma, eps)`` of one training sample from its own seed (see :func:`sample_seed`):
        whatever the batch size, process count or accumulation, a sample gets the same draws."""
        g = torch.Generator().manual_seed(sample_seed)
        sigma = self.sample_sigmas(1, g)[0]
        eps = torch.randn(shape, generator=g, dtype=torch.float32)
        return sigma, eps

    def loss_from_latents(self, model: LBMModel, z_src: torch.Tensor, z_tgt: torch.Tensor, sigma: torch.Tensor,
                          eps: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Losses (batch means) for given latents, bridge times ``sigma`` (N,) and noise ``eps``."""
        sigma = sigma.to(z_src.device)
        eps = eps.to(device=z_src.device, dtype=z_src.dtype)
        x_t, v = bridge_interpolant(z_src, z_tgt, sigma, self.bridge_noise_sigma, noise=eps)
        v_hat = model.velocity(x_t, sigma.to(x_t.dtype))
        latent = self.latent_loss(v_hat, v)
        out = {"latent_loss": latent.detach()}
        loss = latent
        if self.pixel_loss is not None:
            if target is None:
                raise ValueError("the pixel loss needs the target images")
            s = sigma.view(-1, 1, 1, 1).to(v_hat.dtype)
            z_tgt_hat = x_t - s * v_hat
            pixel = self.pixel_loss(model.vae.decode(z_tgt_hat), target)
            out["pixel_loss"] = pixel.detach()
            loss = loss + self.pixel_weight * pixel
        out["loss"] = loss
        return out

    def __call__(self, model: LBMModel, source: torch.Tensor, target: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Losses for one batch (images in [-1, 1] on the model's device). ``loss`` is the total."""
        z_src = self.encode(model, source)
        z_tgt = self.encode(model, target)
        n = z_src.shape[0]
        sigma = self.sample_sigmas(n, generator)
        eps = torch.randn(z_src.shape, generator=generator, dtype=torch.float32)
        return self.loss_from_latents(model, z_src, z_tgt, sigma, eps, target)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of ``epoch``: the same in every process layout."""
    import hashlib

    digest = hashlib.blake2b(f"lbm-train:{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
