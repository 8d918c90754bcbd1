"""Supervision with a real worker and the real model: kill -9 under load, a stopped worker, a
missing model, the restart budget, close under load, and a bounded stress run.

Every fault is real (signals to the real worker process). The same logic is tested in
milliseconds against stand-in workers in ``test_host_client_stand_ins.py`` (workers that cannot
start, hangs, crash loops); these tests prove the whole path with the model.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from supervision_helpers import (
    GUARD_TIMEOUT,
    MIN_COSINE,
    assert_reaped,
    call_in_background,
    close_under_load,
    join_all,
    min_cosine,
    sentences,
    start_threads,
    wait_until,
)

from akidb_embed.host_client import (
    BatchEmbeddingRequest,
    EmbeddingClient,
    InvalidInput,
    ModelNotFound,
    RequestTimeout,
    ServiceUnavailable,
)
from akidb_embed.models import ModelMetadata

STRESS_SECONDS = 8.0


def resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


# --------------------------------------------------------------------- deaths and hangs


def test_killed_worker_loses_no_request(metadata: ModelMetadata) -> None:
    texts = sentences(240)
    with EmbeddingClient(metadata.directory, request_timeout=120.0) as client:
        reference = client.embed(texts)  # the same texts without faults
        doomed = client.stats().worker_pid
        assert doomed is not None
        # Stopped first so that the kill is sure to find requests in flight.
        os.kill(doomed, signal.SIGSTOP)
        results: dict[tuple[int, int], npt.NDArray[np.float32]] = {}
        failures: list[BaseException] = []

        def caller(thread_index: int) -> None:
            try:
                for round_index in range(4):
                    start = (thread_index * 40 + round_index * 13) % 200
                    results[(thread_index, start)] = client.embed(texts[start : start + 40])
            except BaseException as exc:
                failures.append(exc)

        threads = start_threads(caller, 6)
        wait_until(lambda: client.stats().in_flight_texts >= 6 * 40, "every caller in flight")
        os.kill(doomed, signal.SIGKILL)
        join_all(threads)

        assert failures == []
        assert len(results) == 6 * 4
        for (_, start), vectors in results.items():
            assert min_cosine(vectors, reference[start : start + 40]) >= MIN_COSINE
        stats = client.stats()
        assert stats.restarts == 1
        assert stats.resent_requests >= 6
        assert stats.worker_pid not in (None, doomed)
        assert_reaped(doomed)


def test_stopped_worker_times_out_and_a_new_one_answers(metadata: ModelMetadata) -> None:
    with EmbeddingClient(metadata.directory, request_timeout=3.0, max_attempts=2) as client:
        expected = client.embed(["is anybody there?"])
        stopped = client.stats().worker_pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        try:
            vectors = client.embed(["is anybody there?"])
        finally:
            resume(stopped)

        assert min_cosine(vectors, expected) >= MIN_COSINE
        stats = client.stats()
        assert stats.spawns == 2
        assert stats.worker_pid not in (None, stopped)
        assert_reaped(stopped)


def test_request_times_out_when_its_attempts_run_out(metadata: ModelMetadata) -> None:
    with EmbeddingClient(metadata.directory, request_timeout=2.0, max_attempts=1) as client:
        stopped = client.stats().worker_pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout, match="no reply"):
                client.embed(["will time out"])
        finally:
            resume(stopped)

        assert client.embed(["the next worker answers"]).shape[0] == 1
        assert_reaped(stopped)


def test_restart_budget_spent_makes_calls_fail_fast(metadata: ModelMetadata) -> None:
    with EmbeddingClient(
        metadata.directory, restart_limit=1, stable_start_time=3600.0, request_timeout=120.0
    ) as client:
        first = client.stats().worker_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: client.stats().worker_pid not in (None, first), "a new worker")
        second = client.stats().worker_pid
        assert second is not None
        assert client.embed(["the replacement works"]).shape[0] == 1

        os.kill(second, signal.SIGKILL)
        wait_until(lambda: client.stats().worker_pid is None, "the death to be noticed")
        with pytest.raises(ServiceUnavailable, match="restart_limit=1"):
            client.embed(["no more workers"])
        with pytest.raises(ServiceUnavailable, match="SIGKILL"):
            client.health_check()
        assert client.stats().spawns == 2
        assert_reaped(first)
        assert_reaped(second)


# -------------------------------------------------------------- workers that cannot start


def test_missing_model_directory_fails_fast_with_the_workers_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"

    with pytest.raises(ModelNotFound, match="no-model-here"):
        EmbeddingClient(missing)


# ----------------------------------------------------------------------------------- close


def test_close_with_requests_in_flight_answers_or_fails_every_caller(
    metadata: ModelMetadata,
) -> None:
    client = EmbeddingClient(
        metadata.directory,
        request_timeout=120.0,
        max_in_flight_texts=64,
        worker_args=("--max-texts-per-request", "32"),
    )
    pid = client.stats().worker_pid
    assert pid is not None

    close_under_load(client, 400, lambda: client.stats().in_flight_texts > 0, "texts in flight")
    assert_reaped(pid)


def test_close_kills_a_stopped_worker_and_fails_its_callers(metadata: ModelMetadata) -> None:
    client = EmbeddingClient(metadata.directory, request_timeout=120.0, close_timeout=1.0)
    pid = client.stats().worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    thread, outcome = call_in_background(client.embed, ServiceUnavailable)
    try:
        wait_until(lambda: client.stats().in_flight_texts > 0, "the call in flight")
        client.close()
    finally:
        resume(pid)
    join_all([thread])

    assert len(outcome) == 1
    assert_reaped(pid)


def test_dropped_client_closes_its_worker(metadata: ModelMetadata) -> None:
    client = EmbeddingClient(metadata.directory)
    pid = client.stats().worker_pid
    assert pid is not None

    del client
    gc.collect()

    assert_reaped(pid)


def test_client_left_open_at_exit_leaves_no_worker_behind(metadata: ModelMetadata) -> None:
    script = (
        "import sys\n"
        "from akidb_embed.host_client import EmbeddingClient\n"
        "client = EmbeddingClient(sys.argv[1])\n"
        "client.embed(['hello'])\n"
        "print(client.stats().worker_pid, flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(metadata.directory)],
        capture_output=True,
        text=True,
        timeout=GUARD_TIMEOUT,
        check=True,
    )
    pid = int(result.stdout.strip())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, f"worker {pid} to end with its host")
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr


# ---------------------------------------------------------------------------------- stress


def test_stress_mixed_calls_with_a_kill_lose_nothing(metadata: ModelMetadata) -> None:
    pool = sentences(300)
    with EmbeddingClient(metadata.directory, request_timeout=120.0) as client:
        reference = client.embed(pool)
        stop_at = time.monotonic() + STRESS_SECONDS
        checked: list[int] = []
        failures: list[BaseException] = []

        def caller(seed: int) -> None:
            chooser = random.Random(seed)
            try:
                while time.monotonic() < stop_at:
                    action = chooser.random()
                    if action < 0.8:
                        picked = chooser.sample(range(len(pool)), chooser.randint(1, 60))
                        request = BatchEmbeddingRequest(None, [pool[i] for i in picked])
                        vectors = client.embed_batch(request).embeddings
                        assert min_cosine(vectors, reference[picked]) >= MIN_COSINE
                        checked.append(len(picked))
                    elif action < 0.9:
                        assert client.health_check() is True
                    else:
                        over_long = BatchEmbeddingRequest(None, ["x " * 600], truncate=False)
                        with pytest.raises(InvalidInput):
                            client.embed_batch(over_long)
            except BaseException as exc:
                failures.append(exc)

        threads = start_threads(caller, 5)
        wait_until(lambda: len(checked) >= 10, "some load")
        victim = client.stats().worker_pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        join_all(threads)

        assert failures == []
        assert client.stats().restarts == 1
        assert len(checked) > 10
        assert_reaped(victim)
