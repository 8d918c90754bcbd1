"""``akidb-embed bench --sweep``: how the worker fills this machine's cores, in one run.

Rows, all on the same model file and corpus, every one started first, then measured in turn
for ``ROUNDS`` rounds with a pause between any two (so that one row's tail does not weigh on
the next, and load coming and going on a shared machine weighs on all alike); a figure is the
median of its rounds:

    in-process      the engine called directly from this process: one ONNX Runtime session
                    of all the cores' threads, of LONE_QUERY_THREADS and of 1, its callers
                    running concurrently on it (the reference a bridge is held to)
    default         EmbeddingClient() with no settings: workers, lanes and threads as the
                    library sizes them for this machine
    W x L x T       EmbeddingClient(workers=W, lanes=L, threads=T) for a grid that fills the
                    cores (each worker's share of the cores = L + T - 1, cores.size_lanes)

Workloads per row:

    lone            one caller, one short sentence per call: p50 and p99 latency
    16 / 64         that many callers at once, one short sentence per call: requests/s
    bulk            one call over the mixed-length corpus: texts/s
    rss             client rows: the workers' peak resident set, summed (VmHWM)
    min cosine      client rows: the bulk vectors against the in-process ones

Each row is printed with its ratio to the best in-process row (callers), the best client row
(bulk) and the in-process row of the same intra-op threads (lone); everything is written as
JSON. ``--quick`` keeps it under a minute on a 2-core machine (small corpus, few calls).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from akidb_embed.bench.corpus import build_corpus, corpus_digest
from akidb_embed.bench.runner import _single, peak_rss_mb, run_callers
from akidb_embed.cores import LONE_QUERY_THREADS, auto_workers, size_lanes, usable_cores
from akidb_embed.models import load_metadata

__all__ = ["CALLER_COUNTS", "SweepRow", "client_grid", "run_sweep"]

CALLER_COUNTS = (16, 64)
ROUNDS = 3
"""Every row is measured once per round, rows in turn; a figure is the median of its rounds."""
PAUSE_SECONDS = 2.0
"""Between two rows: the previous row's threads go idle and the cores cool down alike."""

EmbedFn = Callable[[Sequence[str]], Any]


@dataclass
class SweepRow:
    """One configuration's figures."""

    name: str
    kind: str
    """``in-process`` or ``client``."""
    workers: int
    lanes: int
    threads: int
    figures: dict[str, float] = field(default_factory=dict)


def client_grid(cores: int) -> list[tuple[int, int, int]]:
    """``(workers, lanes, threads)`` configurations that fill ``cores``: for each worker count
    dividing the cores, each worker's share run at 1, 2, LONE_QUERY_THREADS and all of its
    cores' threads, with the lanes that fill the rest (``size_lanes``)."""
    grid: list[tuple[int, int, int]] = []
    for workers in range(1, cores + 1):
        if cores % workers:
            continue
        share = cores // workers
        for threads in sorted({1, 2, LONE_QUERY_THREADS, share}):
            if threads <= share:
                lanes, threads = size_lanes(share, threads=threads)
                grid.append((workers, lanes, threads))
    return grid


def _callers(embed: EmbedFn, sentences: Sequence[str], callers: int, calls: int) -> float:
    """Requests/s of ``callers`` threads each sending ``calls`` one-sentence calls at once."""

    def caller(index: int) -> None:
        for call in range(calls):
            embed([sentences[(index * 7 + call) % len(sentences)]])

    return callers * calls / run_callers(caller, callers)


