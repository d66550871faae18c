"""Thread-count scoping for the many small tensor ops LoRA work is made of.

Why: with two or more OpenMP threads, small ops (a 96 x 96 SVD, a skinny QR, adding a rank-4
delta to a 320 x 320 weight) spend their time in thread barriers. On a 2-core machine with any
other process running they were measured 5-60x slower than single-threaded, and they gain
little from threads on an idle one. Big products keep every thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

LAPACK_PARALLEL_NUMEL = 4_000_000
"""Factorisations (QR, SVD) of matrices smaller than this run on one thread."""
SMALL_LAYER_NUMEL = 262_144
"""Layers smaller than this (512 x 512) are processed entirely on one thread, products included."""


@contextmanager
def single_thread_below(numel: int, threshold: int = LAPACK_PARALLEL_NUMEL) -> Iterator[None]:
    """Run the block on one intra-op thread when ``numel < threshold``, then restore the count.

    ``torch.set_num_threads`` called here applies to the calling thread's parallel regions; the
    previous value is restored on exit (new threads inherit the last value set).
    """
    n = torch.get_num_threads()
    if numel >= threshold or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def one_thread() -> AbstractContextManager[None]:
    """Run the block on one intra-op thread (for code made only of small ops)."""
    return single_thread_below(0, 1)
