"""The VAE decode in overlapping tiles, as upstream LBM decodes every latent larger than a tile.

Upstream's VAE wrapper (``AutoencoderKLDiffusers.decode``, configured with ``tiling_size=(128,
128)`` and its default ``tiling_overlap=(16, 16)``) decodes a latent whole only when neither side
exceeds 128; at ~1 MP that is the 1024x1024 bucket alone, the other 10 buckets are tiled. Its
tiling is its own, not diffusers' ``tiled_decode``:

- tiles start every ``tile - overlap`` latent rows (columns), from 0 while the start is inside
  the latent, and are cut at its edge; a side no longer than ``tile`` has one tile and no overlap;
- every tile is zero-padded at the bottom/right to ``tile x tile``, decoded alone (batch 1) and
  cropped back to its own size times the VAE's scale (the padding still reaches the kept pixels
  through the decoder's receptive field, which is why we pad too);
- the decoded tiles are merged by a weighted average with a separable Gaussian window per tile
  (variance 0.01 of the tile size squared; column centre ``(w - 1) / 2``, row centre ``h / 2``,
  upstream's own asymmetry), weights in float64, sums in float32, output float32.

Everything here reproduces that arithmetic; :func:`tile_starts` and :func:`gaussian_weights`
are the layout and the window, :func:`tiled_decode` the whole procedure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TILE = 128      # latent pixels (1024 image pixels with the SDXL VAE)
OVERLAP = 16    # latent pixels (128 image pixels)
VARIANCE = 0.01


def needs_tiling(height: int, width: int, tile: int = TILE) -> bool:
    """Upstream tiles a latent when either side exceeds the tile."""
    return height > tile or width > tile


def tile_starts(size: int, tile: int = TILE, overlap: int = OVERLAP) -> list[int]:
    """Start offsets of the tiles along one latent side of ``size``."""
    step = tile - (overlap if size > tile else 0)
    return list(range(0, size, step))


def gaussian_weights(height: int, width: int) -> torch.Tensor:
    """The (height, width) float64 blending window of one decoded tile."""
    import math

    import numpy as np

    def profile(n: int, centre: float) -> np.ndarray:
        d = np.arange(n, dtype=np.float64) - centre
        return np.exp(-(d * d) / (n * n) / (2 * VARIANCE)) / math.sqrt(2 * math.pi * VARIANCE)

    return torch.from_numpy(np.outer(profile(height, height / 2), profile(width, (width - 1) / 2)))


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *, scale: int,
                 out_channels: int = 3, tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
    """Decode ``z`` (B, C, H, W, already unscaled for the VAE) tile by tile.

    ``decode`` maps a (1, C, tile, tile) latent to its (1, out_channels, tile*scale, tile*scale)
    image. Returns float32 (B, out_channels, H*scale, W*scale) on ``z``'s device."""
    import torch.nn.functional as F

    b, _, h, w = z.shape
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    windows: dict[tuple[int, int], torch.Tensor] = {}
    images = []
    for k in range(b):
        out = torch.zeros((1, out_channels, h * scale, w * scale), dtype=torch.float32, device=z.device)
        total = torch.zeros_like(out)
        for i in rows:
            for j in cols:
                part = z[k:k + 1, :, i:i + tile, j:j + tile]
                th, tw = part.shape[-2:]
                image = decode(F.pad(part, (0, tile - tw, 0, tile - th)))[:, :, :th * scale, :tw * scale]
                key = (th * scale, tw * scale)
                if key not in windows:
                    windows[key] = gaussian_weights(*key).to(z.device)
                window = windows[key]
                y, x = i * scale, j * scale
                out[:, :, y:y + key[0], x:x + key[1]] += image * window
                total[:, :, y:y + key[0], x:x + key[1]] += window
        images.append(out / total)
    return torch.cat(images)
