"""Thread-count scoping for the many small tensor ops LoRA work is made of.

Why: with two or more OpenMP threads, small ops (a 96 x 96 SVD, a skinny QR, adding a rank-4
delta to a 320 x 320 weight) spend their time in thread barriers. On a 2-core machine with any
other process running they were measured 5-60x slower than single-threaded, and they gain
little from threads on an idle one. Big products keep every thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

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


def map_layers(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """``fn`` over ``items``, results in order, on one worker thread per intra-op thread with
    every torch op single-threaded (torch releases the GIL inside its kernels).

    Why: per-layer LoRA work is a chain of small factorisations and skinny products that one
    core runs at full speed and two cores barely speed up; two layers at once use both. At most
    ``2 * workers`` results wait to be consumed, so memory stays at a few layers. The previous
    thread count is restored afterwards."""
    n = torch.get_num_threads()
    workers = n if workers is None else workers
    if workers <= 1:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="lora-layers",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
            it = iter(items)
            pending: deque[Future[R]] = deque()
            for item in it:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                result = pending.popleft().result()
                for item in it:
                    pending.append(pool.submit(fn, item))
                    break
                yield result
    finally:
        torch.set_num_threads(n)
