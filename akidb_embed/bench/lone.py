"""``akidb-embed bench --lone`` and ``--breakdown``: one short query at a time, through the bridge
and in-process, down to the microsecond.

``--lone`` compares, with and without ``--spin-wait``, in one run:

    in-process   the worker's own engine called directly (the floor)
    python       akidb_embed.host_client.EmbeddingClient -> worker
    raw frames   length-prefixed msgpack written to a worker's stdin by hand (no client)
    rust         the Rust crate's client (example ``roundtrip``), when cargo is there

and prints for each: lone-query latency p50/p99 and its overhead over in-process, the p50 of the
first 30 calls after start against steady state, the time to ready, and the 16-way and bulk
throughput ratios. Every workload is measured in blocks, the sides taking turns for ``ROUNDS``
rounds (bulk: ``BULK_ROUNDS``) with ``PAUSE_SECONDS`` between blocks: ONNX Runtime's threads
keep spinning for a while after a run (with ``--spin-wait``) and would steal the next side's
cores, and load that comes and goes then weighs on every side alike. Lone blocks are of
``BLOCK_CALLS`` calls; the throughputs are medians over the blocks.

``--breakdown`` times the stages of one lone request (the median over many), through the Python
client and raw frames, from the worker's own marks (``trace: true``, protocol.md) and the
host's, on the same monotonic clock. The Python client's stages come from its ``trace`` hook
(``RequestTrace``). Beside the stages it
prints this machine's floor for any process bridge: two bare pipe wake-ups around a model run's
time of busy CPU (``_wake_up_floor``), and one reply's encoding in a loop against right after a
model run (``_cold_python``), the factor every Python step of a bridge pays.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from akidb_embed import wire
from akidb_embed.bench.corpus import build_corpus
from akidb_embed.bench.runner import (
    CONCURRENT_CALLERS,
    _bulk,
    _concurrent,
    rust_example,
    rust_example_argv,
)
from akidb_embed.host_client import RequestTrace
from akidb_embed.models import load_metadata

__all__ = [
    "BLOCK_CALLS",
    "BREAKDOWN_CALLS",
    "FIRST_CALLS",
    "ROUNDS",
    "STAGES",
    "RawWorker",
    "run_breakdown",
    "run_lone_benchmark",
]

BLOCK_CALLS = 40
ROUNDS = 5
PAUSE_SECONDS = 0.3
FIRST_CALLS = 30
"""Calls timed right after start, against steady state."""
BREAKDOWN_CALLS = 200
BREAKDOWN_WARM_UP_CALLS = 10
"""Calls made before each breakdown column's timed ones, and not counted."""
X16_CALLS = 160
"""Calls of one 16-way block (10 per caller); the figure is the median of ``ROUNDS`` blocks."""
BULK_ROUNDS = 2
FRESH = "in-process (fresh interpreter)"
"""The side whose ready_s is a fresh interpreter importing and loading the engine."""
EmbedFn = Callable[[Sequence[str]], Any]


class RawWorker:
    """A worker driven by hand: frames written to its stdin, replies read from its stdout."""

    def __init__(self, model_dir: Path, threads: int, spin_wait: bool) -> None:
        argv = [sys.executable, "-m", "akidb_embed.worker", "--model-dir", str(model_dir),
                "--threads", str(threads)] + (["--spin-wait"] if spin_wait else [])  # fmt: skip
        started = time.perf_counter()
        self._process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        self._stdin = self._process.stdin
        self._replies = wire.FrameReader(cast(BinaryIO, self._process.stdout), 1 << 30)
        hello = self._read()
        self.ready_seconds = time.perf_counter() - started
        if hello.get("ok") is not True:
            raise RuntimeError(f"the worker did not start: {hello}")
        self._ids = itertools.count(1)

    def _read(self) -> dict[str, Any]:
        payload = self._replies.read()
        if payload is None:
            raise RuntimeError("the worker ended")
        return wire.unpack(payload)

    def request(self, inputs: Sequence[str], **fields: Any) -> dict[str, Any]:
        self._stdin.write(wire.pack({"id": next(self._ids), "op": "embed", "inputs": inputs,
                                     **fields}))  # fmt: skip
        self._stdin.flush()
        reply = self._read()
        if reply.get("ok") is not True:
            raise RuntimeError(f"embed failed: {reply}")
        return reply

    def embed(self, texts: Sequence[str]) -> Any:
        reply = self.request(list(texts))
        return wire.embeddings_from_bytes(reply["embeddings"], tuple(reply["shape"]))

    def pipelined(self, batches: Sequence[Sequence[str]], depth: int) -> int:
        """Send ``batches`` as requests with up to ``depth`` in flight; the texts answered."""
        answered = in_flight = 0
        for batch in batches:
            if in_flight == depth:
                answered += self._read()["shape"][0]
                in_flight -= 1
            self._stdin.write(wire.pack({"id": next(self._ids), "op": "embed",
                                         "inputs": list(batch)}))  # fmt: skip
            self._stdin.flush()
            in_flight += 1
        for _ in range(in_flight):
            answered += self._read()["shape"][0]
        return answered

    def close(self) -> None:
        self._stdin.close()
        self._process.wait(timeout=30)


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
        self._raw = RawWorker(model_dir, threads, spin_wait)
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
                x16[side.name].append(side.concurrent(short, X16_CALLS))
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
    rounds, calls = (1, 10) if quick else (ROUNDS, BLOCK_CALLS)
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
                metadata.directory, threads, spin_wait, short, corpus, rounds, calls,
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


