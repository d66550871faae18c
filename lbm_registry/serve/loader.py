"""LoRA loads off the critical path: read, verify and copy a LoRA to the device on a loader thread.

Why: for a new adapter the load, not the compute, is most of a first request's latency (a
rank-32/16 LoRA of the full model is ~180 MB). Loading it where the request arrives meant
reading the file twice (once to hash it, once to parse it), converting it with every core the
batch worker wanted, and, on a GPU, a synchronous copy on the compute stream that queues
behind the running batch and holds up the next one. Here one loader thread per engine:

- reads the file once, hashing each chunk as it lands (the sha256 check of the registry costs
  no second read) into one buffer that is **pinned** when the device is CUDA (only then: pinned
  memory is a scarce, slow-to-allocate resource and buys nothing on CPU);
- parses the LoRA as views of that buffer (:func:`lbm_registry.lora.format.lora_from_bytes`)
  and checks it fits the served denoiser;
- copies it to the device with ``non_blocking`` copies on its **own CUDA stream**, then waits
  for that stream only: the compute stream never waits for a load, so batches whose LoRAs are
  all warm keep running while another LoRA loads;
- runs torch ops on one intra-op thread, so a CPU load disturbs the batch worker little.

The factors' device memory is allocated on the loader's stream. It is freed only when no
reference remains, and a batch keeps references until its images are copied back to the host
(a device sync), so the compute stream is done with a LoRA before its memory can be reused.

The request that needs the LoRA waits for its load (through the cache's per-key gate, so
concurrent requests for one new LoRA share one load); errors of the load (a damaged blob, a LoRA
that does not fit) are raised to that request.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lbm_registry.errors import CheckpointError, RegistryError
from lbm_registry.serve.multilora import LayerFactors, LoRAFactors, factors_from_lora

if TYPE_CHECKING:
    from lbm_registry.lora.format import LoRAFile

CHUNK = 8 * 1024 * 1024


@dataclass
class LoRASource:
    """What a resolver returns for a LoRA reference.

    ``path``: a local file holding exactly the bytes whose sha256 is ``sha256``; the loader reads
    and verifies it in one pass. Without one, ``load()`` reads (and verifies) the file itself.
    """

    ref: str                          # canonical, e.g. ``relight@3``
    sha256: str                       # content address: the cache key
    load: Callable[[], LoRAFile]      # read (and verify) the file; used when there is no ``path``
    size: int = 0
    path: Path | None = None


def read_verified(path: Path, sha256: str, *, pin: bool = False, what: str = "") -> torch.Tensor:
    """The bytes of ``path`` as a flat uint8 tensor (pinned if ``pin``), hashed while read, or
    :class:`RegistryError` when their sha256 is not ``sha256``. Reads regular files straight
    into the final buffer; other files (a pipe) to their end."""
    what = what or str(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as fh:
            st = os.fstat(fh.fileno())
            if stat.S_ISREG(st.st_mode):
                buf = torch.empty(st.st_size, dtype=torch.uint8, pin_memory=pin)
                view = memoryview(buf.numpy())
                done = 0
                while done < st.st_size:
                    got = fh.readinto(view[done:done + CHUNK])
                    if not got:
                        raise CheckpointError(f"{what}: file shrank while being read")
                    h.update(view[done:done + got])
                    done += got
            else:
                data = bytearray()
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    data += chunk
                buf = torch.empty(len(data), dtype=torch.uint8, pin_memory=pin)
                if data:
                    buf.copy_(torch.frombuffer(data, dtype=torch.uint8))
    except OSError as exc:
        raise RegistryError(f"{what}: cannot read its file: {exc.strerror or exc}") from None
    got = h.hexdigest()
    if got != sha256:
        raise RegistryError(f"{what}: its bytes have sha256 {got[:12]}, expected {sha256[:12]} "
                            f"(a damaged blob: run 'lbm-reg doctor')")
    return buf


class LoRALoader:
    """Turns a :class:`LoRASource` into :class:`LoRAFactors` on ``device`` in ``dtype``.

    ``check(lora, source)`` raises when the LoRA does not fit the served model. ``threads``: 1
    (default) loads on a dedicated thread; 0 loads in the calling thread, with the resolver's own
    ``load()`` and a plain copy (how loads ran before; kept for side-by-side benchmarks).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype,
                 check: Callable[[LoRAFile, LoRASource], None] | None = None, *, threads: int = 1) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.check = check or (lambda lora, src: None)
        self.threads = threads
        self.pin = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.pin and threads > 0 else None
        self._pool = (ThreadPoolExecutor(threads, thread_name_prefix="lbm-lora-loader",
                                         initializer=torch.set_num_threads, initargs=(1,))
                      if threads > 0 else None)

    def submit(self, src: LoRASource) -> Future:
        """Start loading ``src``; the Future gives its :class:`LoRAFactors` (or the load's error)."""
        if self._pool is None:
            fut: Future = Future()
            try:
                fut.set_result(self._load(src))
            except BaseException as exc:  # noqa: BLE001  (handed to the caller through the Future)
                fut.set_exception(exc)
            return fut
        return self._pool.submit(self._load, src)

    def load(self, src: LoRASource) -> LoRAFactors:
        """Load ``src`` and wait for it (the calling thread waits; the device's compute does not)."""
        return self.submit(src).result()

    def _load(self, src: LoRASource) -> LoRAFactors:
        """Read (with a loader thread and a file: one pass, hashed as it lands; else the
        resolver's own ``load()``), check, and copy to the device."""
        from lbm_registry.lora.format import lora_from_bytes

        if src.path is not None and self._pool is not None:
            buf = read_verified(Path(src.path), src.sha256, pin=self.pin, what=src.ref)
            lora = lora_from_bytes(buf, src.ref)
        else:
            lora = src.load()
        self.check(lora, src)
        return self._to_device(lora, src.sha256)

    def _to_device(self, lora: LoRAFile, key: str) -> LoRAFactors:
        if self._stream is None:
            return factors_from_lora(lora, key, device=self.device, dtype=self.dtype)
        layers = {}
        with torch.cuda.stream(self._stream):
            for name, layer in lora.layers.items():
                down, up = layer.down, layer.up
                if not down.is_pinned():      # from a resolver's own load(): stage through pinned memory
                    down, up = down.pin_memory(), up.pin_memory()
                layers[name] = LayerFactors(
                    down.to(self.device, non_blocking=True).to(self.dtype).contiguous(),
                    up.to(self.device, non_blocking=True).to(self.dtype).contiguous(), layer.scale)
        self._stream.synchronize()   # this thread waits for its own copies; the compute stream does not
        return LoRAFactors(key=key, layers=layers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
