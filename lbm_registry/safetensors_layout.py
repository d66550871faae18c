"""Byte-exact safetensors layout and the hashes other tools compute over it (torch-free).

Why our own writer: ``safetensors.save_file`` takes the metadata as a Rust hash map, so the
order of metadata keys in the header (and with it the file's sha256) may change from one run
to the next. Files here are reproducible: metadata sorted, tensors laid out exactly as the
``safetensors`` library lays them out (by dtype, widest first, then by name), so the bytes
after the header (the "tensor bytes") are identical to what that library writes for the same
tensors, whatever the metadata.

Hashes (all over plain files, no torch):
- ``tensor_sha256``: sha256 of the bytes after the header. It is kohya's ``sshs_model_hash``
  (sd-webui-additional-networks' "new" hash) and ModelSpec's ``modelspec.hash_sha256``, and
  it identifies a base whatever metadata a re-save gave it.
- ``sshs_legacy_hash``: the first 8 hex of sha256 of the 64 KiB at offset 1 MiB of the file
  kohya would write for these tensors with only its ``ss_*`` metadata. That file has the same
  tensor bytes and a header whose *length* we can compute (key order inside it does not move
  the window), so the window is found in our own data section.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# The safetensors library's Dtype enum order; tensors are written in descending order of it.
DTYPE_ORDER = {"BOOL": 0, "F4": 1, "F6_E2M3": 2, "F6_E3M2": 3, "U8": 4, "I8": 5, "F8_E5M2": 6, "F8_E4M3": 7,
               "F8_E8M0": 8, "I16": 9, "U16": 10, "F16": 11, "BF16": 12, "I32": 13, "U32": 14, "F32": 15,
               "F64": 16, "I64": 17, "U64": 18}
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000
CHUNK = 8 * 1024 * 1024


@dataclass
class Entry:
    """One tensor's place in a file: name, safetensors dtype name, shape, byte length."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int


def layout_order(entries: Iterable[Entry]) -> list[Entry]:
    """The order the safetensors library writes tensors in: dtype descending, then name."""
    return sorted(entries, key=lambda e: (-DTYPE_ORDER.get(e.dtype, -1), e.name))


def header_bytes(entries: list[Entry], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length + JSON header (metadata sorted, space-padded to 8) for ``entries``
    already in layout order. Same JSON shape as the safetensors library (compact, UTF-8)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class TensorHasher:
    """Feed the tensor bytes in layout order; get ``tensor_sha256`` and kohya's legacy hash.

    ``kohya_header_len``: length (8 + JSON) of the header kohya's in-memory save would have
    (its ``ss_*`` metadata only), which places the legacy 64 KiB window in the data.
    """

    def __init__(self, kohya_header_len: int = 0) -> None:
        self._sha = hashlib.sha256()
        self._legacy = bytearray()
        self._lo = LEGACY_OFFSET - kohya_header_len
        self._pos = 0

    def update(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        n = len(data)
        lo, hi = max(self._lo, self._pos), min(self._lo + LEGACY_LENGTH, self._pos + n)
        if hi > lo:
            self._legacy += bytes(memoryview(data)[lo - self._pos:hi - self._pos])
        self._pos += n

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def legacy(self) -> str:
        return hashlib.sha256(bytes(self._legacy)).hexdigest()[:8]


def kohya_header_len(entries: list[Entry], metadata: Mapping[str, str]) -> int:
    """Header length of kohya's hashing serialisation: same tensors, ``ss_*`` metadata only."""
    return len(header_bytes(entries, {k: v for k, v in metadata.items() if k.startswith("ss_")}))


def data_start(path: str | Path) -> int:
    with Path(path).open("rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file")
    return 8 + struct.unpack("<Q", head)[0]


def tensor_sha256(path: str | Path) -> str:
    """sha256 of a safetensors file's tensor bytes (everything after the header)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        fh.seek(data_start(path))
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(path: str | Path, kohya_len: int | None = None) -> tuple[str, str]:
    """(tensor_sha256, legacy hash) of an existing file; ``kohya_len`` defaults to its own header."""
    start = data_start(path)
    hasher = TensorHasher(start if kohya_len is None else kohya_len)
    with Path(path).open("rb") as fh:
        fh.seek(start)
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
    return hasher.sha256, hasher.legacy


def write_file(dest: Path, header: bytes, chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``header`` then ``chunks`` to ``dest`` (an already-private temp path) and fsync."""
    with dest.open("wb") as out:
        out.write(header)
        for c in chunks:
            out.write(c)
        out.flush()
        os.fsync(out.fileno())
