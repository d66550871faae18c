"""Training image sizes: one fixed (H, W), or aspect buckets.

Why buckets: the relighting data is mostly not square (the original scripts train at 480x640), and
centre-cropping everything to one shape throws away the edges of every portrait or panorama. With
``aspect_buckets`` each sample is resized (cover + centre crop) to the bucket whose aspect ratio is
nearest to its source image's, the buckets having about the pixel count of ``resolution``; every
optimizer step takes its samples from one bucket, so a batch stacks. The default buckets are
upstream LBM's 11 inference buckets scaled to that pixel count (so training sees the shapes
inference uses); a config may list its own.

Grouping is a pure function of the epoch's sample order and the *global* batch (processes x batch
x accumulation), so the steps, and the trained LoRA, are the same in every process layout with
the same product, cached latents or not, and across ``--resume``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

Size = tuple[int, int]  # (height, width)
T = TypeVar("T")


def default_buckets(size: Size, multiple: int) -> list[Size]:
    """Upstream's 11 aspect buckets scaled to the pixel count of ``size``, sides rounded to
    ``multiple`` (duplicates, which small sizes produce, dropped; order kept)."""
    from lbm_registry.lbm.imaging import buckets

    out: list[Size] = []
    for b in buckets(round(math.sqrt(size[0] * size[1])), multiple):
        if b not in out:
            out.append(b)
    return out


def nearest_bucket(image_hw: Size, choices: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (ties: the first listed), as the
    inference side picks them."""
    ratio = image_hw[1] / image_hw[0]
    return min(choices, key=lambda hw: abs(hw[1] / hw[0] - ratio))


def image_size(data: bytes) -> Size | None:
    """(height, width) of encoded image bytes as :func:`lbm_registry.lbm.imaging.open_image` will
    see them (EXIF rotations applied), from the header alone; None when unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception:  # any unreadable header: the decode reports it, with the sample's name
        return None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def group_by_bucket(samples: Sequence[T], bucket_of: Callable[[T], Size], group: int) -> tuple[list[T], list[int]]:
    """Reorder ``samples`` so every run of ``group`` consecutive ones shares a bucket: walk the
    (already shuffled) order, close a bucket's group when it is full, then append the partly
    filled groups in the order they were opened. Returns the new order and each group's start."""
    pending: dict[Size, list[T]] = {}
    groups: list[list[T]] = []
    for s in samples:
        b = bucket_of(s)
        pending.setdefault(b, []).append(s)
        if len(pending[b]) == group:
            groups.append(pending.pop(b))
    groups.extend(pending.values())
    order: list[T] = []
    starts: list[int] = []
    for g in groups:
        starts.append(len(order))
        order.extend(g)
    return order, starts


def size_tag(size: Size, choices: Sequence[Size] | None) -> str:
    """A short name for the image sizes of a run (the latent cache's folder): ``64px``,
    ``480x640`` or ``buckets-<hash>``."""
    if choices:
        import hashlib

        text = ",".join(f"{h}x{w}" for h, w in choices)
        return "buckets-" + hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"{size[0]}px" if size[0] == size[1] else f"{size[0]}x{size[1]}"
