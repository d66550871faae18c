"""The bridge-matching sampler and training interpolant (see DESIGN.md).

With n steps: sigmas = linspace(1, 1/n, n), then 0. Each step ``x += (s_next - s) * v`` with
``v = denoiser(x, t = s * T)``, and bridge noise ``bns * sqrt(s_next (1 - s_next)) * eps`` is
added between steps. One step is exactly ``z_src - v``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sigma_schedule(steps: int) -> list[float]:
    """[1, ..., 1/n, 0] (n + 1 values)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return [1.0 - i / steps for i in range(steps)] + [0.0]


@torch.no_grad()
def sample(velocity: VelocityFn, z_source: torch.Tensor, *, steps: int = 1,
           bridge_noise_sigma: float = 0.005,
           generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Integrate the bridge from the source latent (sigma=1) to the target (sigma=0).

    ``generator`` may be one generator per sample: each sample then draws its bridge noise
    from its own, so a batch gives every sample the noise it would get alone.
    """
    x = z_source
    sigmas = sigma_schedule(steps)
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        v = velocity(x, sigma)
        x = x + (s_next - s) * v
        if i < steps - 1 and bridge_noise_sigma > 0:
            eps = _noise(x, generator)
            x = x + bridge_noise_sigma * (s_next * (1.0 - s_next)) ** 0.5 * eps
    return x


def _noise(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
                      for g in generator])


def bridge_interpolant(z_source: torch.Tensor, z_target: torch.Tensor, sigma: torch.Tensor,
                       bridge_noise_sigma: float, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pair: ``x_t = s z_src + (1-s) z_tgt + bns sqrt(s(1-s)) eps`` and target ``v = z_src - z_tgt``."""
    s = sigma.view(-1, *([1] * (z_source.ndim - 1))).to(z_source.dtype)
    if noise is None:
        noise = torch.randn_like(z_source)
    x_t = s * z_source + (1 - s) * z_target + bridge_noise_sigma * torch.sqrt(s * (1 - s)) * noise
    return x_t, z_source - z_target
