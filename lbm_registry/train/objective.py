"""The LBM bridge-matching objective (DESIGN.md), on the real VAE + denoiser path, as upstream
trains it.

For a pair (source, target) with VAE latents z_src, z_tgt and a timestep t drawn from the
configured timesteps (sigma = t / T)::

    x_t   = sigma z_src + (1 - sigma) z_tgt + bns sqrt(sigma (1 - sigma)) eps
    v     = z_src - z_tgt                       (the regression target)
    v_hat = model.velocity(x_t, sigma)

Since z_src = z_tgt + v, x_t = z_tgt + sigma v + noise, so the one-step estimate of the target
latent is ``z_tgt_hat = x_t - sigma * v_hat`` (exact up to the tiny bridge noise).

Upstream details kept here (gojasper/LBM ``LBMModel.forward`` / ``pixel_loss`` and its VAE):

- the latents are a *sample* of the VAE posterior (``latent_dist.sample()``), not its mean; here
  the sample's unit noise comes from the training sample's own seed, so a run stays
  reproducible and independent of the process layout (``latent_sample: mean`` keeps the mean);
- the pixel loss crops ``z_tgt_hat`` to a window of ``crop_size / f`` latents (f = the VAE's
  downsampling, 8) *before* decoding, decodes it, clamps the decoded image to [-1, 1], and
  compares it with the same window of the target image (``f`` times the latent offsets). A side
  no longer than the window is taken whole; otherwise the window starts at ``excess - k``, ``k``
  uniform in ``[0, excess)`` (upstream's rule: it never starts flush with the top/left edge).
  Upstream draws one window per batch; here each sample draws its own (same distribution), so
  the result does not depend on how samples are grouped into batches and processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lbm_registry.lbm.config import LBMConfig
from lbm_registry.lbm.model import LBMModel
from lbm_registry.lbm.sampler import bridge_interpolant
from lbm_registry.train.losses import LossFn


@dataclass
class Draws:
    """The random draws of a batch: bridge times ``sigma`` (N,), bridge noise ``eps`` (like the
    latents), unit noise of the posterior samples of source and target (None: the mean), and the
    pixel-loss windows as latent (row, col) offsets (None: no pixel loss)."""

    sigma: torch.Tensor
    eps: torch.Tensor
    posterior: tuple[torch.Tensor, torch.Tensor] | None = None
    crops: list[tuple[int, int]] | None = None


@dataclass
class BridgeObjective:
    timesteps: torch.Tensor          # (K,) float, in [1, T]
    probabilities: torch.Tensor      # (K,) sums to 1
    num_train_timesteps: int
    bridge_noise_sigma: float
    latent_loss: LossFn
    pixel_loss: LossFn | None = None
    pixel_weight: float = 0.0
    sample_posterior: bool = True    # latents: a seeded posterior sample (upstream) or the mean
    pixel_crop: int | None = None    # pixel-loss window side in latents (None: the whole image)
    vae_factor: int = 8              # pixels per latent

    @classmethod
    def create(cls, lbm: LBMConfig, latent_loss: LossFn, *, timesteps: list[int] | None = None,
               probabilities: list[float] | None = None, bridge_noise_sigma: float | None = None,
               pixel_loss: LossFn | None = None, pixel_weight: float = 1.0, latent_sample: str = "sample",
               pixel_crop_size: int | None = 512) -> BridgeObjective:
        """Defaults come from the LBM config's ``bridge`` section; overrides are validated here.

        ``latent_sample``: ``sample`` (upstream) or ``mean``. ``pixel_crop_size``: the pixel-loss
        window in pixels (upstream's ``pixel_loss_max_size``, 512), None for the whole image."""
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
        if latent_sample not in ("sample", "mean"):
            raise ConfigError(f"latent_sample must be sample or mean, got {latent_sample!r}")
        factor = lbm.vae.downsample_factor
        crop = None
        if pixel_loss is not None and pixel_crop_size is not None:
            if pixel_crop_size % factor:
                raise ConfigError(f"pixel_loss.crop_size {pixel_crop_size} must be a multiple of {factor} "
                                  "(the VAE's downsampling): the window is cut from the latent")
            crop = pixel_crop_size // factor
        bns = lbm.bridge.bridge_noise_sigma if bridge_noise_sigma is None else bridge_noise_sigma
        return cls(torch.tensor(ts, dtype=torch.float32), torch.tensor(probs, dtype=torch.float64),
                   T, float(bns), latent_loss, pixel_loss, pixel_weight if pixel_loss is not None else 0.0,
                   latent_sample == "sample", crop, factor)

    def sample_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.multinomial(self.probabilities, n, replacement=True, generator=generator)
        return self.timesteps[idx] / self.num_train_timesteps

    @torch.no_grad()
    def posterior(self, model: LBMModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of ``images`` as scaled ``(mean, std)``, without gradients (the VAE is
        frozen): a latent is ``mean + std * noise``. Keeping both, not a sample, lets a cache
        serve a fresh posterior sample at every step."""
        dist = model.vae.vae_model.encode(images).latent_dist
        sf = model.vae.scaling_factor
        return dist.mean * sf, dist.std * sf

    def encode(self, model: LBMModel, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents of ``images``: ``mean + std * noise`` (the mean when ``noise`` is None)."""
        mean, std = self.posterior(model, images)
        return latent_from(mean, std, noise)

    def crop_offset(self, latent_hw: tuple[int, int], generator: torch.Generator) -> tuple[int, int]:
        """Latent (row, col) where the pixel-loss window starts (upstream's rule, see the module doc)."""
        assert self.pixel_crop is not None
        out = []
        for n in latent_hw:
            excess = max(n - self.pixel_crop, 0)
            out.append(excess - int(torch.randint(0, excess, (1,), generator=generator)) if excess else 0)
        return out[0], out[1]

    def draw(self, sample_seed: int, shape: tuple[int, ...]) -> Draws:
        """The draws of one training sample from its own seed (see :func:`sample_seed`): whatever
        the batch size, process count or accumulation, a sample gets the same draws. ``shape`` is
        one latent's (C, h, w); ``sigma`` is a scalar here."""
        g = torch.Generator().manual_seed(sample_seed)
        return self._draws(g, shape, None)

    def draw_batch(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> Draws:
        """The draws of a batch of ``n`` from one generator (validation, and the demo's fine-tune)."""
        return self._draws(generator, shape, n)

    def _draws(self, g: torch.Generator, shape: tuple[int, ...], n: int | None) -> Draws:
        full = tuple(shape) if n is None else (n, *shape)
        sigma = self.sample_sigmas(1 if n is None else n, g)
        sigma = sigma[0] if n is None else sigma
        eps = torch.randn(full, generator=g, dtype=torch.float32)
        posterior = None
        if self.sample_posterior:
            posterior = (torch.randn(full, generator=g, dtype=torch.float32),
                         torch.randn(full, generator=g, dtype=torch.float32))
        crops = None
        if self.pixel_loss is not None and self.pixel_crop is not None:
            crops = [self.crop_offset((shape[-2], shape[-1]), g) for _ in range(1 if n is None else n)]
        return Draws(sigma, eps, posterior, crops)

    def pixel_window(self, z: torch.Tensor, images: torch.Tensor,
                     crops: list[tuple[int, int]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latent window, image window)`` per sample: the latents to decode and the pixels to
        compare them with (everything when there is no window)."""
        if crops is None or self.pixel_crop is None:
            return z, images
        c, f = self.pixel_crop, self.vae_factor
        zs, xs = [], []
        for i, (r, col) in enumerate(crops):
            zs.append(z[i, :, r:r + c, col:col + c])
            xs.append(images[i, :, r * f:(r + c) * f, col * f:(col + c) * f])
        return torch.stack(zs), torch.stack(xs)

    def loss_from_latents(self, model: LBMModel, z_src: torch.Tensor, z_tgt: torch.Tensor, sigma: torch.Tensor,
                          eps: torch.Tensor, target: torch.Tensor | None = None,
                          crops: list[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """Losses (batch means) for given latents, bridge times ``sigma`` (N,) and noise ``eps``;
        ``target`` images and ``crops`` (latent offsets of each sample's window) for a pixel loss."""
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
            z_window, pixels = self.pixel_window(x_t - s * v_hat, target, crops)
            decoded = model.vae.decode(z_window).clamp(-1, 1)  # upstream clamps before the pixel loss
            pixel = self.pixel_loss(decoded, pixels)
            out["pixel_loss"] = pixel.detach()
            loss = loss + self.pixel_weight * pixel
        out["loss"] = loss
        return out

    def __call__(self, model: LBMModel, source: torch.Tensor, target: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Losses for one batch (images in [-1, 1] on the model's device), every draw from
        ``generator``. ``loss`` is the total."""
        m_src, s_src = self.posterior(model, source)
        m_tgt, s_tgt = self.posterior(model, target)
        d = self.draw_batch(m_src.shape[0], tuple(m_src.shape[1:]), generator)
        noise = d.posterior or (None, None)
        z_src = latent_from(m_src, s_src, noise[0])
        z_tgt = latent_from(m_tgt, s_tgt, noise[1])
        return self.loss_from_latents(model, z_src, z_tgt, d.sigma, d.eps, target, d.crops)


def latent_from(mean: torch.Tensor, std: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    """A posterior sample ``mean + std * noise`` (the mean when there is no noise)."""
    if noise is None:
        return mean
    assert std is not None
    return mean + std * noise.to(device=mean.device, dtype=mean.dtype)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of ``epoch``: the same in every process layout."""
    import hashlib

    digest = hashlib.blake2b(f"lbm-train:{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
