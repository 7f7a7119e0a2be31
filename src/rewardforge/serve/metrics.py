"""The server's Prometheus metrics, through ``prometheus_client``.

One registry per server (several apps in one process, as in the tests, keep their counts apart), with
the library's standard process, platform and garbage-collector collectors and its text exposition.
The wrappers keep the calls the server makes (``inc(amount, *labels)``, ``observe(value, *labels)``) and
read values back through the registry (``value``, ``count``) for tests and health checks.
"""

from __future__ import annotations

from typing import Callable, Iterable

import prometheus_client as prom

prom.disable_created_metrics()  # no *_created series: scrapers want the counts, not their creation times

CONTENT_TYPE = prom.CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)


class Counter:
    """A counter with positional label values (``inc(1, "/v1/score", "200")``)."""

    def __init__(self, registry: prom.CollectorRegistry, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.labelnames, self._registry = name, labels, registry
        self._metric = prom.Counter(name.removesuffix("_total"), help, labels, registry=registry)

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        (self._metric.labels(*labels) if self.labelnames else self._metric).inc(amount)

    def value(self, *labels: str) -> float:
        v = self._registry.get_sample_value(self.name, dict(zip(self.labelnames, labels)))
        return float(v or 0.0)


class Histogram:
    def __init__(self, registry: prom.CollectorRegistry, name: str, help: str, buckets: Iterable[float],
                 labels: tuple[str, ...] = ()):
        self.name, self.labelnames, self._registry = name, labels, registry
        self._metric = prom.Histogram(name, help, labels, registry=registry, buckets=tuple(sorted(buckets)))

    def observe(self, value: float, *labels: str) -> None:
        (self._metric.labels(*labels) if self.labelnames else self._metric).observe(value)

    def count(self, *labels: str) -> int:
        v = self._registry.get_sample_value(f"{self.name}_count", dict(zip(self.labelnames, labels)))
        return int(v or 0)


class ServeMetrics:
    """The server's metrics. Gauges are wired to the batcher with :meth:`bind`."""

    def __init__(self):
        r = self.registry = prom.CollectorRegistry()
        for collector in (prom.ProcessCollector, prom.PlatformCollector, prom.GCCollector):
            collector(registry=r)  # process_*, python_info, python_gc_*: what every Prometheus dashboard expects
        self.requests = Counter(r, "rewardforge_requests_total", "HTTP requests by route and status code.", ("route", "status"))
        self.request_latency = Histogram(
            r, "rewardforge_request_latency_seconds", "HTTP request latency by route, from first byte to response.",
            LATENCY_BUCKETS, ("route",),
        )
        self.items = Counter(r, "rewardforge_items_total", "Sequences scored.")
        self.rejected = Counter(r, "rewardforge_rejected_total", "Requests rejected before scoring, by reason.", ("reason",))
        self.normalized = Counter(
            r, "rewardforge_normalized_total", "Items changed by input normalisation (--normalize-inputs), by action: "
            "stripped_padding, stripped_duplicate_lead, added_lead, stripped_eos, added_suffix, rerendered, retokenized.",
            ("action",))
        self.batches = Counter(r, "rewardforge_batches_total", "Forward passes run by the model.")
        self.batch_size = Histogram(r, "rewardforge_batch_size", "Sequences per forward pass.", SIZE_BUCKETS)
        self.batch_tokens = Histogram(r, "rewardforge_batch_padded_tokens", "Padded tokens per forward pass.", TOKEN_BUCKETS)
        self.batch_latency = Histogram(r, "rewardforge_batch_latency_seconds", "Model forward time per batch.", LATENCY_BUCKETS)
        self.queue_wait = Histogram(
            r, "rewardforge_queue_wait_seconds", "Time a sequence waits in the queue before its forward pass.", LATENCY_BUCKETS
        )
        self._gauges: dict[str, Callable[[], float]] = {"queue": lambda: 0, "inflight": lambda: 0}
        prom.Gauge("rewardforge_queue_depth", "Sequences waiting for the model.", registry=r).set_function(
            lambda: float(self._gauges["queue"]()))
        prom.Gauge("rewardforge_inflight_requests", "Requests being scored (queued or running).", registry=r).set_function(
            lambda: float(self._gauges["inflight"]()))

    def bind(self, queue_depth: Callable[[], float], inflight: Callable[[], float]) -> None:
        self._gauges["queue"], self._gauges["inflight"] = queue_depth, inflight

    def render(self) -> str:
        return prom.generate_latest(self.registry).decode("utf-8")
