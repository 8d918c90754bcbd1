"""``akidb-embed bench --breakdown``: the stages of one lone request (the median over many),
in-process, through raw frames (akidb_embed/bench/raw.py), the Python client and, when cargo is
there, the Rust client, from the worker's own marks (``trace: true``, protocol.md) and the
host's, on the same monotonic clock.

The Python client's stages come from its ``trace`` hook (``RequestTrace``). A worker may read a
frame before its writer has noted the write done (the writer is descheduled between the two):
a write then ends at the worker's read, so no stage is negative. Beside the stages it prints
this machine's floor for any process bridge (floor.py): two bare pipe wake-ups around a model
run's time of busy CPU, and one reply's encoding in a loop against right after a model run, the
factor every Python step of a bridge pays.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from akidb_embed import wire
from akidb_embed.bench.corpus import build_corpus
from akidb_embed.bench.floor import cold_python, wake_up_floor
from akidb_embed.bench.lone import PAUSE_SECONDS
from akidb_embed.bench.raw import start_worker
from akidb_embed.bench.runner import rust_example
from akidb_embed.host_client import RequestTrace
from akidb_embed.models import load_metadata

__all__ = ["BREAKDOWN_CALLS", "STAGES", "run_breakdown"]

BREAKDOWN_CALLS = 200
BREAKDOWN_WARM_UP_CALLS = 10
"""Calls made before each breakdown column's timed ones, and not counted."""


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


def _stage_medians(calls: int, traced_call: Callable[[int], dict[str, float]]) -> dict[str, float]:
    """One breakdown column: each stage's median over ``calls`` timed calls, made after
    ``BREAKDOWN_WARM_UP_CALLS`` that are not counted. ``traced_call(index)`` makes call ``index``
    and returns its stages."""
    rows = [traced_call(index) for index in range(BREAKDOWN_WARM_UP_CALLS + calls)]
    timed = rows[BREAKDOWN_WARM_UP_CALLS:]
    return {name: statistics.median(row[name] for row in timed) for name, _ in STAGES}


def _worker_stages(trace: Mapping[str, int]) -> dict[str, float]:
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


def _pipe_out(decoding: int, trace: Mapping[str, int]) -> float:
    """From the reply's vectors being ready to the host decoding it, less the two encodings
    of a traced reply (one counted as reply_encode_us, the other an artefact of tracing)."""
    return (decoding - trace["pooled"] - 2 * trace["encode_ns"]) / 1000


def _host_row(called: int, mark: RequestTrace, returned: int) -> dict[str, float]:
    """One traced call's stages: the host's marks from ``called`` to ``returned`` around the
    worker's own (``mark.worker``). A write noted done after the worker read the frame ends at
    that read."""
    trace = mark.worker
    written = min(mark.written, trace["read"])
    row = {
        # routing happens after encoding: counted with the submit, not the write
        "client_submit_us": (mark.encoding - called + mark.writing - mark.encoded) / 1000,
        "client_encode_us": (mark.encoded - mark.encoding) / 1000,
        "client_write_us": (written - mark.writing) / 1000,
        "pipe_in_us": (trace["read"] - written) / 1000,
        **_worker_stages(trace),
        "pipe_out_us": _pipe_out(mark.read, trace),
        "client_decode_us": (mark.decoded - mark.read) / 1000,
        "client_deliver_us": (mark.delivered - mark.decoded) / 1000,
        "caller_wakeup_us": (returned - mark.delivered) / 1000,
        "total_us": (returned - called) / 1000,
    }
    row["outside_model_us"] = _outside_model(row)
    return row


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

    def traced_call(index: int) -> dict[str, float]:
        spans.clear()
        called = time.monotonic_ns()
        engine.embed([sentences[index % len(sentences)]])
        total = time.monotonic_ns() - called
        row = {name: 0.0 for name, _ in STAGES}
        row.update({name: span / 1000 for name, span in spans.items()})
        row["total_us"] = total / 1000
        row["queue_us"] = row["total_us"] - sum(span / 1000 for span in spans.values())
        row["outside_model_us"] = row["queue_us"]
        return row

    return _stage_medians(calls, traced_call)


def _python_breakdown(
    model_dir: Path, threads: int, sentences: Sequence[str], calls: int
) -> dict[str, float]:
    from akidb_embed.host_client import EmbeddingClient

    probe = _ClientProbe()
    with EmbeddingClient(model_dir, threads=threads, trace=probe) as client:

        def traced_call(index: int) -> dict[str, float]:
            probe.trace = None
            called = time.monotonic_ns()
            client.embed([sentences[index % len(sentences)]])
            returned = time.monotonic_ns()
            assert probe.trace is not None
            return _host_row(called, probe.trace, returned)

        return _stage_medians(calls, traced_call)


def _raw_breakdown(
    model_dir: Path, threads: int, sentences: Sequence[str], calls: int
) -> dict[str, float]:
    raw = start_worker(model_dir, threads)

    def traced_call(index: int) -> dict[str, float]:
        called = time.monotonic_ns()
        frame = wire.pack({"id": index + 1, "op": "embed", "trace": True,
                           "inputs": [sentences[index % len(sentences)]]})  # fmt: skip
        encoded = time.monotonic_ns()
        raw.send_bytes(frame)
        written = time.monotonic_ns()
        payload = raw.recv_payload()
        decoding = time.monotonic_ns()
        reply = wire.unpack(payload)
        wire.embeddings_from_bytes(reply["embeddings"], tuple(reply["shape"]))
        returned = time.monotonic_ns()
        # Raw frames have no admission, routing or caller to hand the reply to: the client's
        # marks around those steps coincide here, and the steps count 0.
        moments = {"submitted": called, "encoding": called, "encoded": encoded, "writing": encoded,
                   "written": written, "read": decoding, "decoded": returned,
                   "delivered": returned}  # fmt: skip
        mark = RequestTrace(request_id=index + 1, texts=1, worker=reply["trace"], **moments)
        return _host_row(called, mark, returned)

    try:
        return _stage_medians(calls, traced_call)
    finally:
        raw.close()


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
    floor = {"wake_ups_us": wake_up_floor(columns["in-process"]["ort_run_us"] / 1e6, calls)}
    floor.update(cold_python(metadata.directory, threads, calls))
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
