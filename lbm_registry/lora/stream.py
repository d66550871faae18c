"""Stream per-layer weight deltas (tuned - base) out of two checkpoints, one layer at a time.

Why: extraction and validation need ``dW`` for 792 layers of two 5 GB models. Loading both
models costs 10-20 GB of RAM; this reads one tensor pair at a time with plain reads
(``CheckpointReader.read``: no mmap pages pinned in RSS) into reused buffers (fresh 50 MB
allocations page-fault on every layer and cost more than the reads), and converts bf16/fp16 to
fp32 into a reused matrix. For big models the reads run ahead in a background thread, so disk
and page-cache copies overlap the SVD of the current layer. The conversion stays on the
consumer's thread: compute in two threads at once makes the SVD's OpenMP barriers wait (on
2 cores, ~25% slower overall than converting inline). Peak memory is a few of the largest layers.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from lbm_registry.errors import ArchitectureError, CheckpointError
from lbm_registry.lbm.checkpoint import CheckpointReader, check_finite
from lbm_registry.lbm.threads import SMALL_LAYER_NUMEL, single_thread_below
from lbm_registry.lora.format import matrix_shape
from lbm_registry.lora.svd import sq_norm

_ITEMSIZE = {"BF16": 2, "BFLOAT16": 2, "F16": 2, "FLOAT16": 2, "F32": 4, "FLOAT32": 4, "F64": 8, "FLOAT64": 8}
_END = object()
THREAD_MIN_NUMEL = 100_000_000
"""Below this many weights in total, layers are read inline: for small layers the handoffs
between two Python threads (GIL switches) cost more than the reads they would hide."""


@dataclass
class LayerDelta:
    """``matrix`` is ``dW`` as (out, in * kh * kw) fp32; valid until the stream moves on."""

    module: str
    shape: tuple[int, ...]
    matrix: torch.Tensor
    sq_norm: float

    @property
    def norm(self) -> float:
        return math.sqrt(self.sq_norm)


def delta_sq_norm(mat: torch.Tensor, key: str, base: tuple[CheckpointReader, torch.Tensor],
                  tuned: tuple[CheckpointReader, torch.Tensor]) -> float:
    """``||dW||_F^2``, doubling as the NaN/Inf check: a non-finite input makes the norm non-finite,
    and only then are the two inputs scanned to name the culprit (a full ``isfinite`` pass on
    every tensor costs as much as the subtraction)."""
    nrm = math.sqrt(sq_norm(mat))   # accurate, see svd.sq_norm
    if not math.isfinite(nrm):
        for reader, tensor in (base, tuned):
            check_finite(key, tensor, reader.path)
        nrm = float(torch.linalg.vector_norm(mat.double()))  # finite inputs: the fp32 sum overflowed
        if not math.isfinite(nrm):
            raise CheckpointError(f"{key}: tuned - base overflows float32")
    sq = nrm * nrm
    if sq == 0.0 and bool(mat.any()):  # subnormal differences underflowed when squared in fp32
        sq = float((mat.double() ** 2).sum())
    return sq


def _itemsize(reader: CheckpointReader, key: str) -> int:
    try:
        return _ITEMSIZE.get(reader.dtype_name(key).upper(), 8)
    except Exception:  # pragma: no cover - unusual readers: be generous
        return 8


class DeltaStream:
    """Iterate :class:`LayerDelta` for ``modules`` (name -> weight shape) in the given order.

    Use as a context manager, or exhaust it; for big models a worker thread reads ``prefetch``
    layers ahead (small ones are read inline, see ``THREAD_MIN_NUMEL``). Each delta's matrix
    is overwritten by the next one.
    Errors from the worker (missing key, NaN, shape mismatch) are raised from the iteration.
    """

    def __init__(self, base: CheckpointReader, tuned: CheckpointReader, modules: Mapping[str, tuple[int, ...]],
                 *, prefix: str = "denoiser.", suffix: str = ".weight", prefetch: int = 2,
                 thread_min_numel: int = THREAD_MIN_NUMEL) -> None:
        self.base, self.tuned = base, tuned
        self.modules = dict(modules)
        self.prefix, self.suffix = prefix, suffix
        self.prefetch = max(1, prefetch)
        self._stop = threading.Event()
        self._out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._free: queue.Queue = queue.Queue()
        self.thread_min_numel = thread_min_numel
        self._thread: threading.Thread | None = None
        self._started = False
        self._mat = self._scratch = torch.empty(0)

    def _key(self, module: str) -> str:
        return self.prefix + module + self.suffix

    # -- worker ----------------------------------------------------------------------------
    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _take_buffer(self) -> torch.Tensor | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _buffers(self) -> None:
        """Allocate the raw read buffers (one pair per layer in flight) and the fp32 ones."""
        numel = max(math.prod(s) for s in self.modules.values())
        nb = max(numel * _itemsize(self.base, self._key(m)) for m in self.modules)
        nt = max(numel * _itemsize(self.tuned, self._key(m)) for m in self.modules)
        for _ in range(self.prefetch + 1):
            self._free.put((torch.empty(nb, dtype=torch.uint8), torch.empty(nt, dtype=torch.uint8)))
        self._mat = torch.empty(numel, dtype=torch.float32)
        self._scratch = torch.empty(numel, dtype=torch.float32)

    def _read(self) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor, torch.Tensor, tuple]]:
        """Raw tensors of each layer, read into a free buffer pair (plain reads: no torch compute)."""
        for module, shape in self.modules.items():
            bufs = self._take_buffer()
            if bufs is None:
                return
            key = self._key(module)
            b = self.base.read(key, bufs[0])
            t = self.tuned.read(key, bufs[1])
            for reader, tensor in ((self.base, b), (self.tuned, t)):
                if tuple(tensor.shape) != tuple(shape):
                    raise ArchitectureError(f"{reader.path}: {key} has shape {tuple(tensor.shape)}, "
                                            f"expected {tuple(shape)}")
            yield module, tuple(shape), b, t, bufs

    def _convert(self, module: str, shape: tuple[int, ...], b: torch.Tensor, t: torch.Tensor) -> LayerDelta:
        """``t - b`` in fp32 into the reused matrix buffer, with the norm / NaN check."""
        key = self._key(module)
        m, n = matrix_shape(shape)
        mat = self._mat[: m * n].view(m, n)
        with single_thread_below(m * n, SMALL_LAYER_NUMEL):
            if b.dtype == torch.float32 and t.dtype == torch.float32:
                torch.sub(t.reshape(m, n), b.reshape(m, n), out=mat)
            else:
                # Both upcast by copy_ first: a mixed-dtype sub_ (fp32 minus bf16) takes torch's
                # slow path, 4x the time of the two vectorised copies and a plain sub_.
                tmp = self._scratch[: m * n].view(m, n)
                tmp.copy_(b.reshape(m, n))
                mat.copy_(t.reshape(m, n))
                mat.sub_(tmp)
            sq = delta_sq_norm(mat, key, (self.base, b), (self.tuned, t))
        return LayerDelta(module, shape, mat, sq)

    def _work(self) -> None:
        try:
            for item in self._read():
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    # -- consumer --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[LayerDelta]:
        if self._started:
            raise RuntimeError("a DeltaStream can be iterated once")
        self._started = True
        if not self.modules:
            return
        self._buffers()
        total = sum(math.prod(s) for s in self.modules.values())
        if total < self.thread_min_numel:
            for module, shape, b, t, bufs in self._read():
                try:
                    yield self._convert(module, shape, b, t)
                finally:
                    self._free.put(bufs)
            return
        self._thread = threading.Thread(target=self._work, name="lbm-delta-reader", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                module, shape, b, t, bufs = item
                try:
                    delta = self._convert(module, shape, b, t)
                finally:
                    self._free.put(bufs)
                yield delta
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> DeltaStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
