"""Webdataset shards -> batches of (source, target) image tensors in [-1, 1].

Why not a ``DataLoader`` with workers: resuming must reproduce an uninterrupted run exactly, and
several processes must see one global sample order. The order is a pure function of (shards,
seed, epoch): shards are permuted and samples buffer-shuffled with an RNG seeded from both. Each
shard is indexed once (tar headers only: name, offset, size), so a sample is addressed by its
*position* in an epoch and read on its own: a resumed run starts at the saved position without
replaying anything, and each data-parallel process reads the bytes of its own samples only.
Images are decoded by content (:func:`lbm_registry.lbm.imaging.open_image`), so WebP bytes in a
``.jpg`` entry work. An entry named without an extension (``source_image``, as upstream LBM's
configs name their inputs) matches that entry with any image extension; a key may also list
alternatives, the first one present wins. Images are resized to cover the training size (one
(H, W), or their aspect bucket: :mod:`lbm_registry.train.buckets`) and centre-cropped.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lbm_registry.errors import DataError
from lbm_registry.train.buckets import Size, group_by_bucket, image_size, nearest_bucket

if TYPE_CHECKING:
    import torch
    from PIL import Image


def expand_shards(patterns: Iterable[str], field: str | None = None) -> list[Path]:
    """Brace-expand (``shards/train-{000..003}.tar``) and check that every shard exists.

    ``field`` names the config key the patterns came from (``validation_shards``), so a path
    the user never typed (a default of the config file) says where it came from."""
    import braceexpand

    out: list[Path] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(str(pattern)):
            p = Path(item).expanduser()
            if not p.is_file():
                where = [f"from {pattern!r}"] if item != pattern else []
                if field:
                    where.append(f"{field}; --{field.replace('_', '-')} overrides it")
                raise DataError(f"shard not found: {item}" + (f" ({', '.join(where)})" if where else ""))
            out.append(p)
    return out


def shard_hashes(shards: Iterable[Path]) -> list[dict[str, str]]:
    """``[{"path", "sha256"}]`` per shard: the dataset part of a trained LoRA's lineage. A shard
    named twice (the same file for training and validation) is listed once."""
    import hashlib

    out = []
    seen: set[str] = set()
    for shard in shards:
        if str(Path(shard).resolve()) in seen:
            continue
        seen.add(str(Path(shard).resolve()))
        h = hashlib.sha256()
        with open(shard, "rb") as fh:
            while chunk := fh.read(8 * 1024 * 1024):
                h.update(chunk)
        out.append({"path": str(Path(shard).resolve()), "sha256": h.hexdigest()})
    return out


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


def as_size(resolution: int | Sequence[int]) -> Size:
    """``64`` -> (64, 64); ``(480, 640)`` -> (480, 640) (height, width)."""
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def load_pair_image(data: bytes, resolution: int | Sequence[int]) -> Image.Image:
    """Decode any PIL-readable bytes, resize to cover ``resolution`` (a side, or (H, W)) and
    centre-crop to it: the aspect ratio is kept, the overflowing edges are cut."""
    from PIL import Image, ImageOps

    from lbm_registry.lbm.imaging import open_image

    h, w = as_size(resolution)
    img = open_image(data)
    return ImageOps.fit(img, (w, h), method=Image.BICUBIC, centering=(0.5, 0.5))


def entry_names(key: str | Sequence[str]) -> tuple[str, ...]:
    """A config's ``source_key``/``target_key`` as lower-case alternatives."""
    keys = [key] if isinstance(key, str) else list(key)
    return tuple(k.lower() for k in keys)


def find_entry(members: Iterable[str], wanted: Sequence[str]) -> str | None:
    """The first of ``wanted`` a sample has: the entry itself (``source.jpg``), or for a name
    without an extension (``source_image``) that name with an image extension."""
    present = set(members)
    for name in wanted:
        if name in present:
            return name
        if "." not in name:
            for ext in IMAGE_EXTENSIONS:
                if f"{name}.{ext}" in present:
                    return f"{name}.{ext}"
    return None


_META = re.compile(r"__[^/]*__($|/)")


