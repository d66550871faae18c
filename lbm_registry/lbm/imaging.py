"""Image IO and LBM's aspect buckets.

Upstream LBM resizes inputs to the nearest of 11 ~1 MP aspect buckets; it forgets to resize
the output back, we don't. Any PIL-readable bytes are accepted whatever the extension says.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from lbm_registry.errors import DataError, ImageTooLargeError

if TYPE_CHECKING:
    import torch
    from PIL import Image

# (height, width) at base resolution 1024.
BUCKETS_1024: tuple[tuple[int, int], ...] = (
    (512, 2048), (1024, 1024), (2048, 512), (896, 1152), (1152, 896),
    (512, 1920), (1920, 512), (640, 1536), (1536, 640), (768, 1280), (1280, 768),
)


def buckets(base_resolution: int = 1024, multiple: int = 32) -> list[tuple[int, int]]:
    """The 11 buckets scaled to ``base_resolution``, sides rounded to ``multiple``."""
    scale = base_resolution / 1024
    out = []
    for h, w in BUCKETS_1024:
        out.append((max(multiple, round(h * scale / multiple) * multiple),
                    max(multiple, round(w * scale / multiple) * multiple)))
    return out


def nearest_bucket(height: int, width: int, base_resolution: int = 1024, multiple: int = 32) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (ties: the first listed)."""
    ratio = width / height
    return min(buckets(base_resolution, multiple), key=lambda hw: abs(hw[1] / hw[0] - ratio))


def _image_reason(exc: BaseException) -> str:
    """Why PIL refused a file, in words (PIL's own message names a file object, not a path)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL can read"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable image (header check only, no decoding), or None.

    Cheap enough to run over a whole folder before any model loads."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return _image_reason(exc)
    return None


def open_image(source: str | Path | bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Open any PIL-readable image (content sniffed, not the extension), honour EXIF
    orientation, convert RGBA/grayscale/palette to RGB (alpha composited on white).

    ``max_pixels``: refuse (:class:`ImageTooLargeError`) images with more pixels, checked from
    the header before any pixel is decoded (a server must not decode a 30000 x 30000 PNG).
    Other refusals are a :class:`DataError` whose ``reason`` attribute says why without the path.
    """
    from PIL import Image, ImageOps

    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        fh = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
        with fh:
            img = Image.open(fh)
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLargeError(f"image {name} is {img.width}x{img.height} = {img.width * img.height} "
                                         f"pixels, over the limit of {max_pixels}")
            img.load()
    except Image.DecompressionBombError as exc:
        err = ImageTooLargeError(f"image {name} is too large: {exc}")
        err.reason = f"too large: {exc}"  # type: ignore[attr-defined]
        raise err from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = _image_reason(exc)
        err = DataError(f"image not found: {name}" if isinstance(exc, FileNotFoundError)
                        else f"unreadable image {name}: {reason}")
        err.reason = reason  # type: ignore[attr-defined]
        raise err from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.split()[-1])
        return bg
    return img.convert("RGB")


def to_tensor(img: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float in [-1, 1], resized (bicubic) to ``size`` = (h, w)."""
    import numpy as np
    import torch
    from PIL import Image

    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_pil(tensor: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """(1|3, H, W) or (1, 3, H, W) in [-1, 1] -> PIL RGB, resized back to ``size`` = (h, w).

    8 bits as upstream LBM makes them: clamp, ``(x + 1) / 2``, then torchvision's
    ``mul(255).byte()``, which truncates (rounding would be up to one level brighter)."""
    import numpy as np
    import torch
    from PIL import Image

    t = tensor.detach().float().cpu()
    if t.ndim == 4:
        t = t[0]
    arr = ((t.clamp(-1, 1) + 1) / 2).mul(255).to(torch.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr.permute(1, 2, 0).numpy()))
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    return img
