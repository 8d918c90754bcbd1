"""``akidb-embed bench --lone``: one short query at a time, through the bridge and in-process,
compared with and without ``--spin-wait`` in one run:

    in-process   the worker's own engine called directly (the floor)
    python       akidb_embed.host_client.EmbeddingClient -> worker
    raw frames   length-prefixed msgpack on a worker's pipes with no host client (raw.py)
    rust         the Rust crate's client (example ``roundtrip``), when cargo is there

and prints for each: lone-query latency p50/p99 and its overhead over in-process, the p50 of the
first 30 calls after start against steady state, the time to ready, and the 16-way and bulk
throughput ratios. Every workload is measured in blocks, the sides taking turns for ``ROUNDS``
rounds (bulk: ``BULK_ROUNDS``) with ``PAUSE_SECONDS`` between blocks: ONNX Runtime's threads
keep spinning for a while after a run (with ``--spin-wait``) and would steal the next side's
cores, and load that comes and goes then weighs on every side alike. Lone blocks are of
``BLOCK_CALLS`` calls; the throughputs are medians over the blocks.

The stages of one such query are ``--breakdown``'s (breakdown.py).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from akidb_embed.bench.corpus import build_corpus
from akidb_embed.bench.raw import start_worker
from akidb_embed.bench.runner import (
    CONCURRENT_CALLERS,
    _bulk,
    _concurrent,
    rust_example_argv,
)
from akidb_embed.models import load_metadata

__all__ = [
    "BLOCK_CALLS",
    "FIRST_CALLS",
    "PAUSE_SECONDS",
    "ROUNDS",
    "run_lone_benchmark",
]

BLOCK_CALLS = 40
ROUNDS = 5
PAUSE_SECONDS = 0.3
FIRST_CALLS = 30
"""Calls timed right after start, against steady state."""
X16_CALLS = 160
"""Calls of one 16-way block (10 per caller; --quick: 2); the figure is the median of
``ROUNDS`` blocks."""
BULK_ROUNDS = 2
FRESH = "in-process (fresh interpreter)"
"""The side whose ready_s is a fresh interpreter importing and loading the engine."""
EmbedFn = Callable[[Sequence[str]], Any]


def _lone_block(embed: EmbedFn, sentences: Sequence[str], calls: int) -> list[float]:
    samples = []
    for index in range(calls):
        started = time.perf_counter()
        embed([sentences[index % len(sentences)]])
        samples.append((time.perf_counter() - started) * 1000.0)
    return samples


class Side:
    """One way of embedding measured by ``--lone``: started (``ready_s``, then the first
    calls, ``first_ms``) when made, then asked for blocks of workloads in turn with the others.
    """

    name = ""
    ready_s = 0.0
    first_ms: list[float]

    def lone(self, sentences: Sequence[str], calls: int) -> list[float]:
        raise NotImplementedError

    def concurrent(self, sentences: Sequence[str], calls: int) -> float:
        raise NotImplementedError

    def bulk(self, corpus: Sequence[str]) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Embedder(Side):
    """In-process or the Python client: an ``embed`` function called by this process."""

    def __init__(self, name: str, start: Callable[[], Any], sentences: Sequence[str]) -> None:
        self.name = name
        started = time.perf_counter()
        self._embedder = start()
        self.ready_s = time.perf_counter() - started
        self.first_ms = _lone_block(self._embedder.embed, sentences, FIRST_CALLS)

    def lone(self, sentences: Sequence[str], calls: int) -> list[float]:
        return _lone_block(self._embedder.embed, sentences, calls)

    def concurrent(self, sentences: Sequence[str], calls: int) -> float:
        return _concurrent(self._embedder.embed, sentences, calls)["requests_per_s"]

    def bulk(self, corpus: Sequence[str]) -> float:
        return _bulk(self._embedder.embed, corpus)["texts_per_s"]

    def close(self) -> None:
        close = getattr(self._embedder, "close", None)
        if close is not None:
            close()


class _RawFrames(Side):
    name = "raw frames"

    def __init__(self, model_dir: Path, threads: int, spin_wait: bool, sentences: Sequence[str]):
        self._raw = start_worker(model_dir, threads, spin_wait)
        self.ready_s = self._raw.ready_seconds
        self.first_ms = _lone_block(self._raw.embed, sentences, FIRST_CALLS)

    def lone(self, sentences: Sequence[str], calls: int) -> list[float]:
        return _lone_block(self._raw.embed, sentences, calls)

    def concurrent(self, sentences: Sequence[str], calls: int) -> float:
        """16 one-text requests kept in flight by one thread."""
        batches = [[sentences[index % len(sentences)]] for index in range(calls)]
        started = time.perf_counter()
        self._raw.pipelined(batches, CONCURRENT_CALLERS)
        return calls / (time.perf_counter() - started)

    def bulk(self, corpus: Sequence[str]) -> float:
        """The corpus sorted by length, 64 texts a request, 4 requests in flight."""
        ordered = sorted(corpus, key=len)
        batches = [ordered[start : start + 64] for start in range(0, len(ordered), 64)]
        started = time.perf_counter()
        self._raw.pipelined(batches, 4)
        return len(corpus) / (time.perf_counter() - started)

    def close(self) -> None:
        self._raw.close()


class _Rust(Side):
    """The Rust crate's client: its ``roundtrip`` example in ``--serve`` mode, one stdin
    command per block (its start figures are its own: spawn to ready, first 30 calls)."""

    name = "rust"

    def __init__(self, argv: list[str], corpus_file: Path) -> None:
        self._process = subprocess.Popen(
            [*argv, "--serve", "--corpus", str(corpus_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        start = self._answer(None)
        self.ready_s = start["ready_ms"] / 1000.0
        self.first_ms = [start["first_calls_p50_ms"]]

    def _answer(self, command: str | None) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        if command is not None:
            self._process.stdin.write(command + "\n")
            self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the Rust example ended (exit {self._process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def lone(self, sentences: Sequence[str], calls: int) -> list[float]:
        return list(self._answer(f"lone {calls}")["samples_ms"])

    def concurrent(self, sentences: Sequence[str], calls: int) -> float:
        return float(self._answer(f"x16 {calls}")["requests_per_s"])

    def bulk(self, corpus: Sequence[str]) -> float:
        return float(self._answer("bulk")["texts_per_s"])

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=60)


def _pct(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(samples, q))


def _in_process_start(model_dir: Path, threads: int) -> float:
    """Seconds from spawning a fresh interpreter to its engine being loaded (imports, session,
    warm-up): what a host running ONNX Runtime in-process pays to start, measured like the
    worker's spawn to hello."""
    code = (
        "import sys; from akidb_embed.worker.config import WorkerConfig; "
        "from akidb_embed.worker.engine import Engine; "
        f"Engine.load(WorkerConfig(model_dir={str(model_dir)!r}, threads={threads})); "
        "sys.stdout.write('ready\\n'); sys.stdout.flush()"
    )
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    process.stdout.readline()
    elapsed = time.perf_counter() - started
    process.wait(timeout=60)
    return elapsed


