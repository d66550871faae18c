"""The bridge-matching sampler and training interpolant (see DESIGN.md).

With n steps: sigmas = linspace(1, 1/n, n), then 0. Each step ``x += (s_next - s) * v`` with
``v = denoiser(x, t = s * T)``, and bridge noise ``bns * sqrt(s_next (1 - s_next)) * eps`` is
added between steps. One step is exactly ``z_src - v``.

The schedule is upstream LBM's arithmetic, whatever dtype the network runs in: diffusers'
``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=np.linspace(1, 1/n, n))`` gives float32
sigmas and timesteps (``t = sigma * T``, so 750 stays 750 under bf16, where it would round to
752), its ``step`` upcasts the latent to float32 for the Euler update and stores the result in
the network's dtype, and the bridge noise is scaled and added in float32. Only the network runs
in the serving dtype (:func:`schedule`, :func:`sample`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def schedule(steps: int, *, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """The n + 1 float32 sigmas ``[1, ..., 1/n, 0]``, computed as upstream computes them.

    numpy's ``linspace`` in float64, rounded to float32, then the scheduler's shift
    ``shift * s / (1 + (shift - 1) * s)`` in float32 (the identity for LBM's shift 1).
    """
    import numpy as np

    if steps < 1:
        raise ValueError("steps must be >= 1")
    s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    s = shift * s / (1 + (shift - 1) * s)
    sig = torch.from_numpy(np.asarray(s, dtype=np.float32)).to(torch.float32)
    return torch.cat([sig, torch.zeros(1)]).to(device)


def sigma_schedule(steps: int) -> list[float]:
    """[1, ..., 1/n, 0] (n + 1 values) as Python floats (the float32 values of :func:`schedule`)."""
    return [float(s) for s in schedule(steps)]


@torch.no_grad()
def sample(velocity: VelocityFn, z_source: torch.Tensor, *, steps: int = 1,
           bridge_noise_sigma: float = 0.005,
           generator: torch.Generator | Sequence[torch.Generator] | None = None,
           shift: float = 1.0) -> torch.Tensor:
    """Integrate the bridge from the source latent (sigma=1) to the target (sigma=0).

    ``velocity(x, sigma)`` gets the latent in the network's dtype and float32 sigmas (one per
    sample). The returned latent is in ``z_source``'s dtype. ``generator`` may be one generator
    per sample: each sample then draws its bridge noise from its own, so a batch gives every
    sample the noise it would get alone.
    """
    dtype = z_source.dtype
    b = z_source.shape[0]
    sigmas = schedule(steps, shift=shift, device=z_source.device)
    x = z_source
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, s.expand(b))
        # The Euler update of FlowMatchEulerDiscreteScheduler.step: the latent upcast to float32;
        # (s_next - s) is a 0-dim float32 tensor, so the product keeps v's dtype (0-dim tensors
        # do not promote); the float32 sum is stored in the network's dtype.
        x = (x.to(torch.float32) + (s_next - s) * v).to(v.dtype)
        if i < steps - 1 and bridge_noise_sigma > 0:
            # s_next as a (b, 1, 1, 1) float32 tensor, as upstream looks it up: the noise term,
            # and the sum, are float32; the result is stored in the latent's dtype.
            sig = s_next.expand(b).reshape(b, *([1] * (x.ndim - 1)))
            x = (x + bridge_noise_sigma * (sig * (1.0 - sig)) ** 0.5 * _noise(x, generator)).to(dtype)
    return x.to(dtype)


def _noise(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` in ``x``'s dtype, drawn in float32 and rounded (so
    a bf16 run and an fp32 run with the same seed add the same noise)."""
    return standard_normal(x.shape, generator, x.device).to(x.dtype)


def standard_normal(shape: torch.Size | tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator] | None,
                    device: torch.device | str) -> torch.Tensor:
    """float32 N(0, 1) of ``shape``; with a list of generators, sample ``k`` draws from the k-th."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=torch.float32)
                      for g in generator])


def bridge_interpolant(z_source: torch.Tensor, z_target: torch.Tensor, sigma: torch.Tensor,
                       bridge_noise_sigma: float, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pair: ``x_t = s z_src + (1-s) z_tgt + bns sqrt(s(1-s)) eps`` and target ``v = z_src - z_tgt``."""
    s = sigma.view(-1, *([1] * (z_source.ndim - 1))).to(z_source.dtype)
    if noise is None:
        noise = torch.randn_like(z_source)
    x_t = s * z_source + (1 - s) * z_target + bridge_noise_sigma * torch.sqrt(s * (1 - s)) * noise
    return x_t, z_source - z_target
