"""The native LoRA file format (DESIGN.md, "LoRA file").

safetensors with, per denoiser module ``M``::

    denoiser.M.lora_down.weight   (r, in)        or (r, in, k, k) for convs
    denoiser.M.lora_up.weight     (out, r)       or (out, r, 1, 1)
    denoiser.M.alpha              scalar

delta = (alpha / r) * up @ down, reshaped to the weight. Metadata carries kohya's ``ss_*``
keys and an ``lbm_registry`` JSON entry (format version, base/tuned sha256, ranks, policy, errors).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lbm_registry.errors import LoRAError

FORMAT_VERSION = 1
PREFIX = "denoiser."
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
META_KEY = "lbm_registry"


@dataclass
class LoRALayer:
    """One low-rank pair. ``module`` is the denoiser module name without the ``denoiser.`` prefix."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.up.shape[0], self.down.shape[1], self.down.shape[2], self.down.shape[3])
        return (self.up.shape[0], self.down.shape[1])

    @property
    def kind(self) -> str:
        if not self.is_conv:
            return "linear"
        k = self.down.shape[2:]
        return f"conv{k[0]}x{k[1]}"

    def num_params(self) -> int:
        return self.down.numel() + self.up.numel()

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """(alpha / r) * up @ down, reshaped to the weight's shape."""
        down = self.down.to(device=device, dtype=dtype).reshape(self.rank, -1)
        up = self.up.to(device=device, dtype=dtype).reshape(self.up.shape[0], self.rank)
        return (up @ down).mul_(self.scale).reshape(self.weight_shape)


@dataclass
class LoRAFile:
    """A whole LoRA: layers plus the ``lbm_registry`` metadata (``info``)."""

    layers: dict[str, LoRALayer]
    info: dict[str, Any] = field(default_factory=dict)
    raw_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def base_sha256(self) -> str | None:
        return self.info.get("base_sha256")

    def ranks(self) -> dict[str, int]:
        return {m: layer.rank for m, layer in self.layers.items()}

    def num_params(self) -> int:
        return sum(layer.num_params() for layer in self.layers.values())


def layer_kind(shape: tuple[int, ...] | torch.Size) -> str:
    """``linear``, or ``conv{k}x{k}`` for a 4-d weight of that kernel."""
    if len(shape) == 4:
        return f"conv{shape[2]}x{shape[3]}"
    return "linear"


def matrix_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """A weight's shape as the matrix LoRA factorises: (out, in * kh * kw)."""
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return int(shape[0]), n


_ST_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
SHORT_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
"""The names the CLI takes (``--dtype bf16``) and the catalog shows."""
_KOHYA_PRECISION = {torch.float32: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}
"""kohya's ``--mixed_precision`` vocabulary, which its ``ss_mixed_precision`` key records."""


def _kohya_metadata(summaries: list[tuple[int, float, bool]], dtype: torch.dtype,
                    info: dict[str, Any]) -> dict[str, str]:
    """kohya ``ss_*`` keys from (rank, alpha, is_conv) per layer."""
    ranks = [r for r, _, conv in summaries if not conv]
    cranks = [r for r, _, conv in summaries if conv]
    alphas = [a for _, a, _ in summaries]
    calphas = [a for _, a, conv in summaries if conv]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks) if ranks else 0),
        "ss_network_alpha": str(max(alphas) if alphas else 0),
        "ss_network_args": json.dumps({"conv_dim": max(cranks) if cranks else 0,
                                       "conv_alpha": max(calphas, default=0)}),
        "ss_base_model_version": "lbm",
        "ss_v2": "False",
        "ss_mixed_precision": _KOHYA_PRECISION[dtype],
    }
    if info.get("base_sha256"):
        meta["ss_sd_model_hash"] = info["base_sha256"]
    if info.get("tuned_sha256"):
        meta["ss_tuned_model_hash"] = info["tuned_sha256"]
    return meta


MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION = "https://github.com/gojasper/LBM"


def modelspec_date() -> str:
    """ModelSpec's date, reproducibly: ``$SOURCE_DATE_EPOCH`` (the reproducible-builds
    convention), else the epoch. The real creation time is recorded in the catalog."""
    from datetime import UTC, datetime

    try:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    except ValueError:
        epoch = 0
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def modelspec_metadata(title: str, architecture: str, tensor_sha256: str) -> dict[str, str]:
    """ModelSpec 1.0.1 keys: an honest LBM architecture id (never an SDXL one), and the sha256
    of the tensor bytes as ``0x`` + hex."""
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.date": modelspec_date(),
        "modelspec.hash_sha256": "0x" + tensor_sha256,
    }


def architecture_id(config_name: str | None) -> str:
    """``lbm-relighting/lora`` for a LoRA of the ``lbm-relighting`` config (``lbm/lora`` unknown)."""
    name = (config_name or "lbm").strip() or "lbm"
    return f"{name}/lora"


