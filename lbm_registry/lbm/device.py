"""Device names checked before anything heavy loads.

``torch.device("tpu")`` and a CUDA run on a machine without a GPU fail deep inside model
loading with a traceback; :func:`check_device` turns both into one line up front. The
spelling is checked without torch; torch is imported only to ask whether CUDA is there.
"""

from __future__ import annotations

import re

from lbm_registry.errors import ConfigError

DEVICE_RE = re.compile(r"auto|cpu|cuda(?::(\d+))?")
DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def check_device(device: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N an existing GPU); returns it stripped/lower-cased."""
    name = str(device).strip().lower()
    m = DEVICE_RE.fullmatch(name)
    if m is None:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N",
                          cli=f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("CUDA is not available here; use device='cpu' (or 'auto')",
                              cli="CUDA is not available here; use --device cpu")
        index = int(m.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"there is no {name} here ({count} CUDA device(s): cuda:0..cuda:{count - 1})")
    return name


def check_dtype(dtype: str) -> str:
    """A compute/storage dtype name we know (``auto`` = bf16 on GPU, fp32 on CPU)."""
    name = str(dtype).strip().lower()
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use auto, fp32, bf16 or fp16",
                          cli=f"unknown --dtype {dtype!r}: use auto, fp32, bf16 or fp16")
    return name


def release_freed_memory() -> bool:
    """Hand memory freed by a dropped model back to the operating system, now.

    glibc keeps freed blocks under its mmap threshold (which grows to 32 MB as large blocks are
    freed) in the process heap: after a full-size model's fp32 layers are released, the process
    still holds ~9 GB that the next step (e.g. the extraction after ``extract --calibrate``)
    cannot give to the page cache it streams from. ``malloc_trim(0)`` returns them. A no-op
    (False) where the C library has no ``malloc_trim`` (musl, macOS, Windows)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))
