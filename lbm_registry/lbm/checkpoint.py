"""Checkpoint IO: streaming safetensors reads, safe Lightning ``.ckpt`` loading, atomic writes.

Why streaming: an LBM checkpoint is ~5 GB; extraction and validation read one tensor at a
time from a memory-mapped file instead of materialising whole models.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lbm_registry.errors import CheckpointError
from lbm_registry.fileio import atomic_path
from lbm_registry.lbm.header import (
    CKPT_SUFFIXES,
    DROP_PREFIXES,
    SafetensorsHeader,
    check_architecture,
    check_weight_file,
    normalise_keys,
    read_safetensors_header,
)

__all__ = ["CKPT_SUFFIXES", "DROP_PREFIXES", "CheckpointReader", "atomic_path", "check_architecture", "check_finite",
           "open_checkpoint", "save_safetensors"]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _check_safetensors_header(path: Path) -> dict[str, Any]:
    header = read_safetensors_header(path)
    header.pop("__data_start__", None)
    return header


#: Globals a pickle checkpoint may name that are read as inert stand-ins (never imported, never
#: run): upstream LBM's config dataclasses that Lightning pickles into ``hyper_parameters``, and
#: Lightning's / OmegaConf's own containers. Any other global is refused as code.
STANDIN_PREFIXES = ("lbm.", "pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")


class _Inert:
    """What an allowed global becomes: it accepts any arguments and state and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def load_pickle_checkpoint(path: Path) -> Any:
    """``torch.load(weights_only=True, mmap=True)``: no pickled code runs, and the tensors stay
    in the file (memory-mapped; a 5 GB checkpoint does not take 5 GB of RAM, let alone 10).

    A pickle naming a global that is neither a tensor type nor in :data:`STANDIN_PREFIXES`
    (e.g. ``builtins.print``, ``os.system``) is refused with a :class:`CheckpointError`, before
    anything is unpickled."""
    import pickle
    import zipfile

    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since 1.6; anything else is a legacy pickle
        # stream or not a checkpoint at all (torch's own error here is about mmap).
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (corrupt, truncated or a legacy "
                              "pickle); convert it to .safetensors")
    code_refusal = (f"{path}: refusing a pickle checkpoint that needs arbitrary code "
                    "(only weights_only loading is allowed; convert it to .safetensors)")
    from torch import serialization

    try:
        unsafe = serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        unsafe = []   # torch.load below says what is wrong with the file
    code = [g for g in unsafe if not g.startswith(STANDIN_PREFIXES)]
    if code:
        raise CheckpointError(code_refusal.replace("arbitrary code", f"arbitrary code ({code[0]})"))
    standins = [(type(g.rsplit(".", 1)[-1], (_Inert,), {}), g) for g in unsafe]
    try:
        with serialization.safe_globals(standins):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported" in str(exc) or isinstance(exc, pickle.UnpicklingError):
            raise CheckpointError(code_refusal) from None
        raise CheckpointError(f"{path}: unreadable checkpoint ({first})") from None
    except EOFError:
        raise CheckpointError(f"{path}: truncated checkpoint") from None