def _measure(
    embed: EmbedFn, short: Sequence[str], corpus: Sequence[str], calls: int
) -> tuple[dict[str, float], npt.NDArray[np.float32]]:
    figures: dict[str, float] = {}
    lone = _single(embed, short, calls)
    figures["lone_p50_ms"], figures["lone_p99_ms"] = lone["p50_ms"], lone["p99_ms"]
    for callers in CALLER_COUNTS:
        per_caller = max(2, calls // callers)
        figures[f"x{callers}_requests_per_s"] = _callers(embed, short, callers, per_caller)
    started = time.perf_counter()
    vectors = np.asarray(embed(list(corpus)), dtype=np.float32)
    figures["bulk_texts_per_s"] = len(corpus) / (time.perf_counter() - started)
    return figures, vectors


def _min_cosine(vectors: npt.NDArray[np.float32], reference: npt.NDArray[np.float32]) -> float:
    dots = np.sum(vectors * reference, axis=1)
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    return float(np.min(dots / norms))


def _print_table(rows: list[SweepRow]) -> None:
    in_process = [row for row in rows if row.kind == "in-process"]
    clients = [row for row in rows if row.kind == "client"]
    best = {
        metric: max(row.figures[metric] for row in in_process)
        for metric in (f"x{n}_requests_per_s" for n in CALLER_COUNTS)
    }
    best_bulk = max((row.figures["bulk_texts_per_s"] for row in clients), default=0.0) or 1.0
    lone_by_threads = {row.threads: row.figures["lone_p50_ms"] for row in in_process}
    header = (
        f"{'configuration':<24}{'lone p50':>14}{'lone p99':>10}"
        + "".join(f"{f'{n} callers':>18}" for n in CALLER_COUNTS)
        + f"{'bulk':>18}{'rss MB':>9}{'min cos':>10}"
    )
    print("\n" + header)
    for row in rows:
        figures = row.figures
        same = lone_by_threads.get(row.threads)
        lone_ratio = f"({figures['lone_p50_ms'] / same:.2f}x)" if same else ""
        cells = [f"{figures['lone_p50_ms']:.2f} {lone_ratio}", f"{figures['lone_p99_ms']:.2f}"]
        for n in CALLER_COUNTS:
            value = figures[f"x{n}_requests_per_s"]
            cells.append(f"{value:,.0f} ({value / best[f'x{n}_requests_per_s']:.2f}x)")
        bulk = figures["bulk_texts_per_s"]
        cells.append(f"{bulk:,.0f} ({bulk / best_bulk:.2f}x)")
        cells.append(f"{figures['rss_mb']:.0f}" if "rss_mb" in figures else "-")
        cells.append(f"{figures['min_cosine']:.6f}" if "min_cosine" in figures else "-")
        widths = [14, 10, *([18] * len(CALLER_COUNTS)), 18, 9, 10]
        print(f"{row.name:<24}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    print(
        "\nlone (x): to in-process with the same intra-op threads; callers (x): to the best "
        "in-process row; bulk (x): to the best client row; rss: the workers' peak, summed"
    )


def run_sweep(
    *,
    model_dir: Path | None,
    provider: str,
    output: Path,
    quick: bool = False,
    corpus_size: int = 1000,
    calls: int = 300,
    rounds: int = ROUNDS,
) -> int:
    from akidb_embed.host_client import EmbeddingClient
    from akidb_embed.worker.config import WorkerConfig
    from akidb_embed.worker.engine import Engine

    cores = usable_cores() or os.cpu_count() or 1
    if quick:
        corpus_size, calls, rounds = min(corpus_size, 48), min(calls, 64), 1
    pause = 0.2 if quick else PAUSE_SECONDS
    metadata = load_metadata(model_dir)
    corpus = build_corpus(corpus_size)
    short = [text for text in corpus if len(text) < 120][:50] or corpus[:50]
    default_workers = auto_workers()
    default_lanes, default_threads = size_lanes(cores // default_workers)
    print(
        f"akidb-embed bench --sweep: {metadata.model} on {cores} usable cores, corpus of "
        f"{len(corpus)} texts, {calls} calls per latency workload; the default here is "
        f"{default_workers} worker x {default_lanes} lanes x {default_threads} threads",
        file=sys.stderr,
        flush=True,
    )
    rows: list[SweepRow] = []
    embedders: list[EmbedFn] = []
    with ExitStack() as stack:
        for threads in sorted({cores, min(cores, LONE_QUERY_THREADS), 1}, reverse=True):
            engine = Engine.load(WorkerConfig(threads=threads, lanes=1), metadata.directory)
            rows.append(SweepRow(f"in-process 1 x {threads}", "in-process", 0, 1, threads))
            embedders.append(engine.embed)
        configurations: list[tuple[str, dict[str, Any]]] = [("default", {})]
        for workers, lanes, threads in client_grid(cores):
            name = f"{workers} x {lanes} x {threads}"
            configurations.append((name, {"workers": workers, "lanes": lanes, "threads": threads}))
        clients = []
        for name, settings in configurations:
            client = stack.enter_context(
                EmbeddingClient(metadata.directory, provider=provider, **settings)
            )
            rows.append(
                SweepRow(name, "client", client.config.workers, client.lanes, client.threads)
            )
            embedders.append(client.embed)
            clients.append(client)
        # rounds in turn, so that load coming and going on a shared machine weighs on every
        # row alike; each figure is the median of its rounds
        samples: list[list[dict[str, float]]] = [[] for _ in rows]
        vectors: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)] * len(rows)
        for round_index in range(rounds):
            for index, (row, embed) in enumerate(zip(rows, embedders, strict=True)):
                print(
                    f"  round {round_index + 1}/{rounds}: {row.name}", file=sys.stderr, flush=True
                )
                figures, vectors[index] = _measure(embed, short, corpus, calls)
                samples[index].append(figures)
                time.sleep(pause)
        for row, runs, bulk_vectors in zip(rows, samples, vectors, strict=True):
            row.figures = {
                metric: statistics.median(run[metric] for run in runs) for metric in runs[0]
            }
            if row.kind == "client":
                row.figures["min_cosine"] = _min_cosine(bulk_vectors, vectors[0])
        for row, client in zip(rows[-len(clients) :], clients, strict=True):
            pids = [slot.pid for slot in client.stats().workers if slot.pid is not None]
            row.figures["rss_mb"] = sum(peak_rss_mb(pid) or 0.0 for pid in pids)
    _print_table(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "model": metadata.model,
        "cores": cores,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "corpus_size": len(corpus),
        "corpus_digest": corpus_digest(corpus),
        "calls": calls,
        "rounds": rounds,
        "default": {"workers": default_workers, "lanes": default_lanes, "threads": default_threads},
        "rows": [
            {
                "name": row.name,
                "kind": row.kind,
                "workers": row.workers,
                "lanes": row.lanes,
                "threads": row.threads,
                **row.figures,
            }
            for row in rows
        ],
    }
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {output}")
    return 0