def _spin_mode(
    model_dir: Path,
    threads: int,
    spin_wait: bool,
    short: Sequence[str],
    corpus: Sequence[str],
    rounds: int,
    calls: int,
    x16_calls: int,
    rust_argv: list[str] | None,
    corpus_file: Path,
) -> dict[str, dict[str, float]]:
    """Every figure of one spin setting: figures[metric][side]."""
    from akidb_embed.host_client import EmbeddingClient
    from akidb_embed.worker.config import WorkerConfig
    from akidb_embed.worker.engine import Engine

    figures: dict[str, dict[str, float]] = {}

    def put(metric: str, side: str, value: float) -> None:
        figures.setdefault(metric, {})[side] = value

    put("ready_s", FRESH, _in_process_start(model_dir, threads))
    config = WorkerConfig(model_dir=model_dir, threads=threads, spin_wait=spin_wait)
    worker_args = ["--spin-wait"] if spin_wait else []
    starts: list[Callable[[], Side]] = [
        lambda: _Embedder("in-process", lambda: Engine.load(config), short),
        lambda: _Embedder(
            "python",
            lambda: EmbeddingClient(model_dir, threads=threads, worker_args=worker_args),
            short,
        ),
        lambda: _RawFrames(model_dir, threads, spin_wait, short),
    ]
    if rust_argv is not None:
        starts.append(lambda: _Rust(rust_argv + worker_args, corpus_file))
    sides: list[Side] = []
    try:
        for start in starts:  # one at a time: a start is measured on a quiet machine
            time.sleep(PAUSE_SECONDS)
            sides.append(start())
        lone: dict[str, list[float]] = {side.name: [] for side in sides}
        for _ in range(rounds):
            for side in sides:
                time.sleep(PAUSE_SECONDS)
                lone[side.name] += side.lone(short, calls)
        for side in sides:
            put("ready_s", side.name, side.ready_s)
            put("lone_p50_ms", side.name, _pct(lone[side.name], 50))
            put("lone_p99_ms", side.name, _pct(lone[side.name], 99))
            put("first30_p50_ms", side.name, statistics.median(side.first_ms))
        x16: dict[str, list[float]] = {side.name: [] for side in sides}
        for _ in range(rounds):
            for side in sides:
                time.sleep(PAUSE_SECONDS)
                x16[side.name].append(side.concurrent(short, x16_calls))
        bulk: dict[str, list[float]] = {side.name: [] for side in sides}
        for _ in range(min(rounds, BULK_ROUNDS)):
            for side in sides:
                time.sleep(PAUSE_SECONDS)
                bulk[side.name].append(side.bulk(corpus))
        for side in sides:
            put("x16_requests_per_s", side.name, statistics.median(x16[side.name]))
            put("bulk_texts_per_s", side.name, statistics.median(bulk[side.name]))
    finally:
        for side in sides:
            side.close()
    return figures