def checkpoint_contents(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], Mapping[str, Any] | None]:
    """The tensors of an unpickled checkpoint, and the upstream LBM model config it records.

    Layouts: the original scripts' ``{"model_state_dict": ..., "source_config": <the model
    YAML>, "config": <LBMConfig.to_dict()>, ...}``; Lightning's ``{"state_dict": {"model.*"},
    "hyper_parameters": {"model_config": ...}, ...}``; or a bare state dict."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    config = None
    if isinstance(obj.get("model_state_dict"), dict):
        sd = obj["model_state_dict"]
        config = next((c for c in (obj.get("source_config"), obj.get("config")) if isinstance(c, dict)), None)
    elif isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
        hp = obj.get("hyper_parameters")
        config = hp.get("model_config") if isinstance(hp, dict) and isinstance(hp.get("model_config"), dict) else None
    else:
        sd = obj
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return sd, config


class CheckpointReader:
    """Read-only, tensor-by-tensor view of a checkpoint.

    safetensors files are memory-mapped (nothing is loaded until ``get``). Pickle checkpoints
    (``.ckpt``/``.pt``: the original scripts' ``exact_base.ckpt``, Lightning's) are opened with
    :func:`load_pickle_checkpoint` (``weights_only``, memory-mapped): a pickle that needs
    arbitrary code is refused. ``model.`` prefixes are stripped and ``lpips_loss.*`` dropped.
    When such a file records upstream LBM's model config and its tensors fit it, that config
    (translated; :attr:`notes` say how) is offered as the ``lbm_config`` metadata.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_weight_file(self.path)
        self.metadata: dict[str, str] = {}
        self._st = None
        self._header: dict[str, Any] = {}
        self._data_start = 0
        self._fh = None
        self._sd: dict[str, torch.Tensor] | None = None
        self._rename: dict[str, str] = {}
        self.notes: list[str] = []
        if self.path.suffix in CKPT_SUFFIXES:
            self._open_ckpt()
        else:
            self._open_safetensors()

    # -- opening ---------------------------------------------------------------------------
    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        header = _check_safetensors_header(self.path)
        self.metadata = dict(header.get("__metadata__") or {})
        self._header = header
        with self.path.open("rb") as fh:
            self._data_start = 8 + struct.unpack("<Q", fh.read(8))[0]
        try:
            self._st = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{self.path}: unreadable safetensors file ({exc})") from None
        self._rename = self._normalise(self._st.keys())

    def _open_ckpt(self) -> None:
        sd, upstream = checkpoint_contents(load_pickle_checkpoint(self.path), self.path)
        self._sd = sd
        self._rename = self._normalise(sd.keys())
        if upstream is not None:
            self._adopt_upstream_config(upstream)

    def _adopt_upstream_config(self, upstream: Mapping[str, Any]) -> None:
        """Offer the upstream config the file records as our ``lbm_config`` metadata, when its
        architecture is the file's (else say it is ignored)."""
        import json

        from lbm_registry.errors import ArchitectureError, ConfigError
        from lbm_registry.lbm.config import upstream_config
        from lbm_registry.lbm.header import CONFIG_METADATA_KEY, verify_shapes

        try:
            cfg = upstream_config(dict(upstream), f"{self.path.name}'s recorded config")
            verify_shapes(self.shapes(), cfg, self.path)
        except (ConfigError, ArchitectureError) as exc:
            self.notes.append(f"the upstream LBM config {self.path.name} records is not used: {exc}")
            return
        self.metadata[CONFIG_METADATA_KEY] = json.dumps(cfg.to_dict())
        self.notes.append(f"config: the upstream LBM model config {self.path.name} records")
        self.notes.extend(cfg.notes)

    @staticmethod
    def _normalise(keys: Iterable[str]) -> dict[str, str]:
        return normalise_keys(keys)

    # -- access ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._rename)

    def __contains__(self, key: str) -> bool:
        return key in self._rename

    def __len__(self) -> int:
        return len(self._rename)

    def shape(self, key: str) -> tuple[int, ...]:
        raw = self._rename[key]
        if self._st is not None:
            return tuple(self._st.get_slice(raw).get_shape())
        return tuple(self._sd[raw].shape)

    def dtype_name(self, key: str) -> str:
        raw = self._rename[key]
        if self._st is not None:
            return str(self._st.get_slice(raw).get_dtype())
        return str(self._sd[raw].dtype).replace("torch.", "")

    def get(self, key: str) -> torch.Tensor:
        try:
            raw = self._rename[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: missing key {key!r}") from None
        if self._st is not None:
            try:
                return self._st.get_tensor(raw)
            except Exception as exc:  # a dtype torch lacks (F6, F4...), a file changed under us
                raise CheckpointError(f"{self.path}: tensor {key!r} is unreadable ({_first_line(exc)})") from None
        return self._sd[raw]

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """A private copy of one tensor, read with ``pread`` rather than through the memory map.

        Why: tensors from :meth:`get` are views of the mmapped file, and every page touched stays in
        this process's RSS while the reader is open, so streaming two 5 GB checkpoints shows ~10 GB
        resident. ``read`` goes through the page cache like ``cat`` does, so RSS stays at the
        tensors in hand. ``out`` is an optional flat ``uint8`` buffer (at least the tensor's byte
        size) to read into: reusing one avoids page-faulting fresh memory for every tensor, which
        costs more than the read itself. For ``.ckpt`` files this is :meth:`get`.
        """
        try:
            raw = self._rename[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: missing key {key!r}") from None
        info = self._header.get(raw)
        dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if info else None
        if self._st is None or dtype is None or not hasattr(os, "preadv"):
            return self.get(key)
        begin, end = (int(v) for v in info["data_offsets"])
        nbytes = end - begin
        if out is not None and out.dtype == torch.uint8 and out.is_contiguous() and out.numel() >= nbytes:
            buf = out.reshape(-1)[:nbytes]
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        if self._fh is None:
            self._fh = self.path.open("rb")
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            got = os.preadv(self._fh.fileno(), [view[done:]], self._data_start + begin + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: truncated while reading {key!r}")
            done += got
        return buf.view(dtype).reshape(tuple(info["shape"]))

    def tensor_sha256(self) -> str:
        """sha256 of the tensor bytes (see :mod:`lbm_registry.safetensors_layout`): of the file's
        for safetensors; for a pickle checkpoint, of the bytes its conversion to safetensors
        (``import``, :func:`save_safetensors`) holds, so a LoRA made against the ``.ckpt`` fits
        the base registered from it."""
        from lbm_registry.safetensors_layout import CHUNK, Entry, layout_order, tensor_sha256

        if self._st is not None:
            return tensor_sha256(self.path)
        import hashlib

        names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
        h = hashlib.sha256()
        entries = []
        for key in self._rename:
            t = self.get(key)
            entries.append(Entry(key, names.get(t.dtype, str(t.dtype)), list(t.shape), t.numel() * t.element_size()))
        for e in layout_order(entries):
            data = self.get(e.name).detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            for i in range(0, len(data), CHUNK):
                h.update(memoryview(data[i:i + CHUNK]))
        return h.hexdigest()

    def check_finite(self) -> None:
        """Refuse NaN/Inf anywhere, naming the first bad key. safetensors files are scanned with
        numpy straight from the file (:meth:`SafetensorsHeader.check_finite`): several times
        faster than one ``torch.isfinite`` call per tensor, which dominated loading a small model."""
        if self._st is not None:
            SafetensorsHeader(self.path).check_finite()
            return
        for key, tensor in self.items():
            check_finite(key, tensor, self.path)

    def items(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._rename:
            if k.startswith(prefix):
                yield k, self.get(k)

    def state_dict(self, prefix: str = "", strip: bool = False) -> dict[str, torch.Tensor]:
        """Materialise (lazily mmapped for safetensors) the tensors under ``prefix``."""
        n = len(prefix) if strip else 0
        return {k[n:]: v for k, v in self.items(prefix)}

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._rename if k.startswith(prefix)}

    def close(self) -> None:
        self._st = None
        self._sd = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | Path) -> CheckpointReader:
    return CheckpointReader(path)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``, from one fp32-accumulated sum (no bool tensor, one pass).

    A NaN or an Inf anywhere makes the sum NaN or infinite; a non-finite sum of finite values
    (an overflow) falls back to the exact elementwise test, so the answer is always exact. Run
    on one thread below a few million elements (thread hand-off costs more than the sum)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    from lbm_registry.lbm.threads import single_thread_below

    with single_thread_below(tensor.numel()):
        if math.isfinite(float(tensor.sum(dtype=torch.float32))):
            return True
        return bool(torch.isfinite(tensor).all())


def check_finite(name: str, tensor: torch.Tensor, source: str | Path) -> None:
    """NaN/Inf weights are refused with the first bad key named."""
    if not all_finite(tensor):
        raise CheckpointError(f"{source}: tensor {name!r} contains NaN or Inf")




def save_safetensors(tensors: Mapping[str, torch.Tensor], dest: str | Path,
                     metadata: Mapping[str, str] | None = None,
                     hash_metadata: Callable[[str, str], Mapping[str, str]] | None = None) -> Path:
    """Write a safetensors file atomically (temp file + fsync + rename), reproducibly.

    Same inputs, same bytes: metadata keys sorted, tensors in the ``safetensors`` library's
    own layout (see :mod:`lbm_registry.safetensors_layout`), so the tensor bytes also equal
    what that library writes and ``tensor_sha256`` survives a re-save by either.
    ``hash_metadata(tensor_sha256, kohya_legacy_hash)`` returns extra metadata that depends on
    the tensor bytes (ModelSpec / ``sshs_*`` keys of a LoRA).
    """
    from lbm_registry.safetensors_layout import Entry, header_bytes, layout_order, write_file

    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    dest = Path(dest)
    clean: dict[str, torch.Tensor] = {}
    entries = []
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        if t.dtype not in names:
            raise CheckpointError(f"cannot store {k!r}: unsupported dtype {t.dtype}")
        clean[k] = t
        entries.append(Entry(k, names[t.dtype], list(t.shape), t.numel() * t.element_size()))
    entries = layout_order(entries)
    meta = dict(metadata or {})

    def chunks() -> Iterator[memoryview]:
        for e in entries:
            t = clean[e.name]
            if e.nbytes:
                yield memoryview(t.reshape(-1).view(torch.uint8).numpy())

    if hash_metadata is not None:
        from lbm_registry.safetensors_layout import TensorHasher, kohya_header_len

        hasher = TensorHasher(kohya_header_len(entries, meta))
        for c in chunks():
            hasher.update(c)
        meta.update(hash_metadata(hasher.sha256, hasher.legacy))
    header = header_bytes(entries, meta)

    with atomic_path(dest) as tmp:
        write_file(tmp, header, chunks())
    return dest
