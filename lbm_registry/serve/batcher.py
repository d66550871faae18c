"""Micro-batching: one worker thread collects requests for a few ms and runs them in batches.

Requests wait in a bounded queue (full: :class:`OverloadedError`, HTTP 503). The worker takes
the first waiting request, keeps collecting until ``max_batch`` requests or ``max_wait_ms``
have passed, splits what it got by batch key (only requests with the same key can share a
forward pass: same aspect bucket, same number of steps) and hands each part to ``run``.
If a batch raises, its requests are retried one by one, so a bad request fails alone.
``close()`` refuses new requests, lets the worker finish everything queued, then stops it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from lbm_registry.errors import OverloadedError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Job(Generic[T]):
    item: T
    key: Hashable
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher(Generic[T]):
    """``submit(item, key) -> Future``; ``run(items) -> results`` is called on the worker thread."""

    def __init__(self, run: Callable[[Sequence[T]], Sequence[Any]], *, max_batch: int = 8,
                 max_wait_ms: float = 5.0, max_queue: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[Job[T] | None] = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch or (lambda n: None)
        self._closing = threading.Event()
        self._pending: list[Job[T]] = []   # collected but of another key: first in the next round
        self._busy = 0
        self._worker = threading.Thread(target=self._loop, name="lbm-serve-batcher", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self._queue.qsize() + len(self._pending) + self._busy

    def submit(self, item: T, key: Hashable) -> Future:
        if self._closing.is_set():
            raise OverloadedError("the server is shutting down")
        job = Job(item, key)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise OverloadedError(f"the queue is full ({self._queue.maxsize} requests waiting); retry later") from None
        return job.future

    def _collect(self) -> list[Job[T]]:
        jobs = self._pending
        self._pending = []
        if not jobs:
            first = self._queue.get()
            if first is None:
                return []
            jobs = [first]
        deadline = time.perf_counter() + self.max_wait_s
        same = sum(j.key == jobs[0].key for j in jobs)
        while same < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:          # close(): run what we have, see the marker again next round
                self._queue.put_nowait(None)   # room: close() refuses new requests
                break
            jobs.append(job)
            same += job.key == jobs[0].key
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._collect()
            if not jobs:
                if self._closing.is_set() and self._queue.empty() and not self._pending:
                    return
                continue
            key = jobs[0].key
            batch = [j for j in jobs if j.key == key][: self.max_batch]
            chosen = {id(j) for j in batch}
            self._pending = [j for j in jobs if id(j) not in chosen]
            self._busy = len(batch)
            try:
                self._execute(batch)
            finally:
                self._busy = 0

    def _execute(self, batch: list[Job[T]]) -> None:
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        self._on_batch(len(live))
        try:
            results = self._run([j.item for j in live])
        except Exception as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            log.warning("batch of %d failed (%s); retrying its requests one by one", len(live), exc)
            for j in live:
                try:
                    j.future.set_result(self._run([j.item])[0])
                except Exception as one:  # noqa: BLE001  (this request's own failure)
                    j.future.set_exception(one)
            return
        for j, r in zip(live, results, strict=True):
            j.future.set_result(r)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        if self._closing.is_set():
            self._worker.join(timeout)
            return
        self._closing.set()
        while True:
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                if not self._worker.is_alive():
                    break
        self._worker.join(timeout)
