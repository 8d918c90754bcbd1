"""``akidb-embed bench --pool``: one worker with all the threads against a pool of one-thread
workers, on the same cores, through the client (``EmbeddingClient(workers=N, threads=T)``).

Set-ups, each using every core of this machine (``cores`` = the worker's default thread count),
both started before measuring and measured in turn, workload by workload, for ``ROUNDS``
rounds; each figure is the median of its rounds (on a shared machine, load that comes and goes
then weighs on both set-ups alike):

    1 worker x cores threads    today's default: one ONNX Runtime session, intra-op threads
    cores workers x 1 thread    the pool: one session per core, requests to the least loaded

Workloads (the same texts and calls as ``akidb-embed bench``):

    lone query      one caller, one short text per call: p50/p99 latency
    concurrent      16 callers, one short text per call: requests/s, p50/p99
    bulk            one call over the mixed-length corpus: texts/s

Then a projection, on paper, for bigger machines: the pool's measured throughput per core times
the cores. It assumes what one core does here it does there (no shared memory bandwidth or
frequency limit), so it is an upper bound to check against a measurement on such a machine.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from akidb_embed.bench.corpus import build_corpus
from akidb_embed.bench.runner import CONCURRENT_CALLERS, _bulk, _concurrent, _single
from akidb_embed.models import load_metadata

__all__ = ["PROJECTED_CORES", "ROUNDS", "run_pool_benchmark"]

ROUNDS = 3
PROJECTED_CORES = (8, 32, 64)

Figures = dict[str, float]


def _measure(client: Any, short: list[str], corpus: list[str], calls: int, label: str) -> Figures:
    print(f"  {label}: lone, concurrent, bulk", file=sys.stderr, flush=True)
    lone = _single(client.embed, short, calls)
    concurrent = _concurrent(client.embed, short, calls)
    bulk = _bulk(client.embed, corpus)
    return {
        "lone_p50_ms": lone["p50_ms"],
        "lone_p99_ms": lone["p99_ms"],
        f"x{CONCURRENT_CALLERS}_requests_per_s": concurrent["requests_per_s"],
        f"x{CONCURRENT_CALLERS}_p50_ms": concurrent["p50_ms"],
        f"x{CONCURRENT_CALLERS}_p99_ms": concurrent["p99_ms"],
        "bulk_texts_per_s": bulk["texts_per_s"],
    }


def _print_table(figures: dict[str, Figures]) -> None:
    names = list(figures)
    base = figures[names[0]]
    width = max(len(name) for name in names) + 4
    print(f"\n{'metric':<20}" + "".join(f"{name:>{width}}" for name in names))
    for metric in base:
        cells = [
            f"{figures[name][metric]:.2f} ({figures[name][metric] / base[metric]:.2f}x)"
            for name in names
        ]
        print(f"{metric:<20}" + "".join(f"{cell:>{width}}" for cell in cells))
    print(f"\n(x) = ratio to {names[0]}; *_ms lower is better, *_per_s higher is better")


def _projection(pool: Figures, cores: int) -> dict[str, Figures]:
    per_core = {
        metric: value / cores for metric, value in pool.items() if metric.endswith("_per_s")
    }
    projected = {
        f"{count} cores": {metric: value * count for metric, value in per_core.items()}
        for count in PROJECTED_CORES
    }
    print(f"\nprojection, not measured: {cores}-core pool figures / {cores} x cores")
    print(f"{'cores':<10}" + "".join(f"{metric:>26}" for metric in per_core))
    for label, values in projected.items():
        print(f"{label:<10}" + "".join(f"{values[metric]:>26,.0f}" for metric in per_core))
    return projected


def _load_average() -> tuple[float, float, float] | None:
    """The machine's 1, 5 and 15-minute load averages, where the system tells them: figures
    taken on a shared machine say how busy it was."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def run_pool_benchmark(
    *,
    model_dir: Path | None,
    provider: str,
    cores: int,
    corpus_size: int,
    calls: int,
    output: Path,
    rounds: int = ROUNDS,
) -> int:
    from akidb_embed.host_client import EmbeddingClient

    metadata = load_metadata(model_dir)
    corpus = build_corpus(corpus_size)
    short = [text for text in corpus if len(text) < 120][:50] or corpus[:50]
    print(
        f"akidb-embed bench --pool: {metadata.model} on {cores} cores, {calls} calls per "
        f"latency workload, corpus of {len(corpus)} texts",
        file=sys.stderr,
    )
    setups = {
        f"1 worker x {cores} threads": (1, cores),
        f"{cores} workers x 1 thread": (cores, 1),
    }
    clients = {}
    try:
        for label, (workers, threads) in setups.items():
            clients[label] = EmbeddingClient(
                metadata.directory, workers=workers, threads=threads, provider=provider
            )
        samples: dict[str, list[Figures]] = {label: [] for label in setups}
        for round_index in range(rounds):
            print(f" round {round_index + 1} of {rounds}", file=sys.stderr)
            for label, client in clients.items():
                samples[label].append(_measure(client, short, corpus, calls, label))
    finally:
        for client in clients.values():
            client.close()
    figures = {
        label: {metric: statistics.median(s[metric] for s in runs) for metric in runs[0]}
        for label, runs in samples.items()
    }
    load = _load_average()

    _print_table(figures)
    if load is not None:
        averages = "/".join(f"{value:.1f}" for value in load)
        print(f"load average (1/5/15 min) at the end: {averages} on {cores} cores")
    projected = _projection(figures[list(setups)[-1]], cores)
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "model": metadata.model,
        "cores": cores,
        "corpus_size": len(corpus),
        "calls": calls,
        "rounds": rounds,
        "load_average_1_5_15_min": load,
        "figures": figures,
        "projection_not_measured": projected,
    }
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {output}")
    return 0