# -- the stages of one lone request ----------------------------------------------------------


STAGES = (
    ("client_submit_us", "client: checks, admission, routing"),
    ("client_encode_us", "client: msgpack encode"),
    ("client_write_us", "client: write to the pipe"),
    ("pipe_in_us", "pipe + worker reader wake-up"),
    ("worker_parse_us", "worker: decode + validate"),
    ("tokenize_us", "worker: tokenize"),
    ("queue_us", "worker: queue wait (0 when run at once)"),
    ("ort_run_us", "ONNX Runtime run"),
    ("pool_us", "pooling + normalise"),
    ("reply_encode_us", "worker: reply encode"),
    ("pipe_out_us", "worker write + pipe + client reader wake-up"),
    ("client_decode_us", "client: msgpack decode"),
    ("client_deliver_us", "client: reply to the call's future"),
    ("caller_wakeup_us", "client: caller wakes, builds the response"),
    ("total_us", "round trip"),
    ("outside_model_us", "round trip less tokenize, run and pooling"),
)
MODEL_STAGES = ("tokenize_us", "ort_run_us", "pool_us")
PIPES = ("pipes_and_wakeups_us", "both pipes and wake-ups: pipe_in_us + pipe_out_us")


class _ClientProbe:
    """The Python client's ``trace`` hook for one call at a time: the ``RequestTrace`` of the
    latest reply handed over (the client asks the worker for its marks, ``trace: true``)."""

    def __init__(self) -> None:
        self.trace: RequestTrace | None = None

    def __call__(self, trace: RequestTrace) -> None:
        self.trace = trace


