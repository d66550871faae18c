"""What a safetensors file holds, read from its header alone: no torch, no model.

Why: importing torch costs 1-3 s on a 2-core machine, and checking a checkpoint's
architecture needs only its key/shape table (the header) and the table its config implies
(:mod:`lbm_registry.lbm.unet_shapes`). ``lbm-reg import`` therefore verifies a base without
torch; the NaN/Inf scan reads the tensor bytes with numpy.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbm_registry.errors import ArchitectureError, CheckpointError

if TYPE_CHECKING:
    from lbm_registry.lbm.config import LBMConfig

DROP_PREFIXES = ("lpips_loss.",)
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")   # pickles: torch.load(weights_only=True)
#: safetensors dtype -> the name torch gives it (what the catalog records).
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_SCAN_BYTES = 64 * 1024 * 1024   # the NaN scan reads at most this much at a time


#: bits per element of every dtype the safetensors format names (its ``Dtype`` enum)
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "F64": 64, "I64": 64, "U64": 64}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (JSON parsers keep the last one silently)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def parse_header_json(raw: bytes) -> Any:
    """A safetensors header's JSON, refusing a key given twice at any level (tensor names,
    ``__metadata__`` keys, fields): which one a reader takes is up to the reader, so a file whose
    tools disagree about its content is refused outright. Raises ValueError (DuplicateKeyError)."""
    return json.loads(raw, object_pairs_hook=_no_duplicates)


def _tensor_bytes(path: Path, key: str, info: Any) -> tuple[int, int]:
    """(begin, end) of one tensor entry, after checking its fields are what the format allows."""
    bad = f"{path}: corrupt safetensors header at {key!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{bad} (not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(f"{bad} (unknown dtype {str(dtype)[:40]!r})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{bad} (shape must be a list of non-negative integers)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{bad} (data_offsets must be two integers, begin <= end)")
    bits = DTYPE_BITS[dtype]
    for d in shape:
        bits *= d
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise CheckpointError(f"{bad} (shape {tuple(shape)} of {dtype} needs {bits / 8:g} bytes, data_offsets "
                              f"give {offsets[1] - offsets[0]})")
    return offsets[0], offsets[1]


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Validate the header as the safetensors library does (and a bit more), without it: a JSON
    object without duplicate keys, string metadata, known dtypes, shapes whose byte size matches
    their offsets, tensors laid end to end exactly over the data (no gap, overlap or tail), and a
    file exactly as long as the header says (catches truncation)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short, {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        raw = fh.read(n)
    if raw[:1] != b"{":
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    try:
        header = parse_header_json(raw)
    except DuplicateKeyError as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file (key {str(exc)[:80]!r} appears twice in "
                              "its header)") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict)
                             or not all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    spans = sorted((_tensor_bytes(path, k, v), k) for k, v in header.items() if k != "__metadata__")
    end = 0
    for (begin, stop), key in spans:
        if begin != end:
            what = "overlaps the one before it" if begin < end else "leaves a gap before it"
            raise CheckpointError(f"{path}: corrupt safetensors header at {key!r} (its data {what})")
        end = stop
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end})"
        )
    if 8 + n + end < size:
        raise CheckpointError(f"{path}: corrupt safetensors file ({size - 8 - n - end} bytes after the last tensor)")
    header["__data_start__"] = 8 + n
    return header


def normalise_keys(keys: Iterable[str]) -> dict[str, str]:
    """Our key -> the file's key: Lightning's ``model.`` prefix stripped, ``lpips_loss.*`` dropped."""
    out: dict[str, str] = {}
    for k in keys:
        name = k[len("model."):] if k.startswith("model.") else k
        if name.startswith(DROP_PREFIXES):
            continue
        out[name] = k
    return out


def check_weight_file(path: Path) -> None:
    """One line for the two ways a path is not a weight file (both readers share it)."""
    if not path.exists():
        raise CheckpointError(f"file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, expected a weight file")


class SafetensorsHeader:
    """Keys, shapes, dtypes and metadata of a safetensors file (the same view of the keys as
    :class:`~lbm_registry.lbm.checkpoint.CheckpointReader`), without loading any tensor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_weight_file(self.path)
        header = read_safetensors_header(self.path)
        self._data_start = int(header.pop("__data_start__"))
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = dict(meta) if isinstance(meta, dict) else {}
        self._header = header
        self._rename = normalise_keys(header)

    def keys(self) -> list[str]:
        return list(self._rename)

    def __len__(self) -> int:
        return len(self._rename)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._header[self._rename[key]]["shape"])

    def dtype_name(self, key: str) -> str:
        raw = self._header[self._rename[key]]["dtype"]
        return DTYPE_NAMES.get(raw, raw.lower())

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._rename if k.startswith(prefix)}

    def dtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for k in self._rename:
            name = self.dtype_name(k)
            counts[name] = counts.get(name, 0) + 1
        return counts

    def check_finite(self) -> None:
        """Refuse NaN/Inf in any floating-point tensor, naming the first bad key (numpy, chunked)."""
        import numpy as np

        views = {"F64": (np.float64, None), "F32": (np.float32, None), "F16": (np.uint16, 0x7C00),
                 "BF16": (np.uint16, 0x7F80)}
        with self.path.open("rb") as fh:
            for key, raw in self._rename.items():
                info = self._header[raw]
                if info["dtype"] not in views:
                    continue
                dtype, exp_mask = views[info["dtype"]]
                begin, end = (int(v) for v in info["data_offsets"])
                item = np.dtype(dtype).itemsize
                step = max(item, _SCAN_BYTES // item * item)
                for off in range(begin, end, step):
                    fh.seek(self._data_start + off)
                    arr = np.frombuffer(fh.read(min(step, end - off)), dtype=dtype)
                    # half floats: all exponent bits set means Inf or NaN
                    bad = ((arr & exp_mask) == exp_mask).any() if exp_mask else not np.isfinite(arr).all()
                    if bad:
                        raise CheckpointError(f"{self.path}: tensor {key!r} contains NaN or Inf")


def check_architecture(actual: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                       source: str | Path, what: str = "LBM checkpoint",
                       allow_missing: Iterable[str] = ()) -> None:
    """Strict key and shape check. The message names the first wrong keys."""
    allow = set(allow_missing)
    missing = [k for k in expected if k not in actual and k not in allow]
    unexpected = [k for k in actual if k not in expected]
    wrong = [k for k in expected if k in actual and tuple(actual[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(actual[k])} vs {tuple(expected[k])})")
    if not any(k in actual for k in expected):
        raise ArchitectureError(f"{source}: not an {what} (none of its {len(expected)} keys found)")
    raise ArchitectureError(f"{source}: does not match the {what} architecture: " + "; ".join(parts))


OPTIONAL_KEYS = ("num_iterations",)
CONFIG_METADATA_KEY = "lbm_config"


def checkpoint_shapes(config: LBMConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the checkpoint ``config`` describes: from the diffusers-free tables
    (:mod:`lbm_registry.lbm.unet_shapes`) when they know its blocks, else from a model built on
    the meta device (which costs the torch and diffusers imports: seconds)."""
    from lbm_registry.lbm.unet_shapes import lbm_shapes

    table = lbm_shapes(config)
    if table is not None:
        return table
    from lbm_registry.lbm.model import expected_shapes

    return expected_shapes(config)


def verify_shapes(actual: Mapping[str, tuple[int, ...]], config: LBMConfig, source: str | Path, *,
                  denoiser_only: bool = False,
                  expected: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise ArchitectureError unless ``actual`` is exactly the checkpoint ``config`` describes."""
    expected = dict(expected) if expected is not None else checkpoint_shapes(config)
    if denoiser_only:
        expected = {k: v for k, v in expected.items() if k.startswith("denoiser.")}
        actual = {k: v for k, v in actual.items() if k.startswith("denoiser.")}
    check_architecture(actual, expected, source, f"LBM checkpoint for '{config.name}'",
                       allow_missing=OPTIONAL_KEYS)


def config_from_metadata(metadata: Mapping[str, str], source: str | Path) -> LBMConfig | None:
    """The config :func:`~lbm_registry.lbm.loading.save_lbm` embeds in a file's metadata, if any."""
    from lbm_registry.lbm.config import config_from_dict

    raw = metadata.get(CONFIG_METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{source}: its '{CONFIG_METADATA_KEY}' metadata is not JSON") from None
    return config_from_dict(data, f"{source} metadata")
