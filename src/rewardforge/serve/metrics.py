"""Prometheus metrics in the text exposition format (version 0.0.4), without extra dependencies.

Counters, gauges and histograms are updated from the event loop and from the model thread, so
every update takes one lock. Label values are escaped as the format requires.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, registry: "Registry", name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help, labels
        self._lock = registry.lock
        registry.metrics.append(self)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        out = self.header()
        values = self._values or ({(): 0.0} if not self.labelnames else {})
        for lv, v in sorted(values.items()):
            out.append(f"{self.name}{_labels(self.labelnames, lv)} {_num(v)}")
        return out


class Gauge(_Metric):
    """A gauge read at scrape time from a callback (queue depth, in-flight requests)."""

    kind = "gauge"

    def __init__(self, registry: "Registry", name: str, help: str, read: Callable[[], float]):
        super().__init__(registry, name, help)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(float(self.read()))}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, registry: "Registry", name: str, help: str, buckets: Iterable[float], labels: tuple[str, ...] = ()):
        super().__init__(registry, name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            s = self._series.get(labels)
            if s is None:
                s = self._series[labels] = [0] * len(self.buckets) + [0.0, 0]
            for i, b in enumerate(self.buckets):
                if value <= b:
                    s[i] += 1
                    break
            s[-2] += value
            s[-1] += 1

    def count(self, *labels: str) -> int:
        with self._lock:
            s = self._series.get(labels)
            return int(s[-1]) if s else 0

    def render(self) -> list[str]:
        out = self.header()
        for lv, s in sorted(self._series.items()):
            cum = 0
            for i, b in enumerate(self.buckets):
                cum += s[i]
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, lv, le)} {cum}")
            le = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.labelnames, lv, le)} {s[-1]}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, lv)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, lv)} {s[-1]}")
        return out


class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            if isinstance(m, Gauge):
                lines += m.render()  # the callback may take other locks; never call it under ours
                continue
            with self.lock:
                lines += m.render()
        return "\n".join(lines) + "\n"


class ServeMetrics:
    """The server's metrics. Gauges are wired to the batcher with :meth:`bind`."""

    def __init__(self):
        r = self.registry = Registry()
        self.requests = Counter(r, "rewardforge_requests_total", "HTTP requests by route and status code.", ("route", "status"))
        self.request_latency = Histogram(
            r, "rewardforge_request_latency_seconds", "HTTP request latency by route, from first byte to response.",
            LATENCY_BUCKETS, ("route",),
        )
        self.items = Counter(r, "rewardforge_items_total", "Sequences scored.")
        self.rejected = Counter(r, "rewardforge_rejected_total", "Requests rejected before scoring, by reason.", ("reason",))
        self.normalized = Counter(
            r, "rewardforge_normalized_total", "Items changed by input normalisation (--normalize-inputs), by action: "
            "stripped_padding, stripped_duplicate_lead, added_lead, stripped_eos, added_suffix, rerendered.", ("action",))
        self.batches = Counter(r, "rewardforge_batches_total", "Forward passes run by the model.")
        self.batch_size = Histogram(r, "rewardforge_batch_size", "Sequences per forward pass.", SIZE_BUCKETS)
        self.batch_tokens = Histogram(r, "rewardforge_batch_padded_tokens", "Padded tokens per forward pass.", TOKEN_BUCKETS)
        self.batch_latency = Histogram(r, "rewardforge_batch_latency_seconds", "Model forward time per batch.", LATENCY_BUCKETS)
        self.queue_wait = Histogram(
            r, "rewardforge_queue_wait_seconds", "Time a sequence waits in the queue before its forward pass.", LATENCY_BUCKETS
        )
        self._gauges: dict[str, Callable[[], float]] = {"queue": lambda: 0, "inflight": lambda: 0}
        Gauge(r, "rewardforge_queue_depth", "Sequences waiting for the model.", lambda: self._gauges["queue"]())
        Gauge(r, "rewardforge_inflight_requests", "Requests being scored (queued or running).", lambda: self._gauges["inflight"]())

    def bind(self, queue_depth: Callable[[], float], inflight: Callable[[], float]) -> None:
        self._gauges["queue"], self._gauges["inflight"] = queue_depth, inflight

    def render(self) -> str:
        return self.registry.render()