def _stage_medians(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's median over the timed calls of one breakdown column."""
    return {name: statistics.median(row[name] for row in rows) for name, _ in STAGES}


def _worker_stages(trace: dict[str, int]) -> dict[str, float]:
    queued_from = trace.get("queued", trace["tokenized"])
    return {
        "worker_parse_us": (trace["parsed"] - trace["read"]) / 1000,
        "tokenize_us": (trace["tokenized"] - trace["parsed"]) / 1000,
        "queue_us": (trace["started"] - queued_from) / 1000
        + (queued_from - trace["tokenized"]) / 1000,
        "ort_run_us": (trace["ran"] - trace["started"]) / 1000,
        "pool_us": (trace["pooled"] - trace["ran"]) / 1000,
        "reply_encode_us": trace["encode_ns"] / 1000,
    }


def _outside_model(row: dict[str, float]) -> float:
    """A traced call's round trip less the model's stages and tracing's extra reply encoding."""
    return row["total_us"] - sum(row[stage] for stage in MODEL_STAGES) - row["reply_encode_us"]


def _pipe_out(decoding: int, trace: dict[str, int]) -> float:
    """From the reply's vectors being ready to the host decoding it, less the two encodings
    of a traced reply (one counted as reply_encode_us, the other an artefact of tracing)."""
    return (decoding - trace["pooled"] - 2 * trace["encode_ns"]) / 1000


def _in_process_breakdown(
    model_dir: Path, threads: int, sentences: Sequence[str], calls: int
) -> dict[str, float]:
    """The same stages in-process: ``Engine.embed`` with its tokenize, ONNX Runtime run and
    pooling timed; everything else it does counts as ``queue_us`` (planning, result copy)."""
    from akidb_embed.worker.config import WorkerConfig
    from akidb_embed.worker.engine import Engine

    engine = Engine.load(WorkerConfig(model_dir=model_dir, threads=threads))
    spans: dict[str, int] = {}

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic_ns()
            result = function(*args, **kwargs)
            spans[name] = spans.get(name, 0) + time.monotonic_ns() - started
            return result

        return wrapper

    engine.tokenize = timed("tokenize_us", engine.tokenize)  # type: ignore[method-assign]
    engine.forward = timed("ort_run_us", engine.forward)  # type: ignore[method-assign]
    engine.pool = timed("pool_us", engine.pool)  # type: ignore[method-assign]
    rows: list[dict[str, float]] = []
    for index in range(BREAKDOWN_WARM_UP_CALLS + calls):
        spans.clear()
        called = time.monotonic_ns()
        engine.embed([sentences[index % len(sentences)]])
        total = time.monotonic_ns() - called
        row = {name: 0.0 for name, _ in STAGES}
        row.update({name: span / 1000 for name, span in spans.items()})
        row["total_us"] = total / 1000
        row["queue_us"] = row["total_us"] - sum(span / 1000 for span in spans.values())
        row["outside_model_us"] = row["queue_us"]
        if index >= BREAKDOWN_WARM_UP_CALLS:
            rows.append(row)
    return _stage_medians(rows)


def _python_breakdown(
    model_dir: Path, threads: int, sentences: Sequence[str], calls: int
) -> dict[str, float]:
    from akidb_embed.host_client import EmbeddingClient

    probe = _ClientProbe()
    rows: list[dict[str, float]] = []
    with EmbeddingClient(model_dir, threads=threads, trace=probe) as client:
        for index in range(BREAKDOWN_WARM_UP_CALLS + calls):
            probe.trace = None
            called = time.monotonic_ns()
            client.embed([sentences[index % len(sentences)]])
            returned = time.monotonic_ns()
            mark = probe.trace
            assert mark is not None
            trace = mark.worker
            row = {
                # routing happens after encoding: counted with the submit, not the write
                "client_submit_us": (mark.encoding - called + mark.writing - mark.encoded) / 1000,
                "client_encode_us": (mark.encoded - mark.encoding) / 1000,
                "client_write_us": (mark.written - mark.writing) / 1000,
                "pipe_in_us": (trace["read"] - mark.written) / 1000,
                **_worker_stages(trace),
                "pipe_out_us": _pipe_out(mark.read, trace),
                "client_decode_us": (mark.decoded - mark.read) / 1000,
                "client_deliver_us": (mark.delivered - mark.decoded) / 1000,
                "caller_wakeup_us": (returned - mark.delivered) / 1000,
                "total_us": (returned - called) / 1000,
            }
            row["outside_model_us"] = _outside_model(row)
            if index >= BREAKDOWN_WARM_UP_CALLS:
                rows.append(row)
    return _stage_medians(rows)


def _raw_breakdown(
    model_dir: Path, threads: int, sentences: Sequence[str], calls: int
) -> dict[str, float]:
    raw = RawWorker(model_dir, threads, spin_wait=False)
    stdin = raw._stdin
    rows: list[dict[str, float]] = []
    try:
        for index in range(BREAKDOWN_WARM_UP_CALLS + calls):
            called = time.monotonic_ns()
            frame = wire.pack({"id": index + 1, "op": "embed", "trace": True,
                               "inputs": [sentences[index % len(sentences)]]})  # fmt: skip
            encoded = time.monotonic_ns()
            stdin.write(frame)
            stdin.flush()
            written = time.monotonic_ns()
            payload = raw._replies.read()
            decoding = time.monotonic_ns()
            assert payload is not None
            reply = wire.unpack(payload)
            wire.embeddings_from_bytes(reply["embeddings"], tuple(reply["shape"]))
            returned = time.monotonic_ns()
            trace = reply["trace"]
            row = {
                "client_submit_us": 0.0,
                "client_encode_us": (encoded - called) / 1000,
                "client_write_us": (written - encoded) / 1000,
                "pipe_in_us": (trace["read"] - written) / 1000,
                **_worker_stages(trace),
                "pipe_out_us": _pipe_out(decoding, trace),
                "client_decode_us": (returned - decoding) / 1000,
                "client_deliver_us": 0.0,
                "caller_wakeup_us": 0.0,
                "total_us": (returned - called) / 1000,
            }
            row["outside_model_us"] = _outside_model(row)
            if index >= BREAKDOWN_WARM_UP_CALLS:
                rows.append(row)
    finally:
        raw.close()
    return _stage_medians(rows)


_ECHO = """
import os, sys, time
busy = float(sys.argv[1])
while os.read(0, 1):
    end = time.perf_counter() + busy
    while time.perf_counter() < end:
        pass
    os.write(1, b"x")
"""
"""A child that holds each byte it reads for ``busy`` seconds of busy CPU, then echoes it."""


def _wake_up_floor(busy_seconds: float, calls: int) -> float:
    """Median microseconds a byte takes to a child process and back, less the ``busy_seconds``
    the child holds it (one model run): the two pipe wake-ups any process bridge pays on this
    machine, with no bridge code at all."""
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(busy_seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    assert child.stdin is not None and child.stdout is not None
    samples = []
    try:
        for _ in range(calls):
            time.sleep(0.002)  # the child idles between calls, as a worker between queries
            started = time.perf_counter_ns()
            child.stdin.write(b"x")
            child.stdout.read(1)
            samples.append((time.perf_counter_ns() - started) / 1000 - busy_seconds * 1e6)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    return statistics.median(samples)


def _cold_python(model_dir: Path, threads: int, calls: int) -> dict[str, float]:
    """Median microseconds of encoding one reply (msgpack) in a loop and right after a model
    run: every Python step of a bridge runs after a run, its caches emptied by the run."""
    from akidb_embed.worker.config import WorkerConfig
    from akidb_embed.worker.engine import Engine

    engine = Engine.load(WorkerConfig(model_dir=model_dir, threads=threads))
    token_ids = engine.tokenize(["a short query to run between two encodings"])
    vector = engine.run(token_ids, normalize=True)
    reply = {"id": 1, "ok": True, "model": engine.metadata.model, "shape": list(vector.shape),
             "embeddings": wire.embeddings_to_bytes(vector),
             "usage": {"total_tokens": 9, "duration_ms": 6.5}}  # fmt: skip
    timings: dict[str, float] = {}
    for name, after_run in (("encode_warm_us", False), ("encode_after_run_us", True)):
        samples = []
        for _ in range(calls):
            if after_run:
                engine.forward(token_ids)
            started = time.perf_counter_ns()
            wire.pack(reply)
            samples.append((time.perf_counter_ns() - started) / 1000)
        timings[name] = statistics.median(samples)
    return timings


def run_breakdown(
    *, model_dir: Path | None, threads: int, calls: int, output: Path, rust: bool = True
) -> int:
    metadata = load_metadata(model_dir)
    corpus = build_corpus(200)
    short = [text for text in corpus if len(text) < 120][:50] or corpus[:50]
    columns: dict[str, dict[str, float]] = {}
    print(f"akidb-embed bench --breakdown: {calls} lone traced calls per client", file=sys.stderr)
    columns["in-process"] = _in_process_breakdown(metadata.directory, threads, short, calls)
    time.sleep(PAUSE_SECONDS)
    columns["raw frames"] = _raw_breakdown(metadata.directory, threads, short, calls)
    time.sleep(PAUSE_SECONDS)
    columns["python"] = _python_breakdown(metadata.directory, threads, short, calls)
    notes = []
    if rust:
        time.sleep(PAUSE_SECONDS)
        report, note = rust_example(
            metadata.directory, threads, short, calls, False, ["--breakdown", str(calls)]
        )
        notes.append(note)
        if report is not None and "breakdown" in report:
            rust_stages = dict(report["breakdown"])
            # its remainder holds the traced reply's second encoding, as _pipe_out removes
            rust_stages["pipes_and_wakeups_us"] -= rust_stages["reply_encode_us"]
            rust_stages["outside_model_us"] -= rust_stages["reply_encode_us"]
            columns["rust"] = rust_stages
    time.sleep(PAUSE_SECONDS)
    floor = {"wake_ups_us": _wake_up_floor(columns["in-process"]["ort_run_us"] / 1e6, calls)}
    floor.update(_cold_python(metadata.directory, threads, calls))
    for column in columns.values():
        if "pipes_and_wakeups_us" not in column:
            column["pipes_and_wakeups_us"] = column["pipe_in_us"] + column["pipe_out_us"]
    reference = columns["in-process"]["outside_model_us"]
    print("\nmedian microseconds of one lone request's stages (one short sentence)")
    names = list(columns)
    rows = [["stage", *names]]
    for stage, meaning in (*STAGES[:-2], PIPES, *STAGES[-2:]):
        rows.append([f"{stage} ({meaning})"] + [
            f"{columns[name][stage]:,.1f}" if stage in columns[name] else "-" for name in names
        ])  # fmt: skip
    rows.append(["overhead over in-process (outside_model_us difference)"] + [
        f"{columns[name]['outside_model_us'] - reference:+,.1f}" for name in names
    ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print(
        "(each stage is its own median over the calls, so the stages need not add up to the "
        "total; in-process queue_us is everything Engine.embed does besides the three timed "
        "stages. The overhead compares the time outside the model, which the run's own "
        "variation does not blur)"
    )
    print(
        f"this machine's floor: two pipe wake-ups around one model run's time of busy CPU "
        f"(a byte to a child process and back, no bridge code): {floor['wake_ups_us']:,.1f} us; "
        f"encoding one reply: {floor['encode_warm_us']:,.1f} us in a loop, "
        f"{floor['encode_after_run_us']:,.1f} us right after a model run "
        f"({floor['encode_after_run_us'] / floor['encode_warm_us']:.0f}x: the run empties the "
        "caches, so each Python step of a bridge costs that much more)"
    )
    for note in notes:
        print(f"note: {note}")
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {"calls": calls, "stages": columns, "floor": floor}
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {output}")
    return 0
