"""The LoRA cache: factors on the serving device for up to ``max_loras`` LoRAs, LRU, with pins.

Keyed by content (the LoRA file's sha256), so two references to the same bytes (``relight@3``
and ``relight@prod``) share one entry, and an alias that moves to another version simply
misses. Loading (read, sha-verify, copy to the device) happens once per entry, in the thread
that needs it, never in the batch worker; concurrent requests for the same new LoRA wait for
one load. A batch that holds an evicted entry keeps using it (the tensors live until the batch
ends), so eviction never fails a request in flight.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from lbm_registry.errors import LoRAError
from lbm_registry.serve.multilora import LoRAFactors


@dataclass
class CacheEntry:
    key: str
    factors: LoRAFactors
    refs: set[str] = field(default_factory=set)   # the references it was asked for by
    size: int = 0                                   # file size in bytes
    hits: int = 0
    pinned: bool = False
    loaded_at: float = field(default_factory=time.time)
    load_ms: float = 0.0

    def info(self) -> dict:
        return {"ref": sorted(self.refs)[0] if self.refs else self.key, "refs": sorted(self.refs),
                "sha256": self.key, "size": self.size, "bytes_on_device": self.factors.nbytes,
                "hits": self.hits, "pinned": self.pinned, "load_ms": round(self.load_ms, 1)}


class LoRACache:
    """LRU over :class:`LoRAFactors`. ``on_event(name)`` is told hit/miss/eviction (metrics)."""

    def __init__(self, max_loras: int, on_event: Callable[[str], None] | None = None) -> None:
        if max_loras < 1:
            raise LoRAError("--max-loras must be at least 1")
        self.max_loras = max_loras
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._on_event = on_event or (lambda name: None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: str, load: Callable[[], LoRAFactors], *, ref: str | None = None, size: int = 0,
            pin: bool | None = None) -> LoRAFactors:
        """The factors for ``key``, loading them with ``load()`` on a miss. ``pin`` True/False sets it."""
        with self._lock:
            entry = self._touch(key, ref, pin)
            if entry is not None:
                return entry.factors
            if pin:
                self._check_pin_room(ref or key)
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:   # one load per key; others wait here and then hit
            with self._lock:
                entry = self._touch(key, ref, pin)
                if entry is not None:
                    return entry.factors
            self._on_event("miss")
            t0 = time.perf_counter()
            try:
                factors = load()
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            entry = CacheEntry(key, factors, {ref} if ref else set(), size, pinned=bool(pin),
                               load_ms=(time.perf_counter() - t0) * 1000)
            with self._lock:
                if entry.pinned:
                    self._check_pin_room(ref or key)
                self._entries[key] = entry
                self._evict()
            return factors

    def _touch(self, key: str, ref: str | None, pin: bool | None) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if pin and not entry.pinned:
            self._check_pin_room(ref or key)
        self._entries.move_to_end(key)
        entry.hits += 1
        if ref:
            entry.refs.add(ref)
        if pin is not None:
            entry.pinned = pin
        self._on_event("hit")
        return entry

    def _check_pin_room(self, what: str) -> None:
        if self._pinned_count() >= self.max_loras:
            raise LoRAError(f"cannot pin {what}: all {self.max_loras} cache slots are pinned (unpin or unload one)")

    def _pinned_count(self) -> int:
        return sum(e.pinned for e in self._entries.values())

    def _evict(self) -> None:
        while len(self._entries) > self.max_loras:
            victim = next((k for k, e in self._entries.items() if not e.pinned), None)
            if victim is None:
                return
            del self._entries[victim]
            self._on_event("eviction")

    def unload(self, key: str) -> bool:
        """Drop an entry (pinned or not); False if it was not cached."""
        with self._lock:
            return self._entries.pop(key, None) is not None

    def find(self, ref_or_key: str) -> str | None:
        """The key of the entry asked for as ``ref_or_key`` (a reference it served, or a sha prefix)."""
        with self._lock:
            for key, e in self._entries.items():
                if ref_or_key in e.refs or (len(ref_or_key) >= 8 and key.startswith(ref_or_key.removeprefix("sha256:"))):
                    return key
        return None

    def entries(self) -> list[dict]:
        """Most recently used last."""
        with self._lock:
            return [e.info() for e in self._entries.values()]

    def nbytes(self) -> int:
        with self._lock:
            return sum(e.factors.nbytes for e in self._entries.values())
