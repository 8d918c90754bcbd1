"""``GET /metrics`` of ``akidb-embed serve``, in the Prometheus text format.

The request series are counted as requests are answered; the worker series (restarts, re-sent
requests, readiness, resident memory) are read from the host client's ``stats()`` when scraped,
so they cannot drift from what the client knows. Each server has its own registry (nothing in
prometheus_client's global one), and model labels take only the ids of served models, so a
request cannot create series.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from akidb_embed.host_client import ClientStats

__all__ = ["CONTENT_TYPE", "Metrics", "ModelSeries"]

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
PREFIX = "akidb_embed"
LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: a lone short query on a CPU takes a few milliseconds, a large batch seconds."""
QUEUE_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class ModelSeries:
    """One served model's request series, bound once (a label lookup per request is not free)."""

    requests: Counter
    texts: Counter
    tokens: Counter
    latency: Histogram
    queue_wait: Histogram
    batch_size: Histogram

    def observe(self, texts: int, tokens: int, seconds: float, queue_seconds: float) -> None:
        """One request answered."""
        self.requests.inc()
        self.texts.inc(texts)
        self.tokens.inc(tokens)
        self.latency.observe(seconds)
        self.queue_wait.observe(queue_seconds)
        self.batch_size.observe(texts)


class Metrics:
    """The server's series and their exposition."""

    def __init__(self, stats: Callable[[], ClientStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
        self._requests = Counter(
            f"{PREFIX}_requests", "Embedding requests answered", ["model"], registry=registry
        )
        self._texts = Counter(f"{PREFIX}_texts", "Texts embedded", ["model"], registry=registry)
        self._tokens = Counter(
            f"{PREFIX}_tokens",
            "Tokens the model ran (special tokens included, after truncation)",
            ["model"],
            registry=registry,
        )
        self._latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Embedding requests answered: from the body read to the reply encoded",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time a request's texts waited in the host client before the last of them was "
            "admitted (max_in_flight_texts full)",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self._batch_size = Histogram(
            f"{PREFIX}_batch_size_texts",
            "Texts per embedding request",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Requests answered with an error, by HTTP status and error code",
            ["status", "code"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight_requests",
            "Embedding requests being answered now",
            registry=registry,
        )
        registry.register(_WorkerCollector(stats))
        self._models: dict[str, ModelSeries] = {}

    def model(self, model: str) -> ModelSeries:
        """The series of a served model (``model`` must be a served id)."""
        series = self._models.get(model)
        if series is None:
            series = self._models[model] = ModelSeries(
                self._requests.labels(model),
                self._texts.labels(model),
                self._tokens.labels(model),
                self._latency.labels(model),
                self._queue_wait.labels(model),
                self._batch_size.labels(model),
            )
        return series

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


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
