"""Training pictures: the sample grid (source | prediction | target) and the loss curve.

matplotlib is used through ``Figure`` + the Agg canvas, never ``pyplot``: no global figure
state, no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lbm_registry.lbm.checkpoint import atomic_path

if TYPE_CHECKING:
    from PIL import Image


def sample_grid(rows: Sequence[tuple[Image.Image, Image.Image, Image.Image]], title: str = "") -> Image.Image:
    """One row per sample: source | prediction | target, with a caption line on top."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("no samples to draw")
    w, h = rows[0][0].size
    gap, line = 4, 14
    head = 2 * line if title else line
    grid = Image.new("RGB", (3 * w + 4 * gap, head + len(rows) * (h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((gap + 2, 2), title, fill=(90, 90, 90))
    for col, label in enumerate(("source", "prediction", "target")):
        draw.text((gap + col * (w + gap) + 2, head - line + 2), label, fill=(0, 0, 0))
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            tile = img if img.size == (w, h) else img.resize((w, h))
            grid.paste(tile, (gap + c * (w + gap), head + gap + r * (h + gap)))
    return grid


def save_image(img: Image.Image, dest: str | Path) -> Path:
    with atomic_path(dest) as tmp:
        img.save(tmp, format="PNG")
    return Path(dest)


def loss_curve(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], dest: str | Path,
               title: str = "LoRA fine-tuning") -> Path:
    """Per-step train loss (raw and smoothed) and validation loss, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train")
        smooth, ema = [], losses[0]
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="train (EMA)")
    if val:
        vsteps, vlosses = zip(*val, strict=True)
        ax.plot(vsteps, vlosses, "o-", color="tab:orange", linewidth=2, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if train or val:
        ax.legend()
        ax.set_yscale("log" if all(v > 0 for _, v in [*train, *val]) else "linear")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    return Path(dest)
