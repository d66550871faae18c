"""Synthetic relighting pairs as webdataset tar shards (tests and the demo).

Each pair is one random scene (coloured circles, spheres, rectangles and triangles on a
background) rendered twice: the source lit from one direction, the target from another. Light
direction shows as a shading gradient, per-shape shading, a light tint and a cast shadow offset
away from the light, so there is a consistent source -> target mapping to learn.

Output is deterministic for a seed, down to the bytes (fixed tar headers, per-sample RNGs), so
the shard hashes recorded in a LoRA's lineage are reproducible.
"""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np

from lbm_registry.fileio import atomic_path, make_folder


def _shape_mask(kind: str, p: dict[str, float], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    dx, dy = x - p["cx"], y - p["cy"]
    if kind in ("circle", "sphere"):
        return dx * dx + dy * dy <= p["r"] ** 2
    if kind == "rect":
        c, s = math.cos(p["rot"]), math.sin(p["rot"])
        u, v = c * dx + s * dy, -s * dx + c * dy
        return (np.abs(u) <= p["w"]) & (np.abs(v) <= p["h"])
    # triangle: inside three half-planes around the centre
    inside = np.ones_like(x, dtype=bool)
    pts = [(p["cx"] + p["r"] * math.cos(p["rot"] + k * 2 * math.pi / 3),
            p["cy"] + p["r"] * math.sin(p["rot"] + k * 2 * math.pi / 3)) for k in range(3)]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
        inside &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0
    return inside


def _random_scene(rng: np.random.Generator) -> dict:
    shapes = []
    for _ in range(int(rng.integers(2, 6))):
        kind = str(rng.choice(["circle", "sphere", "rect", "triangle"]))
        shapes.append({
            "kind": kind, "cx": float(rng.uniform(-0.6, 0.6)), "cy": float(rng.uniform(-0.6, 0.6)),
            "r": float(rng.uniform(0.12, 0.3)), "w": float(rng.uniform(0.08, 0.3)), "h": float(rng.uniform(0.08, 0.3)),
            "rot": float(rng.uniform(0, math.pi)), "height": float(rng.uniform(0.05, 0.2)),
            "color": rng.uniform(0.25, 1.0, size=3),
        })
    return {"background": rng.uniform(0.35, 0.8, size=3), "shapes": shapes}


def _light(rng: np.random.Generator, angle: float) -> dict:
    return {"dir": np.array([math.cos(angle), math.sin(angle)]),
            "tint": np.clip(1.0 + rng.uniform(-0.2, 0.2, size=3), 0.7, 1.2)}


def render(scene: dict, light: dict, resolution: int) -> np.ndarray:
    """Render ``scene`` under ``light`` -> uint8 (H, W, 3)."""
    lin = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    y, x = np.meshgrid(lin, lin, indexing="ij")
    lx, ly = light["dir"]
    shade = 0.6 + 0.3 * (x * lx + y * ly) / math.sqrt(2)          # directional gradient
    img = scene["background"][None, None, :] * shade[..., None]
    shadow = np.zeros_like(x, dtype=bool)
    for s in scene["shapes"]:
        d = s["height"]  # taller shapes cast longer shadows, away from the light
        shadow |= _shape_mask(s["kind"], s, x + lx * d, y + ly * d)
    img = np.where(shadow[..., None], img * 0.45, img)  # shapes are painted over their own shadow
    for s in scene["shapes"]:
        mask = _shape_mask(s["kind"], s, x, y)
        if s["kind"] == "sphere":
            nx, ny = (x - s["cx"]) / s["r"], (y - s["cy"]) / s["r"]
            nz = np.sqrt(np.clip(1 - nx * nx - ny * ny, 0, 1))
            lam = np.clip(nx * lx * 0.8 + ny * ly * 0.8 + nz * 0.6, 0, 1)
            sh = 0.25 + 0.75 * lam
        else:
            sh = 0.7 + 0.25 * (x * lx + y * ly) / math.sqrt(2)
        img = np.where(mask[..., None], s["color"][None, None, :] * np.asarray(sh)[..., None], img)
    img = img * light["tint"][None, None, :]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def synth_pair(seed: int, index: int, resolution: int = 128) -> tuple[bytes, bytes]:
    """JPEG bytes of (source, target) for sample ``index`` of dataset ``seed``."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    scene = _random_scene(rng)
    a = float(rng.uniform(0, 2 * math.pi))
    b = a + math.pi + float(rng.uniform(-math.pi / 3, math.pi / 3))
    out = []
    for light in (_light(rng, a), _light(rng, b)):
        buf = io.BytesIO()
        Image.fromarray(render(scene, light, resolution)).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out[0], out[1]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_synth_shards(output: str | Path, n: int, *, resolution: int = 128, seed: int = 0,
                       shard_size: int = 64, prefix: str = "synth") -> list[Path]:
    """Write ``n`` pairs as ``<output>/<prefix>-000.tar``... (keys ``<id>.source.jpg``/``.target.jpg``).

    Returns the shard paths. Each shard is written atomically.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    if resolution < 8:
        raise ValueError("resolution must be >= 8")
    from lbm_registry.errors import ConfigError
    from lbm_registry.fileio import check_output_folder

    check_output_folder(output, ConfigError)
    out_dir = make_folder(output, "--output")
    n_shards = math.ceil(n / shard_size)
    width = max(3, len(str(n_shards - 1)))
    paths = []
    for s in range(n_shards):
        dest = out_dir / f"{prefix}-{s:0{width}d}.tar"
        with atomic_path(dest) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
                src, tgt = synth_pair(seed, i, resolution)
                _add(tar, f"{i:06d}.source.jpg", src)
                _add(tar, f"{i:06d}.target.jpg", tgt)
        paths.append(dest)
    return paths


def shard_pattern(paths: list[Path]) -> str:
    """A brace pattern for a contiguous run of shards (``dir/synth-{000..003}.tar``)."""
    if len(paths) == 1:
        return str(paths[0])
    first, last = paths[0], paths[-1]
    stem_a, stem_b = first.stem.rsplit("-", 1), last.stem.rsplit("-", 1)
    return str(first.parent / f"{stem_a[0]}-{{{stem_a[1]}..{stem_b[1]}}}{first.suffix}")
