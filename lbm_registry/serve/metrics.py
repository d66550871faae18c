"""Prometheus text exposition for the server, with no client library.

Counters, gauges and histograms with labels, thread-safe, rendered in the text format
Prometheus scrapes (version 0.0.4). Only what ``/metrics`` needs: a dependency for ~80 lines
would be one more thing to pin.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    """A registry of metric families; ``render()`` is the ``/metrics`` body."""

    def __init__(self, prefix: str = "lbm_serve") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}          # name -> (type, help)
        self._values: dict[str, dict[Labels, float]] = {}
        self._hist: dict[str, tuple[Sequence[float], dict[Labels, list[float]]]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def _name(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def counter(self, name: str, help: str) -> None:
        self._help[self._name(name)] = ("counter", help)
        self._values.setdefault(self._name(name), {})

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self._help[self._name(name)] = ("histogram", help)
        self._hist[self._name(name)] = (tuple(buckets), {})

    def gauge(self, name: str, help: str, fn: Callable[[], float]) -> None:
        """A gauge read when rendered (queue depth, cached LoRAs)."""
        self._help[self._name(name)] = ("gauge", help)
        self._gauges[self._name(name)] = fn

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            family = self._values[self._name(name)]
            family[key] = family.get(key, 0.0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        buckets, series = self._hist[self._name(name)]
        with self._lock:
            counts = series.setdefault(key, [0.0] * (len(buckets) + 2))  # buckets..., +Inf, sum
            counts[bisect.bisect_left(buckets, value)] += 1
            counts[-1] += value

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (0 if never incremented), for tests and ``/healthz``."""
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        with self._lock:
            return self._values[self._name(name)].get(key, 0.0)

    def total(self, name: str) -> float:
        with self._lock:
            return sum(self._values[self._name(name)].values())

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                lines.append(f"# HELP {name} {help}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "counter":
                    series = self._values[name] or {(): 0.0}
                    for labels, v in sorted(series.items()):
                        lines.append(f"{name}{_labels(labels)} {_num(v)}")
                elif kind == "gauge":
                    lines.append(f"{name} {_num(self._gauges[name]())}")
                else:
                    buckets, hseries = self._hist[name]
                    for labels, counts in sorted(hseries.items()):
                        cumulative = 0.0
                        for bound, c in zip([*buckets, math.inf], counts[:-1], strict=True):
                            cumulative += c
                            lines.append(f"{name}_bucket{_labels(labels, (('le', _num(bound)),))} {_num(cumulative)}")
                        lines.append(f"{name}_sum{_labels(labels)} {_num(counts[-1])}")
                        lines.append(f"{name}_count{_labels(labels)} {_num(cumulative)}")
        return "\n".join(lines) + "\n"
