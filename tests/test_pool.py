"""A pool of workers (``EmbeddingClient(workers=N)``) with the real worker and the real model:
the same vectors as one worker, kill -9 and SIGSTOP of one worker while the others serve, a
worker slot that cannot start, the per-slot restart budget, and close.

Worker processes start through ``fake_workers/gated_worker.py``, a few lines that claim a spawn
number and then ``exec`` the real worker (same pid, same pipes). Spawns from ``first_gated`` on
wait for a gate file first: a test can hold a replacement back for as long as it needs to observe
the pool without it, with no timing involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from supervision_helpers import (
    GUARD_TIMEOUT,
    MIN_COSINE,
    assert_reaped,
    close_under_load,
    min_cosine,
    sentences,
    start_threads,
    wait_until,
)

from akidb_embed.host_client import (
    AsyncEmbeddingClient,
    EmbeddingClient,
    ServiceUnavailable,
)
from akidb_embed.models import ModelMetadata

GATED_WORKER = Path(__file__).parent / "fake_workers" / "gated_worker.py"


class Spawns:
    """The spawn directory and gate of ``GATED_WORKER``."""

    def __init__(self, directory: Path, first_gated: int) -> None:
        self.directory = directory / "spawns"
        self.directory.mkdir()
        self.gate = directory / "gate"
        self.command = [
            sys.executable,
            str(GATED_WORKER),
            str(self.directory),
            str(self.gate),
            str(first_gated),
        ]

    def pool(self, metadata: ModelMetadata, workers: int, **options: Any) -> EmbeddingClient:
        """A pool of one-thread workers started through the gated worker; a start may wait at the
        gate as long as a test holds it."""
        return EmbeddingClient(
            metadata.directory,
            workers=workers,
            threads=1,
            start_timeout=GUARD_TIMEOUT,
            worker_command=self.command,
            **options,
        )

    def open_gate(self) -> None:
        self.gate.touch()

    def pids(self) -> list[int]:
        """The pids the spawns wrote; a spawn stopped between claiming its number and writing
        its pid leaves its file empty."""
        texts = (path.read_text() for path in sorted(self.directory.iterdir()))
        return [int(text) for text in texts if text]


def resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


class Load:
    """``threads`` callers embedding slices of ``texts`` until stopped, each result checked."""

    def __init__(
        self, client: EmbeddingClient, texts: list[str], reference: npt.NDArray[np.float32]
    ) -> None:
        self.client, self.texts, self.reference = client, texts, reference
        self.stop = threading.Event()
        self.checked = 0
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, threads: int) -> None:
        self._threads = start_threads(self._call, threads)

    def _call(self, seed: int) -> None:
        call = 0
        try:
            while not self.stop.is_set():
                start = (seed * 37 + call * 11) % (len(self.texts) - 24)
                size = 1 + (seed + call) % 24
                vectors = self.client.embed(self.texts[start : start + size])
                cosine = min_cosine(vectors, self.reference[start : start + size])
                assert cosine >= MIN_COSINE, (start, size, cosine)
                with self._lock:
                    self.checked += 1
                call += 1
        except BaseException as exc:
            self.failures.append(exc)

    def finish(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(GUARD_TIMEOUT)
        assert not any(thread.is_alive() for thread in self._threads), "a caller never returned"
        assert self.failures == []


# -------------------------------------------------------------------------------- results


def test_pool_of_three_gives_the_vectors_of_one_worker(metadata: ModelMetadata) -> None:
    texts = sentences(300)
    with EmbeddingClient(metadata.directory, threads=1) as single:
        expected = single.embed(texts)

    with EmbeddingClient(metadata.directory, workers=3, threads=1, request_timeout=120.0) as pool:
        whole = pool.embed(texts)  # one call, its chunks spread over the workers
        load = Load(pool, texts, expected)
        load.start(6)
        wait_until(
            lambda: all(w.answered_requests >= 5 for w in pool.stats().workers),
            "every worker to answer",
        )
        load.finish()
        stats = pool.stats()

    assert min_cosine(whole, expected) >= MIN_COSINE
    assert len(stats.workers) == 3
    assert len({worker.pid for worker in stats.workers}) == 3
    assert stats.worker_pid == stats.workers[0].pid
    assert stats.spawns == 3 and stats.restarts == 0
    assert stats.in_flight_texts == 0
    assert all(worker.in_flight_tokens == 0 for worker in stats.workers)


def test_async_pool_gives_the_vectors_of_one_worker(metadata: ModelMetadata) -> None:
    texts = sentences(64)
    with EmbeddingClient(metadata.directory, threads=1) as single:
        expected = single.embed(texts)

    async def scenario() -> list[float]:
        async with AsyncEmbeddingClient(metadata.directory, workers=2, threads=1) as pool:
            assert await pool.health_check() is True

            async def one(index: int) -> float:
                picked = [index % len(texts), (index * 7) % len(texts)]
                vectors = await pool.embed([texts[i] for i in picked])
                return min_cosine(vectors, expected[picked])

            cosines = await asyncio.gather(*(one(index) for index in range(100)))
            assert [worker.index for worker in pool.stats().workers] == [0, 1]
            return cosines

    cosines = asyncio.run(asyncio.wait_for(scenario(), GUARD_TIMEOUT))
    assert min(cosines) >= MIN_COSINE


# -------------------------------------------------------------------------------- faults


def test_killed_pool_worker_loses_nothing_while_the_others_answer(
    metadata: ModelMetadata, tmp_path: Path
) -> None:
    texts = sentences(240)
    spawns = Spawns(tmp_path, first_gated=3)  # the replacement waits for the gate
    with spawns.pool(metadata, workers=3, request_timeout=120.0) as pool:
        reference = pool.embed(texts)
        load = Load(pool, texts, reference)
        load.start(8)
        try:
            wait_until(lambda: pool.stats().workers[1].in_flight_texts > 0, "work on worker 1")
            doomed = pool.stats().workers[1].pid
            assert doomed is not None
            os.kill(doomed, signal.SIGKILL)
            wait_until(lambda: pool.stats().workers[1].spawns == 2, "its replacement to spawn")
            before = [worker.answered_requests for worker in pool.stats().workers]
            wait_until(
                lambda: all(
                    pool.stats().workers[i].answered_requests >= before[i] + 10 for i in (0, 2)
                ),
                "the other workers to answer while it restarts",
            )
            assert pool.stats().workers[1].pid is None  # still held at the gate
        finally:
            spawns.open_gate()
        wait_until(lambda: pool.stats().workers[1].pid is not None, "the replacement")
        checked_before = load.checked
        wait_until(lambda: load.checked >= checked_before + 10, "calls after the restart")
        load.finish()
        stats = pool.stats()

    assert stats.restarts == 1
    assert [worker.restarts for worker in stats.workers] == [0, 1, 0]
    assert stats.workers[1].pid not in (None, doomed)
    assert_reaped(doomed)


def test_stopped_pool_worker_hands_its_requests_to_the_others(
    metadata: ModelMetadata, tmp_path: Path
) -> None:
    spawns = Spawns(tmp_path, first_gated=2)  # the replacement cannot answer for it
    with spawns.pool(metadata, workers=2, request_timeout=5.0, max_attempts=2) as pool:
        expected = pool.embed(["is anybody there?"])
        stopped = pool.stats().workers[0].pid
        assert stopped is not None
        answered_by_other = pool.stats().workers[1].answered_requests
        os.kill(stopped, signal.SIGSTOP)
        try:
            # both idle: the tie goes to slot 0, the stopped worker
            vectors = pool.embed(["is anybody there?"])
            wait_until(lambda: pool.stats().workers[0].spawns == 2, "a replacement to spawn")
            stats = pool.stats()
        finally:
            resume(stopped)
            spawns.open_gate()

    assert min_cosine(vectors, expected) >= MIN_COSINE
    assert stats.resent_requests == 1  # it was on the stopped worker, then moved
    assert stats.workers[1].answered_requests == answered_by_other + 1
    assert stats.workers[0].spawns == 2 and stats.workers[0].pid is None
    assert_reaped(stopped)


def test_query_is_not_queued_behind_a_bulk_call_on_a_busy_worker(
    metadata: ModelMetadata,
) -> None:
    texts = sentences(600)
    with EmbeddingClient(metadata.directory, workers=2, threads=1, request_timeout=600.0) as pool:
        reference = pool.embed(texts)
        stuck = pool.stats().workers[0].pid
        assert stuck is not None
        os.kill(stuck, signal.SIGSTOP)  # slot 0 will hold its share of the bulk call
        bulk: list[npt.NDArray[np.float32]] = []
        bulk_caller = threading.Thread(target=lambda: bulk.append(pool.embed(texts)))
        try:
            bulk_caller.start()
            wait_until(
                lambda: (
                    pool.stats().workers[0].in_flight_texts > 0
                    and pool.stats().workers[1].in_flight_texts == 0
                ),
                "slot 1 done with its share while slot 0 holds its own",
            )
            query = pool.embed(["a query behind the bulk call"])
            stats = pool.stats()
        finally:
            resume(stuck)
        bulk_caller.join(GUARD_TIMEOUT)

    assert query.shape == (1, metadata.dimension)
    assert stats.workers[0].spawns == 1 and stats.resent_requests == 0  # never re-sent
    assert stats.workers[0].in_flight_texts > 0  # the bulk call was still waiting for slot 0
    assert len(bulk) == 1 and min_cosine(bulk[0], reference) >= MIN_COSINE


def test_each_worker_slot_has_its_own_restart_budget(metadata: ModelMetadata) -> None:
    with EmbeddingClient(
        metadata.directory,
        workers=2,
        threads=1,
        restart_limit=0,
        stable_start_time=3600.0,
        request_timeout=120.0,
    ) as pool:
        first = pool.stats().workers[0].pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: pool.stats().workers[0].state == "given up", "slot 0 to give up")
        assert pool.embed(["slot 1 serves on"]).shape[0] == 1

        second = pool.stats().workers[1].pid
        assert second is not None
        os.kill(second, signal.SIGKILL)
        wait_until(lambda: pool.stats().workers[1].state == "given up", "slot 1 to give up")
        with pytest.raises(ServiceUnavailable, match=r"every worker slot gave up.*SIGKILL"):
            pool.embed(["no worker left"])
        assert pool.stats().spawns == 2
    assert_reaped(first)
    assert_reaped(second)


def test_pool_whose_second_worker_cannot_start_fails_with_its_error(
    metadata: ModelMetadata, tmp_path: Path
) -> None:
    spawns = Spawns(tmp_path, first_gated=99)

    with pytest.raises(ServiceUnavailable, match="exited with code 1") as raised:
        EmbeddingClient(
            metadata.directory,
            workers=3,
            threads=1,
            worker_command=spawns.command,
            env={"FAIL_SPAWN": "1"},
        )

    assert "spawn 1: cannot open the accelerator" in raised.value.message
    pids = spawns.pids()
    assert len(pids) >= 2  # started in parallel (a third may be stopped before it counts)
    for pid in pids:
        assert_reaped(pid)


def test_pool_close_under_load_leaves_no_process(metadata: ModelMetadata) -> None:
    pool = EmbeddingClient(
        metadata.directory,
        workers=3,
        threads=1,
        request_timeout=120.0,
        max_in_flight_texts=96,
        worker_args=("--max-texts-per-request", "16"),
    )
    pids = [worker.pid for worker in pool.stats().workers]

    close_under_load(
        pool,
        300,
        lambda: all(w.in_flight_texts > 0 for w in pool.stats().workers),
        "work on every worker",
    )
    for pid in pids:
        assert pid is not None
        assert_reaped(pid)
    assert [worker.state for worker in pool.stats().workers] == ["closed"] * 3