class LoRAWriter:
    """Write a LoRA file layer by layer; nothing appears at ``dest`` until :meth:`finish`.

    Why: a full-rank fp32 LoRA of the full-size model is ~14 GB, so extraction must not hold
    the whole file in memory. Factor bytes are appended to a hidden temp file next to ``dest``
    as they are produced; ``finish`` writes the safetensors header (alphas first, so every
    tensor stays aligned to its dtype), appends the factor bytes, fsyncs and renames onto
    ``dest``. Any exception inside ``with LoRAWriter(...)`` removes the temp files.

    The result is the format :func:`read_lora` reads (and ``safetensors`` loads): one
    ``lora_down``/``lora_up`` pair in ``dtype`` and an fp32 ``alpha`` per module.
    """

    def __init__(self, dest: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
        import tempfile

        if dtype not in _ST_DTYPE_NAMES:
            raise LoRAError(f"unsupported LoRA dtype {dtype}: use bf16, fp16 or fp32")
        self.dest = Path(dest)
        self.dtype = dtype
        from lbm_registry.errors import ConfigError
        from lbm_registry.fileio import make_folder, output_file_problem, refusals_named

        # the body file goes next to dest before anything is checked at finish(): check first
        if (problem := output_file_problem(self.dest, "output")) is not None:
            raise ConfigError(problem)
        make_folder(self.dest.parent, f"cannot write {self.dest}")
        with refusals_named(self.dest):
            fd, body = tempfile.mkstemp(prefix=f".{self.dest.name}.", suffix=".body", dir=self.dest.parent)
        self._body_path = Path(body)
        self._body = os.fdopen(fd, "wb")
        self._offset = 0
        self._entries: list[tuple[str, str, list[int], int, int]] = []  # key, dtype, shape, begin, end
        self._referenced: dict[str, Any] = {}   # key -> uint8 view of a factor kept by reference
        self._alphas: list[tuple[str, float]] = []
        self._summaries: list[tuple[int, float, bool]] = []
        self._modules: set[str] = set()
        self.factor_bytes = 0

    # -- writing ---------------------------------------------------------------------------
    def _append(self, key: str, tensor: torch.Tensor, reference: bool) -> None:
        t = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy()
        if reference:
            self._referenced[key] = data
        else:
            from lbm_registry.fileio import refusals_named

            with refusals_named(self.dest):  # a full disk names no file: this is the one
                self._body.write(memoryview(data))
        begin, self._offset = self._offset, self._offset + data.nbytes
        self._entries.append((key, _ST_DTYPE_NAMES[self.dtype], list(t.shape), begin, self._offset))

    def add(self, layer: LoRALayer, *, reference: bool = False) -> None:
        """Append one layer (factors are cast to the writer's dtype).

        ``reference``: keep the factors by reference instead of copying them into the body file
        (for factors that live in memory or a mapped file anyway, e.g. a whole LoRA being
        re-saved or an import's plain layers): one write of their bytes instead of two. Leave
        it off for factors made on the fly (extraction), which must not pile up in memory."""
        if layer.module in self._modules:
            raise LoRAError(f"module {layer.module!r} written twice")
        if not math.isfinite(layer.alpha) or layer.alpha <= 0 or layer.rank <= 0:
            raise LoRAError(f"module {layer.module!r}: rank and alpha must be positive")
        self._modules.add(layer.module)
        key = PREFIX + layer.module
        self._append(key + DOWN, layer.down, reference)
        self._append(key + UP, layer.up, reference)
        self._alphas.append((key + ALPHA, float(layer.alpha)))
        self._summaries.append((layer.rank, float(layer.alpha), layer.is_conv))
        self.factor_bytes = self._offset

    def __len__(self) -> int:
        return len(self._alphas)

    def finish(self, info: dict[str, Any] | None = None, extra_metadata: dict[str, str] | None = None) -> Path:
        """Write header + data to a temp file, fsync, rename onto ``dest``; returns ``dest``.

        Reproducible: metadata sorted, no timestamps, tensors in the safetensors library's
        layout; the header carries ModelSpec and kohya's ``sshs_*`` hashes of those tensor bytes.
        """
        from lbm_registry.lbm.checkpoint import atomic_path
        from lbm_registry.safetensors_layout import (
            Entry,
            TensorHasher,
            header_bytes,
            kohya_header_len,
            layout_order,
        )

        if not self._alphas:
            self.abort()
            raise LoRAError("refusing to write a LoRA with no layers")
        from lbm_registry.fileio import refusals_named

        with refusals_named(self.dest):
            self._body.flush()
            self._body.close()
        meta_info = dict(info or {})
        meta_info["format_version"] = FORMAT_VERSION
        meta_info["dtype"] = SHORT_DTYPE_NAMES[self.dtype]
        title = str(meta_info.pop("title", None) or "LBM LoRA")
        architecture = architecture_id(meta_info.get("base_config"))
        metadata = _kohya_metadata(self._summaries, self.dtype, meta_info)
        metadata[META_KEY] = json.dumps(meta_info, separators=(",", ":"), sort_keys=True, default=str)
        metadata["format"] = "pt"
        metadata.update(extra_metadata or {})

        alpha_bytes = torch.tensor([a for _, a in self._alphas], dtype=torch.float32).numpy().tobytes()
        sources: dict[str, tuple[str, int, int]] = {}
        entries = []
        for i, (key, _) in enumerate(self._alphas):
            entries.append(Entry(key, "F32", [], 4))
            sources[key] = ("alpha", 4 * i, 4 * i + 4)
        body_at = 0
        for key, dt, shape, begin, end in self._entries:
            entries.append(Entry(key, dt, shape, end - begin))
            if key in self._referenced:
                sources[key] = ("memory", 0, end - begin)
            else:
                sources[key] = ("body", body_at, body_at + end - begin)
                body_at += end - begin
        entries = layout_order(entries)

        def chunks(fh: Any) -> Any:
            for e in entries:
                where, begin, end = sources[e.name]
                if where == "alpha":
                    yield alpha_bytes[begin:end]
                    continue
                pos = begin
                while pos < end:
                    n = min(end - pos, 16 * 1024 * 1024)
                    yield (memoryview(self._referenced[e.name])[pos:pos + n] if where == "memory"
                           else os.pread(fh.fileno(), n, pos))
                    pos += n

        def with_hashes(sha256: str, legacy: str) -> dict[str, str]:
            return {**metadata, **modelspec_metadata(title, architecture, sha256),
                    "sshs_model_hash": sha256, "sshs_legacy_hash": legacy}

        try:
            # One pass over the body: the header goes first with hashes of the right length
            # (all zeros), the tensor bytes are hashed as they are written, and the header is
            # rewritten in place with the real hashes (fixed-length hex: the same byte length).
            hasher = TensorHasher(kohya_header_len(entries, metadata))
            draft = header_bytes(entries, with_hashes("0" * 64, "0" * 8))
            with atomic_path(self.dest) as tmp, self._body_path.open("rb") as body:
                with tmp.open("wb") as out:
                    out.write(draft)
                    for c in chunks(body):
                        hasher.update(c)
                        out.write(c)
                    header = header_bytes(entries, with_hashes(hasher.sha256, hasher.legacy))
                    if len(header) != len(draft):  # cannot happen with hex digests; stay correct anyway
                        raise LoRAError("internal error: the LoRA header changed length")
                    out.seek(0)
                    out.write(header)
                    out.flush()
                    os.fsync(out.fileno())
        finally:
            self._body_path.unlink(missing_ok=True)
            self._referenced = {}
        return self.dest

    def abort(self) -> None:
        """Drop everything written so far."""
        if not self._body.closed:
            self._body.close()
        self._body_path.unlink(missing_ok=True)
        self._referenced = {}

    def __enter__(self) -> LoRAWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


def write_lora(lora: LoRAFile, dest: str | Path, dtype: torch.dtype = torch.bfloat16,
               extra_metadata: dict[str, str] | None = None) -> Path:
    """Write atomically; factors stored in ``dtype``, alphas as fp32 scalars."""
    if not lora.layers:
        raise LoRAError("refusing to write a LoRA with no layers")
    with LoRAWriter(dest, dtype) as writer:
        for layer in lora.layers.values():
            writer.add(layer, reference=True)   # the whole LoRA is in memory already
        return writer.finish(lora.info, extra_metadata)


def parse_lora_keys(keys: Iterable[str], source: str | Path) -> list[str]:
    """Module names present, checking each has exactly down, up and alpha."""
    groups: dict[str, set[str]] = {}
    for k in keys:
        if not k.startswith(PREFIX):
            raise LoRAError(f"{source}: not an LBM LoRA (unexpected key {k!r})")
        for suffix in (DOWN, UP, ALPHA):
            if k.endswith(suffix):
                groups.setdefault(k[len(PREFIX):-len(suffix)], set()).add(suffix)
                break
        else:
            raise LoRAError(f"{source}: not an LBM LoRA (unexpected key {k!r})")
    for m, parts in groups.items():
        missing = {DOWN, UP, ALPHA} - parts
        if missing:
            raise LoRAError(f"{source}: module {m!r} lacks {', '.join(sorted(s.strip('.') for s in missing))}")
    return list(groups)


def check_float_factor(t: torch.Tensor, source: str | Path, module: str, part: str) -> None:
    """LoRA factors are floating point: integer (int8, uint8...) or bool factors are refused in
    one line (nothing here dequantises them: used as numbers they would make a wrong delta)."""
    if not t.is_floating_point():
        raise LoRAError(f"{source}: module {module!r} {part} is {str(t.dtype).removeprefix('torch.')}: "
                        "LoRA factors must be floating point (fp32, fp16 or bf16)")


def factor_dtype(lora: LoRAFile) -> str | None:
    """The storage dtype of a LoRA's factors as the catalog names it (``bf16``...), the most
    common one by bytes: what the tensors are, whatever the metadata says."""
    weight: dict[torch.dtype, int] = {}
    for layer in lora.layers.values():
        for t in (layer.down, layer.up):
            weight[t.dtype] = weight.get(t.dtype, 0) + t.numel() * t.element_size()
    if not weight:
        return None
    top = max(weight, key=lambda d: weight[d])
    return SHORT_DTYPE_NAMES.get(top, str(top).removeprefix("torch."))


def read_lora(path: str | Path, *, check_finite: bool = True) -> LoRAFile:
    """Read and validate a native LoRA file (keys complete, shapes consistent, rank > 0, finite)."""
    from lbm_registry.lbm.checkpoint import CheckpointReader

    reader = CheckpointReader(path)
    if len(reader) == 0:
        raise LoRAError(f"{path}: empty file, not a LoRA")
    return _lora_from(reader.get, reader.keys(), reader.metadata, path, check_finite)


def lora_from_bytes(data: torch.Tensor, source: str | Path, *, check_finite: bool = True) -> LoRAFile:
    """A native LoRA from its file's bytes already in memory (a flat uint8 tensor, e.g. pinned for
    a device copy); the factors are views of ``data``, nothing is copied. Same checks as
    :func:`read_lora`. For bytes already verified against a known sha256 (the serving loader
    reads, hashes and parses in one pass), so the header gets bounds checks, not a full audit."""
    import struct

    from lbm_registry.lbm.checkpoint import SAFETENSORS_DTYPES

    flat = data.reshape(-1)
    total = flat.numel()
    try:
        (n,) = struct.unpack("<Q", bytes(flat[:8].numpy()))
        if not 0 < n <= total - 8:
            raise ValueError("bad header length")
        header = json.loads(bytes(flat[8:8 + n].numpy()))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise LoRAError(f"{source}: not a safetensors file ({exc})") from None
    metadata = dict(header.pop("__metadata__", None) or {})
    start = 8 + n

    def get(key: str) -> torch.Tensor:
        info = header[key]
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = (start + int(v) for v in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise LoRAError(f"{source}: corrupt safetensors header at {key!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not start <= begin <= end <= total or end - begin != math.prod(shape) * itemsize:
            raise LoRAError(f"{source}: corrupt safetensors header at {key!r}")
        raw = flat[begin:end]
        if begin % itemsize:          # unaligned for a view as this dtype: copy these bytes
            raw = raw.clone()
        return raw.view(dtype).reshape(shape)

    if not header:
        raise LoRAError(f"{source}: empty file, not a LoRA")
    return _lora_from(get, list(header), metadata, source, check_finite)


def _lora_from(get: Any, keys: list[str], metadata: dict[str, str], path: str | Path,
               check_finite: bool) -> LoRAFile:
    """The layers and ``lbm_registry`` entry of a native LoRA whose tensors ``get(key)`` returns."""
    from lbm_registry.lbm.checkpoint import all_finite

    modules = parse_lora_keys(keys, path)
    layers: dict[str, LoRALayer] = {}
    for m in modules:
        key = PREFIX + m
        down, up, alpha = get(key + DOWN), get(key + UP), get(key + ALPHA)
        r = down.shape[0] if down.ndim else 0
        if r == 0 or down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != r:
            raise LoRAError(f"{path}: module {m!r} has inconsistent shapes down {tuple(down.shape)} up {tuple(up.shape)}")
        if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoRAError(f"{path}: module {m!r} conv lora_up must be (out, r, 1, 1), got {tuple(up.shape)}")
        if alpha.numel() != 1:
            raise LoRAError(f"{path}: module {m!r} alpha must be a scalar")
        for t, part in ((down, "lora_down"), (up, "lora_up")):
            check_float_factor(t, path, m, part)
        if check_finite:
            for t, part in ((down, "lora_down"), (up, "lora_up"), (alpha, "alpha")):
                if not all_finite(t):
                    raise LoRAError(f"{path}: module {m!r} {part} contains NaN or Inf")
        layers[m] = LoRALayer(m, down, up, float(alpha.float().item()))
    info: dict[str, Any] = {}
    raw = metadata.get(META_KEY)
    if raw:
        try:
            info = json.loads(raw)
        except json.JSONDecodeError:
            raise LoRAError(f"{path}: corrupt {META_KEY} metadata") from None
    return LoRAFile(layers=layers, info=info, raw_metadata=dict(metadata))
