"""Webdataset shards -> batches of (source, target) image tensors in [-1, 1].

Why not a ``DataLoader`` with workers: resuming must reproduce an uninterrupted run exactly.
The stream is a pure function of (shards, seed, epoch): shards are permuted and samples
buffer-shuffled with an RNG seeded from both, so a run resumes by replaying the raw tar stream
up to the saved position (no decoding) and continuing. Images are decoded by content
(:func:`lbm_registry.lbm.imaging.open_image`), so WebP bytes in a ``.jpg`` entry work.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbm_registry.errors import DataError

if TYPE_CHECKING:
    import torch
    from PIL import Image


def expand_shards(patterns: Iterable[str]) -> list[Path]:
    """Brace-expand (``shards/train-{000..003}.tar``) and check that every shard exists."""
    import braceexpand

    out: list[Path] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(str(pattern)):
            p = Path(item).expanduser()
            if not p.is_file():
                where = f" (from {pattern!r})" if item != pattern else ""
                raise DataError(f"shard not found: {item}{where}")
            out.append(p)
    return out


def shard_hashes(shards: Iterable[Path]) -> list[dict[str, str]]:
    """``[{"path", "sha256"}]`` per shard: the dataset part of a trained LoRA's lineage."""
    import hashlib

    out = []
    for shard in shards:
        h = hashlib.sha256()
        with open(shard, "rb") as fh:
            while chunk := fh.read(8 * 1024 * 1024):
                h.update(chunk)
        out.append({"path": str(Path(shard).resolve()), "sha256": h.hexdigest()})
    return out


def load_pair_image(data: bytes, resolution: int) -> Image.Image:
    """Decode any PIL-readable bytes, resize the short side to ``resolution`` and centre-crop."""
    from PIL import Image, ImageOps

    from lbm_registry.lbm.imaging import open_image

    img = open_image(data)
    return ImageOps.fit(img, (resolution, resolution), method=Image.BICUBIC, centering=(0.5, 0.5))


@dataclass
class Batch:
    """A batch of pairs. ``position`` is the raw stream position just after its last sample."""

    source: torch.Tensor
    target: torch.Tensor
    keys: list[str]
    position: int


class PairStream:
    """Deterministic, resumable stream of image pairs from webdataset tar shards.

    ``on_bad_sample="skip"`` drops a sample with a missing key or an unreadable image (and the
    rest of a corrupt shard) after one ``warn`` line; ``"error"`` raises :class:`DataError`.
    """

    def __init__(self, shards: list[Path], *, source_key: str = "source.jpg", target_key: str = "target.jpg",
                 resolution: int = 256, on_bad_sample: str = "error", shuffle: bool = True,
                 shuffle_buffer: int = 64, seed: int = 0, warn: Callable[[str], None] | None = None) -> None:
        if not shards:
            raise DataError("no shards given")
        self.shards = list(shards)
        self.source_key = source_key.lower()
        self.target_key = target_key.lower()
        self.resolution = resolution
        self.on_bad_sample = on_bad_sample
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.warn = warn or (lambda msg: None)
        self.skipped = 0

    # -- raw stream ----------------------------------------------------------------------------
    def _bad(self, message: str) -> None:
        if self.on_bad_sample == "error":
            raise DataError(message)
        self.skipped += 1
        self.warn(f"skipping bad sample: {message}")

    def _shard_samples(self, shard: Path) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tarfile_samples

        def handler(exc: Exception) -> bool:
            first = str(exc.args[0]) if exc.args else type(exc).__name__
            first = first.split(" @ ")[0]
            self._bad(f"{shard.name}: corrupt shard ({type(exc).__name__}: {first})")
            return False  # stop reading this shard either way

        yield from tarfile_samples([{"url": str(shard)}], handler=handler)

    def _raw(self, epoch: int) -> Iterator[dict[str, Any]]:
        """Raw samples (bytes, undecoded) in this epoch's order."""
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(self.shards)
        if self.shuffle:
            rng.shuffle(order)
        samples = (s for shard in order for s in self._shard_samples(shard))
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[dict[str, Any]] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    # -- decoding --------------------------------------------------------------------------------
    def _decode(self, raw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        from lbm_registry.lbm.imaging import to_tensor

        key, shard = raw.get("__key__", "?"), Path(str(raw.get("__url__", "?"))).name
        present = sorted(k for k in raw if not k.startswith("__"))
        out = []
        for want in (self.source_key, self.target_key):
            if want not in raw:
                self._bad(f"{shard}: sample {key!r} lacks {want!r} (has: {', '.join(present) or 'nothing'})")
                return None
            try:
                out.append(to_tensor(load_pair_image(raw[want], self.resolution))[0])
            except DataError as exc:
                reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "",
                                str(exc).replace("unreadable image <bytes>: ", ""))
                self._bad(f"{shard}: sample {key!r} {want}: unreadable image ({reason})")
                return None
        return out[0], out[1]

    def pairs(self, epoch: int = 0, start: int = 0,
              limit: int | None = None) -> Iterator[tuple[int, str, torch.Tensor, torch.Tensor]]:
        """``(position_after, key, source, target)`` from raw position ``start`` of ``epoch``."""
        good = 0
        for pos, raw in enumerate(self._raw(epoch)):
            if pos < start:
                continue
            if limit is not None and good >= limit:
                return
            decoded = self._decode(raw)
            if decoded is None:
                continue
            good += 1
            yield pos + 1, str(raw.get("__key__")), decoded[0], decoded[1]

    def batches(self, batch_size: int, epoch: int = 0, start: int = 0,
                limit: int | None = None) -> Iterator[Batch]:
        """Batches of up to ``batch_size`` pairs (the last one of an epoch may be smaller)."""
        import torch

        src: list[torch.Tensor] = []
        tgt: list[torch.Tensor] = []
        keys: list[str] = []
        position = start
        for position, key, s, t in self.pairs(epoch, start, limit):
            src.append(s)
            tgt.append(t)
            keys.append(key)
            if len(src) == batch_size:
                yield Batch(torch.stack(src), torch.stack(tgt), keys, position)
                src, tgt, keys = [], [], []
        if src:
            yield Batch(torch.stack(src), torch.stack(tgt), keys, position)
