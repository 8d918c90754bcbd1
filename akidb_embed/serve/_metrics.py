"""``GET /metrics`` of ``akidb-embed serve``, in the Prometheus text format.

The request series are plain counts kept as requests are answered, on the event loop's thread
(every update and every scrape runs there, so nothing needs a lock): a request costs a few
additions, where prometheus_client's own metrics take a lock and a Python call per series and
bucket (4.3 us a request warm against 0.5, and a lone query's Python steps run cold). They and
the worker series (restarts, re-sent requests, readiness, resident memory), read from the host
client's ``stats()``, become metric families only when scraped, so neither can drift. Each
server has its own registry (nothing in prometheus_client's global one), and model labels take
only the ids of served models, so a request cannot create series.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from akidb_embed.host_client import ClientStats

__all__ = ["CONTENT_TYPE", "Histogram", "Metrics", "ModelSeries"]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
PREFIX = "akidb_embed"
LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: a lone short query on a CPU takes a few milliseconds, a large batch seconds."""
QUEUE_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Histogram:
    """Counts of observations per bucket (upper bounds inclusive, as Prometheus's ``le``), the
    last for those above every bound, and their sum."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus's buckets: ``(le, observations <= le)``, ending with ``+Inf``."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return buckets


class ModelSeries:
    """One served model's request series."""

    def __init__(self) -> None:
        self.requests = 0
        self.texts = 0
        self.tokens = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.queue_wait = Histogram(QUEUE_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)

    def observe(self, texts: int, tokens: int, seconds: float, queue_seconds: float) -> None:
        """One request answered."""
        self.requests += 1
        self.texts += texts
        self.tokens += tokens
        self.latency.observe(seconds)
        self.queue_wait.observe(queue_seconds)
        self.batch_size.observe(texts)


_COUNTERS = (
    ("requests", "Embedding requests answered"),
    ("texts", "Texts embedded"),
    ("tokens", "Tokens the model ran (special tokens included, after truncation)"),
)
_HISTOGRAMS = (
    (
        "latency",
        "request_duration_seconds",
        "Embedding requests answered: from the body read to the reply encoded",
    ),
    (
        "queue_wait",
        "queue_wait_seconds",
        "Time a request's texts waited in the host client before the last of them was "
        "admitted (max_in_flight_texts full)",
    ),
    ("batch_size", "batch_size_texts", "Texts per embedding request"),
)


class Metrics:
    """The server's series and their exposition. Updated and read on the event loop only."""

    def __init__(self, stats: Callable[[], ClientStats]) -> None:
        self._models: dict[str, ModelSeries] = {}
        self.errors: dict[tuple[int, str], int] = {}
        """Requests answered with an error, by HTTP status and error code."""
        self.in_flight = 0
        """Embedding requests being answered now."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RequestCollector(self))
        self.registry.register(_WorkerCollector(stats))

    def model(self, model: str) -> ModelSeries:
        """The series of a served model (``model`` must be a served id)."""
        series = self._models.get(model)
        if series is None:
            series = self._models[model] = ModelSeries()
        return series

    def error(self, status: int, code: str) -> None:
        """One request answered with an error."""
        key = (status, code)
        self.errors[key] = self.errors.get(key, 0) + 1

    def models(self) -> dict[str, ModelSeries]:
        return dict(self._models)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    """The request series, from the counts at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        models = self._metrics.models()
        for field, documentation in _COUNTERS:
            counter = CounterMetricFamily(f"{PREFIX}_{field}", documentation, labels=["model"])
            for model, series in models.items():
                counter.add_metric([model], float(getattr(series, field)))
            yield counter
        for field, name, documentation in _HISTOGRAMS:
            family = HistogramMetricFamily(f"{PREFIX}_{name}", documentation, labels=["model"])
            for model, series in models.items():
                histogram: Histogram = getattr(series, field)
                family.add_metric([model], histogram.cumulative(), histogram.sum)
            yield family
        errors = CounterMetricFamily(
            f"{PREFIX}_errors",
            "Requests answered with an error, by HTTP status and error code",
            labels=["status", "code"],
        )
        for (status, code), count in self._metrics.errors.items():
            errors.add_metric([str(status), code], float(count))
        yield errors
        yield GaugeMetricFamily(
            f"{PREFIX}_in_flight_requests",
            "Embedding requests being answered now",
            value=float(self._metrics.in_flight),
        )


def _rss_bytes(pid: int) -> int | None:
    """Resident memory of a live process where /proc tells it (Linux); else None."""
    try:
        resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class _WorkerCollector(Collector):
    """The pool's series, read from the client at each scrape."""

    def __init__(self, stats: Callable[[], ClientStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield CounterMetricFamily(
            f"{PREFIX}_worker_restarts",
            "Workers started to replace a dead or hung one",
            value=stats.restarts,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_resent_requests",
            "Wire requests sent again after their worker died or hung",
            value=stats.resent_requests,
        )
        ready = GaugeMetricFamily(
            f"{PREFIX}_worker_ready", "1 when the worker slot serves", labels=["worker"]
        )
        rss = GaugeMetricFamily(
            f"{PREFIX}_worker_rss_bytes", "Resident memory of the worker process", labels=["worker"]
        )
        for worker in stats.workers:
            slot = str(worker.index)
            ready.add_metric([slot], 1.0 if worker.state == "ready" else 0.0)
            resident = _rss_bytes(worker.pid) if worker.pid is not None else None
            if resident is not None:
                rss.add_metric([slot], float(resident))
        yield ready
        yield rss