def _print_lone(title: str, figures: dict[str, dict[str, float]]) -> None:
    sides = list(dict.fromkeys(side for values in figures.values() for side in values))
    print(f"\n{title}")
    rows = [["metric", *sides]]
    base = figures["lone_p50_ms"]["in-process"]
    for metric, values in figures.items():
        row = [metric]
        for side in sides:
            value = values.get(side)
            if value is None:
                row.append("-")
                continue
            text = f"{value:.3f}" if value < 10 else f"{value:,.1f}"
            if metric == "lone_p50_ms" and side != "in-process":
                text += f" ({value - base:+.3f} ms)"
            elif metric == "first30_p50_ms":
                steady = figures["lone_p50_ms"].get(side)
                text += f" ({value / steady:.2f}x steady)" if steady else ""
            elif metric == "ready_s" and not side.startswith("in-process"):
                fresh = values.get(FRESH)
                text += f" ({value - fresh:+.3f} s)" if fresh else ""
            elif metric != "ready_s":
                reference = values.get("in-process")
                text += f" ({value / reference:.2f}x)" if reference else ""
            row.append(text)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def run_lone_benchmark(
    *,
    model_dir: Path | None,
    threads: int,
    corpus_size: int,
    output: Path,
    quick: bool = False,
    rust: bool = True,
) -> int:
    metadata = load_metadata(model_dir)
    corpus = build_corpus(min(corpus_size, 64) if quick else corpus_size)
    short = [text for text in corpus if len(text) < 120][:50] or corpus[:50]
    rounds, calls, x16_calls = (1, 10, 32) if quick else (ROUNDS, BLOCK_CALLS, X16_CALLS)
    print(
        f"akidb-embed bench --lone: {metadata.model}, {threads} threads, lone blocks of {calls} "
        f"calls x {rounds} rounds, {PAUSE_SECONDS} s pauses",
        file=sys.stderr,
    )
    document: dict[str, Any] = {"model": metadata.model, "threads": threads, "modes": {}}
    rust_argv, note = rust_example_argv(metadata.directory, threads, quick)
    document["notes"] = [note]
    with tempfile.TemporaryDirectory() as scratch:
        corpus_file = Path(scratch) / "corpus.json"
        corpus_file.write_text(json.dumps(list(corpus)), encoding="utf-8")
        for spin_wait in (False, True):
            mode = "--spin-wait" if spin_wait else "--no-spin-wait"
            print(f"  {mode}", file=sys.stderr)
            figures = _spin_mode(
                metadata.directory, threads, spin_wait, short, corpus, rounds, calls, x16_calls,
                rust_argv if rust else None, corpus_file,
            )  # fmt: skip
            document["modes"][mode] = figures
            _print_lone(f"lone query, {mode}", figures)
    print(
        "\nlone_p50_ms (+x): overhead over in-process; first30_p50_ms: the first "
        f"{FIRST_CALLS} calls after start against the same side's steady p50; ready_s: "
        "spawn to hello (+x over a fresh interpreter loading the engine in-process); other "
        "(x): ratio to in-process."
    )
    for note in document["notes"]:
        print(f"note: {note}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {output}")
    return 0