@dataclass(frozen=True)
class RawSample:
    """One sample of a shard: its key and, per entry (``source.jpg``...), where its bytes are."""

    shard: Path
    key: str
    members: dict[str, tuple[int, int]]  # entry (lower case) -> (offset, size) in the tar file
    compressed: bool = False

    def read_head(self, entry: str, n: int = 65536) -> bytes:
        """The first ``n`` bytes of ``entry`` (enough for an image header), or all of it from a
        compressed shard."""
        offset, size = self.members[entry]
        if self.compressed or size <= n:
            return self.read(entry)
        with open(self.shard, "rb") as fh:
            fh.seek(offset)
            return fh.read(n)

    def read(self, entry: str) -> bytes:
        offset, size = self.members[entry]
        if self.compressed:  # offsets are member indices into the decompressed stream
            import tarfile

            with tarfile.open(self.shard, "r:*") as tar:
                member = tar.getmembers()[offset]
                fh = tar.extractfile(member)
                assert fh is not None
                return fh.read()
        with open(self.shard, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise OSError(f"{self.shard.name} is shorter than its index (changed during the run?)")
        return data


class CorruptShard(Exception):
    def __init__(self, reason: str, samples: list[RawSample]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.samples = samples


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else None


def index_shard(shard: Path) -> list[RawSample]:
    """Index a tar shard from its headers (no data is read). Raises :class:`CorruptShard` with the
    complete samples found before the damage."""
    import tarfile

    size = shard.stat().st_size
    samples: list[RawSample] = []
    compressed = False
    try:
        tar = tarfile.open(shard, "r:")
    except tarfile.ReadError:
        try:
            tar = tarfile.open(shard, "r:*")
            compressed = True
        except (tarfile.ReadError, EOFError, OSError):
            raise CorruptShard("empty file" if size == 0 else "not a tar archive", []) from None
    current: dict[str, tuple[int, int]] = {}
    key: str | None = None

    def flush() -> None:
        if key is not None and current:
            samples.append(RawSample(shard, key, dict(current), compressed))

    with tar:
        i = -1
        try:
            while True:
                member = tar.next()
                if member is None:
                    break
                i += 1
                if not member.isfile():
                    continue
                if not compressed and member.offset_data + member.size > size:
                    raise CorruptShard("truncated: an entry runs past the end of the file", samples)
                name = member.name[2:] if member.name.startswith("./") else member.name
                split = _split_name(name)
                if split is None or _META.search(name):
                    continue
                k, ext = split
                if k != key:
                    flush()
                    key, current = k, {}
                current[ext] = (i, member.size) if compressed else (member.offset_data, member.size)
            if not compressed:
                _check_end(shard, tar.offset, size, samples)
        except CorruptShard:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise CorruptShard(_reason(exc), samples) from None
    flush()
    return samples


def _check_end(shard: Path, offset: int, size: int, samples: list[RawSample]) -> None:
    """``tarfile`` stops quietly at a bad header after the first one: tell that from a real end."""
    with open(shard, "rb") as fh:
        fh.seek(offset)
        block = fh.read(512)
    if block and block.strip(b"\0"):
        if len(block) < 512:
            raise CorruptShard(f"truncated: the file ends inside a tar header at byte {offset}", samples)
        raise CorruptShard(f"invalid tar header at byte {offset}", samples)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(" @ ")[0]


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

    def __init__(self, shards: list[Path], *, source_key: str | Sequence[str] = "source.jpg",
                 target_key: str | Sequence[str] = "target.jpg", resolution: int | Sequence[int] = 256,
                 buckets: Sequence[Size] | None = None, on_bad_sample: str = "error", shuffle: bool = True,
                 shuffle_buffer: int = 64, seed: int = 0, warn: Callable[[str], None] | None = None) -> None:
        if not shards:
            raise DataError("no shards given")
        self.shards = list(shards)
        self.source_key = entry_names(source_key)
        self.target_key = entry_names(target_key)
        self.resolution = resolution
        self.size = as_size(resolution)
        self.buckets = [as_size(b) for b in buckets] if buckets else None
        self._group_size = 0
        self._sizes: dict[tuple[Path, str], Size] = {}
        self.on_bad_sample = on_bad_sample
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.warn = warn or (lambda msg: None)
        self.skipped = 0
        self._index: dict[Path, list[RawSample]] = {}
        self.quiet_index = False  # data-parallel workers but rank 0: every process indexes every shard
        self._order: tuple[int, list[RawSample], list[int] | None] | None = None

    @property
    def group_size(self) -> int:
        """With buckets: how many consecutive samples share a bucket (the trainer's global batch)."""
        return self._group_size

    @group_size.setter
    def group_size(self, n: int) -> None:
        if n != self._group_size:
            self._group_size = n
            self._order = None  # regrouped on next use

    # -- raw stream ----------------------------------------------------------------------------
    def _bad(self, message: str) -> None:
        if self.on_bad_sample == "error":
            raise DataError(message)
        self.skipped += 1
        self.warn(f"skipping bad sample: {message}")

    def _shard_samples(self, shard: Path) -> list[RawSample]:
        """The shard's samples (indexed once, then cached); a corrupt shard is one bad sample
        (skip mode keeps the complete samples before the damage)."""
        cached = self._index.get(shard)
        if cached is None:
            try:
                cached = index_shard(shard)
            except CorruptShard as exc:
                message = f"{shard.name}: corrupt shard ({exc.reason})"
                if self.on_bad_sample == "error" or not self.quiet_index:
                    self._bad(message)
                cached = exc.samples
            self._index[shard] = cached
        return cached

    def _raw(self, epoch: int) -> Iterator[RawSample]:
        """Raw samples (bytes not read yet) in this epoch's order."""
        yield from self.order(epoch)

    def order(self, epoch: int) -> list[RawSample]:
        """This epoch's sample order (computed once per epoch, a pure function of seed and epoch;
        with buckets, and the group size, grouped so each step's samples share a bucket)."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        rng = random.Random(f"{self.seed}:{epoch}")
        shards = list(self.shards)
        if self.shuffle:
            rng.shuffle(shards)
        samples = (s for shard in shards for s in self._shard_samples(shard))
        out: list[RawSample] = []
        if not self.shuffle or self.shuffle_buffer <= 1:
            out.extend(samples)
        else:
            buf: list[RawSample] = []
            for s in samples:
                buf.append(s)
                if len(buf) >= self.shuffle_buffer:
                    out.append(buf.pop(rng.randrange(len(buf))))
            while buf:
                out.append(buf.pop(rng.randrange(len(buf))))
        starts = None
        if self.buckets and self.group_size > 0:
            out, starts = group_by_bucket(out, self.sample_size, self.group_size)
        self._order = (epoch, out, starts)
        return out

    def steps_per_epoch(self, epoch: int, global_batch: int) -> int:
        """Optimizer steps in ``epoch`` when each takes up to ``global_batch`` consecutive samples
        (of one bucket, with buckets)."""
        order = self.order(epoch)
        starts = self._order[2] if self._order is not None else None
        return len(starts) if starts is not None else -(-len(order) // global_batch)

    def step_size(self, epoch: int, start: int, global_batch: int) -> int:
        """How many samples the step starting at position ``start`` takes: up to ``global_batch``,
        and with buckets up to the end of the bucket group ``start`` lies in."""
        order = self.order(epoch)
        size = min(global_batch, len(order) - start)
        starts = self._order[2] if self._order is not None else None
        if starts is not None:
            import bisect

            nxt = bisect.bisect_right(starts, start)
            end = starts[nxt] if nxt < len(starts) else len(order)
            size = min(size, end - start)
        return size

    def sample_size(self, raw: RawSample) -> Size:
        """The (H, W) a sample is trained at: the fixed size, or the bucket nearest to its source
        image's aspect ratio (read from the header once; an unreadable sample gets the fixed size
        and is reported when decoded)."""
        if not self.buckets:
            return self.size
        found = self._sizes.get((raw.shard, raw.key))
        if found is None:
            entry = find_entry(raw.members, self.source_key)
            hw = None
            if entry is not None:
                try:
                    hw = image_size(raw.read_head(entry))
                    if hw is None:
                        hw = image_size(raw.read(entry))
                except OSError:
                    hw = None
            found = nearest_bucket(hw, self.buckets) if hw is not None else self.size
            self._sizes[(raw.shard, raw.key)] = found
        return found

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, raw: RawSample) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(source, target)`` tensors, or None for a bad sample in skip mode."""
        from lbm_registry.lbm.imaging import to_tensor

        key, shard = raw.key, raw.shard.name
        size = self.sample_size(raw)
        out = []
        for names in (self.source_key, self.target_key):
            want = find_entry(raw.members, names)
            if want is None:
                present = ", ".join(sorted(raw.members)) or "nothing"
                self._bad(f"{shard}: sample {key!r} lacks {' or '.join(repr(n) for n in names)} (has: {present})")
                return None
            try:
                data = raw.read(want)
            except OSError as exc:
                self._bad(f"{shard}: sample {key!r} {want}: unreadable ({exc})")
                return None
            try:
                out.append(to_tensor(load_pair_image(data, size))[0])
            except DataError as exc:
                reason = getattr(exc, "reason", None) or str(exc).replace("unreadable image <bytes>: ", "")
                self._bad(f"{shard}: sample {key!r} {want}: unreadable image ({reason})")
                return None
        return out[0], out[1]

    _decode = decode

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
            yield pos + 1, raw.key, decoded[0], decoded[1]

    def batches(self, batch_size: int, epoch: int = 0, start: int = 0,
                limit: int | None = None) -> Iterator[Batch]:
        """Batches of up to ``batch_size`` consecutive pairs of one size (the last one of an epoch,
        or of a run of one aspect bucket, may be smaller)."""
        import torch

        src: list[torch.Tensor] = []
        tgt: list[torch.Tensor] = []
        keys: list[str] = []
        last = start
        for position, key, s, t in self.pairs(epoch, start, limit):
            if src and s.shape != src[0].shape:
                yield Batch(torch.stack(src), torch.stack(tgt), keys, last)
                src, tgt, keys = [], [], []
            src.append(s)
            tgt.append(t)
            keys.append(key)
            last = position
            if len(src) == batch_size:
                yield Batch(torch.stack(src), torch.stack(tgt), keys, position)
                src, tgt, keys = [], [], []
        if src:
            yield Batch(torch.stack(src), torch.stack(tgt), keys, last)
