"""Image-to-image pipeline: bucket, encode, bridge-sample, decode, resize back.

The three stages are plain functions so that ``lbm-reg infer`` (one image at a time) and
``lbm-reg serve`` (batches of images, each with its own seed) run exactly the same code:
:func:`prepare_image` (RGB, nearest aspect bucket, tensor), :func:`translate` (encode, sample,
decode a batch of same-bucket images) and :func:`finish_image` (back to a PIL image of the
input's size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lbm_registry.lbm.imaging import nearest_bucket, open_image, to_pil, to_tensor
from lbm_registry.lbm.sampler import VelocityFn, sample

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from lbm_registry.lbm.config import LBMConfig
    from lbm_registry.lbm.model import LBMModel


def prepare_image(image: Image.Image | str | Path | bytes, config: LBMConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """(1, 3, h, w) float32 CPU tensor in [-1, 1] at the nearest aspect bucket, and the input's (H, W)."""
    img = image if hasattr(image, "size") and hasattr(image, "mode") else open_image(image)
    if img.mode != "RGB":
        img = img.convert("RGB")
    h, w = nearest_bucket(img.height, img.width, config.inference.base_resolution, config.pixel_multiple)
    return to_tensor(img, (h, w)), (img.height, img.width)


@torch.no_grad()
def translate(model: LBMModel, x: torch.Tensor, *, steps: int | None = None,
              generators: Sequence[torch.Generator], sample_latent: bool = True, tiled_decode: bool = True,
              velocity: VelocityFn | None = None) -> torch.Tensor:
    """Images (B, 3, h, w) in [-1, 1] on the model's device/dtype -> translated images.

    As upstream LBM: the source is encoded with a seeded sample of the VAE posterior
    (``sample_latent=False``: its mean), bridge-sampled with the float32 schedule, and decoded in
    overlapping tiles when the latent has a side over 128 (``tiled_decode=False``: whole).
    ``generators`` holds one generator per sample (a request's seed), so a sample's noise (the
    posterior's, then the bridge's) is the same whether it runs alone or in a batch.
    ``velocity`` defaults to the model's.
    """
    cfg = model.config
    gens = list(generators)
    gen = gens if len(gens) > 1 else gens[0]
    z_src = model.vae.encode(x, sample=sample_latent, generator=gen)
    z = sample(velocity or model.velocity, z_src, steps=steps or cfg.inference.steps,
               bridge_noise_sigma=cfg.bridge.bridge_noise_sigma, generator=gen, shift=cfg.scheduler.shift)
    return model.vae.decode(z, tiled=tiled_decode)


def finish_image(out: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """One translated image (3, h, w) or (1, 3, h, w) -> PIL RGB at the input's (H, W)."""
    return to_pil(out, size)


def sampling_params(sample_latent: bool = True, tiled_decode: bool = True) -> dict[str, str]:
    """How the pixels were made, as recorded next to them (infer's MLflow run, the server's
    answers): ``latent`` is ``sample`` (upstream's) or ``mean``; ``decode`` ``tiled`` or ``whole``."""
    return {"latent": "sample" if sample_latent else "mean", "decode": "tiled" if tiled_decode else "whole"}


@dataclass
class LBMPipeline:
    """A ready model on a device. ``pipe(image)`` returns the translated PIL image.

    ``scale`` re-merges the LoRA(s) this pipeline was loaded with at another strength
    (see :class:`lbm_registry.lora.apply.MergedLoRAs`); it is ignored when there is none.
    ``sample_latent`` / ``tiled_decode`` are the defaults of every call (upstream's: True, True).
    """

    model: LBMModel
    device: torch.device
    dtype: torch.dtype
    loras: object | None = None  # MergedLoRAs, set by api.infer.load
    info: dict | None = None
    sample_latent: bool = True
    tiled_decode: bool = True

    @torch.no_grad()
    def __call__(self, image: Image.Image | str | Path | bytes, *, steps: int | None = None,
                 seed: int = 0, scale: float | None = None, sample_latent: bool | None = None,
                 tiled_decode: bool | None = None) -> Image.Image:
        """``steps`` 1-1000 (default: the config's), ``seed`` 0 to 2**63-1, ``scale`` 0-2: the
        ranges every surface checks (:mod:`lbm_registry.ranges`); outside them, RangeError.
        ``sample_latent``/``tiled_decode`` None: the pipeline's own (upstream's by default)."""
        from lbm_registry.ranges import check_scale, check_seed, check_steps

        steps = None if steps is None else check_steps(steps)
        seed = check_seed(seed)
        scale = None if scale is None else check_scale(scale)
        if scale is not None and self.loras is not None:
            self.loras.set_scale(scale)
        x, size = prepare_image(image, self.model.config)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = translate(self.model, x.to(self.device, self.dtype), steps=steps, generators=[gen],
                        sample_latent=self.sample_latent if sample_latent is None else sample_latent,
                        tiled_decode=self.tiled_decode if tiled_decode is None else tiled_decode)
        return finish_image(out, size)
