"""This machine's floor for any process bridge, printed beside ``bench --breakdown``'s stages:
two bare pipe wake-ups around a model run's time of busy CPU (``wake_up_floor``), and one
reply's encoding in a loop against right after a model run (``cold_python``), the factor every
Python step of a bridge pays."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from akidb_embed import wire

__all__ = ["cold_python", "wake_up_floor"]

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


def wake_up_floor(busy_seconds: float, calls: int) -> float:
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


def cold_python(model_dir: Path, threads: int, calls: int) -> dict[str, float]:
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
