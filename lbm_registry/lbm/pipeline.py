"""Image-to-image pipeline: bucket, encode, bridge-sample, decode, resize back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lbm_registry.lbm.imaging import nearest_bucket, open_image, to_pil, to_tensor
from lbm_registry.lbm.sampler import sample

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from lbm_registry.lbm.model import LBMModel


@dataclass
class LBMPipeline:
    """A ready model on a device. ``pipe(image)`` returns the translated PIL image.

    ``scale`` re-merges the LoRA(s) this pipeline was loaded with at another strength
    (see :class:`lbm_registry.lora.apply.MergedLoRAs`); it is ignored when there is none.
    """

    model: LBMModel
    device: torch.device
    dtype: torch.dtype
    loras: object | None = None  # MergedLoRAs, set by api.infer.load
    info: dict | None = None

    @torch.no_grad()
    def __call__(self, image: Image.Image | str | Path | bytes, *, steps: int | None = None,
                 seed: int = 0, scale: float | None = None, sample_latent: bool = False) -> Image.Image:
        if scale is not None and self.loras is not None:
            self.loras.set_scale(scale)
        img = image if hasattr(image, "size") and hasattr(image, "mode") else open_image(image)
        if img.mode != "RGB":
            img = img.convert("RGB")
        cfg = self.model.config
        h, w = nearest_bucket(img.height, img.width, cfg.inference.base_resolution, cfg.pixel_multiple)
        x = to_tensor(img, (h, w)).to(self.device, self.dtype)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        z_src = self.model.vae.encode(x, sample=sample_latent, generator=gen)
        z = sample(self.model.velocity, z_src, steps=steps or cfg.inference.steps,
                   bridge_noise_sigma=cfg.bridge.bridge_noise_sigma, generator=gen)
        out = self.model.vae.decode(z)
        return to_pil(out, (img.height, img.width))
