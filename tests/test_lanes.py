"""Lanes: several ONNX Runtime runs at once in one worker, over one session per model.

The sizing rule (akidb_embed/cores.py) and the bench grid are pure; the batcher's lanes run
against the real engine; the client tests spawn real workers with two lanes of one thread each
(the 2-core machine's configuration that runs two micro-batches at once).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from supervision_helpers import (
    MIN_COSINE,
    assert_reaped,
    min_cosine,
    sentences,
    wait_until,
)

from akidb_embed.bench.sweep import client_grid
from akidb_embed.cores import CPUS_PER_WORKER, auto_workers, size_lanes, usable_cores
from akidb_embed.errors import Internal
from akidb_embed.host_client import ClientConfig, EmbeddingClient
from akidb_embed.models import ModelMetadata
from akidb_embed.worker.batcher import MAX_PADDING, Batcher, Job, plan_micro_batches
from akidb_embed.worker.config import WorkerConfig
from akidb_embed.worker.engine import Engine

JOIN_TIMEOUT = 300.0
"""Only a guard against a hang; no test measures time."""


# -------------------------------------------------------------------------- sizing (pure)


def test_default_sizing_fills_the_cores_with_a_few_threads_per_run() -> None:
    assert size_lanes(2) == (1, 2)  # this machine: one lane, as before lanes
    assert size_lanes(4) == (1, 4)
    assert size_lanes(16) == (13, 4)  # 13 runs + 3 shared pool threads = 16 busy threads
    assert size_lanes(16, threads=1) == (16, 1)
    assert size_lanes(16, lanes=4) == (4, 13)
    assert size_lanes(16, lanes=2, threads=2) == (2, 2)  # both given: as given
    assert size_lanes(0) == (1, 0)  # cores unknown: ONNX Runtime chooses, one lane
    assert size_lanes(8, threads=0) == (1, 0)


def test_auto_workers_is_one_per_cpus_per_worker() -> None:
    assert auto_workers(2) == auto_workers(CPUS_PER_WORKER) == 1
    assert auto_workers(CPUS_PER_WORKER + 1) == 2
    assert auto_workers(4 * CPUS_PER_WORKER) == 4


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 16])
def test_every_sweep_configuration_fills_the_cores(cores: int) -> None:
    grid = client_grid(cores)
    assert (1, *size_lanes(cores)) in grid  # the default's shape is among them
    for workers, lanes, threads in grid:
        assert workers * (lanes + threads - 1) == cores


def test_a_pool_tells_each_worker_its_share_of_the_cores() -> None:
    argv = ClientConfig(workers=3, lanes=2).worker_argv()
    assert argv[argv.index("--lanes") + 1] == "2"
    assert argv[argv.index("--pool-workers") + 1] == "3"
    assert "--pool-workers" not in ClientConfig(workers=1).worker_argv()
    with pytest.raises(ValueError, match="lanes"):
        ClientConfig(lanes=0)


def test_micro_batches_are_cut_for_every_lane_when_the_texts_are_few() -> None:
    assert plan_micro_batches([5] * 6, 1000) == [[0, 1, 2, 3, 4, 5]]
    assert plan_micro_batches([5] * 6, 1000, max_rows=3) == [[0, 1, 2], [3, 4, 5]]
    assert plan_micro_batches([9, 5, 7], 1000, max_rows=1) == [[1], [2], [0]]


# ------------------------------------------------------------------ the batcher's lanes


@pytest.fixture(scope="module")
def engine(metadata: ModelMetadata) -> Engine:
    return Engine.load(WorkerConfig(model_dir=metadata.directory, threads=1, lanes=2))


@pytest.fixture
def two_lanes(engine: Engine) -> Iterator[Batcher]:
    batcher = Batcher(engine, max_batch_tokens=256, max_pending_texts=10_000, lanes=2)
    yield batcher
    batcher.close()
    assert batcher.join(JOIN_TIMEOUT)


class Replies:
    """Collects finished jobs; ``wait`` until ``expected`` have come."""

    def __init__(self, expected: int) -> None:
        self.jobs: list[Job] = []
        self._expected = expected
        self._lock = threading.Lock()
        self.all_done = threading.Event()

    def __call__(self, job: Job) -> None:
        with self._lock:
            self.jobs.append(job)
            if len(self.jobs) == self._expected:
                self.all_done.set()


def test_two_lanes_run_two_micro_batches_at_once_and_keep_each_jobs_rows(
    engine: Engine, two_lanes: Batcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first two runs meet at a barrier: with one run at a time the barrier breaks and the
    # job fails; with two lanes both pass it, and the rows still land in their places
    meeting = threading.Barrier(2, timeout=60)
    forward = engine.forward
    runs = 0

    def forward_meeting_the_other_lane(token_ids: Any) -> Any:
        nonlocal runs
        runs += 1
        if runs <= 2:
            meeting.wait()
        return forward(token_ids)

    monkeypatch.setattr(engine, "forward", forward_meeting_the_other_lane)
    texts = sentences(40)
    replies = Replies(1)
    job = Job(1, engine.tokenize(texts), normalize=True, on_done=replies)
    two_lanes.submit(job)
    two_lanes.start()
    assert replies.all_done.wait(JOIN_TIMEOUT)
    assert job.error is None, job.error
    assert job.vectors is not None
    assert runs >= 2
    monkeypatch.setattr(engine, "forward", forward)
    assert min_cosine(job.vectors, engine.embed(texts, normalize=True)) >= MIN_COSINE


def test_a_run_failing_on_one_lane_fails_only_its_request(
    engine: Engine, two_lanes: Batcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = engine.tokenize(["poison pill"])[0]
    forward = engine.forward

    def forward_refusing_the_poison(token_ids: Any) -> Any:
        if any(len(ids) == len(poison) and (ids == poison).all() for ids in token_ids):
            raise RuntimeError("this input breaks the run")
        return forward(token_ids)

    monkeypatch.setattr(engine, "forward", forward_refusing_the_poison)
    replies = Replies(12)
    healthy = [
        Job(n, engine.tokenize(sentences(5 + n)), normalize=True, on_done=replies)
        for n in range(11)
    ]
    bad = Job(99, engine.tokenize(["fine", "poison pill", "fine too"]), True, on_done=replies)
    for job in [*healthy[:5], bad, *healthy[5:]]:
        two_lanes.submit(job)
    two_lanes.start()
    assert replies.all_done.wait(JOIN_TIMEOUT)
    assert isinstance(bad.error, Internal) and "this input breaks the run" in bad.error.message
    assert [job for job in replies.jobs if job.error is not None] == [bad]  # answered once
    for job in healthy:
        assert job.vectors is not None and job.vectors.shape == (job.size, 384)


def test_a_lone_query_runs_where_it_was_read_while_another_lane_thread_reads_on(
    engine: Engine,
) -> None:
    # the reader step runs in whichever lane thread holds the input: it runs the first query
    # itself (run_now), and the second frame is read by another thread meanwhile
    frames = [["the first query"], ["the second query"]]
    first_running, second_read = threading.Event(), threading.Event()
    threads: dict[str, str] = {}
    replies = Replies(2)
    batcher: Batcher

    def on_done(job: Job) -> None:
        threads[f"done {job.request_id}"] = threading.current_thread().name
        replies(job)

    def reader() -> bool:
        if not frames:
            return False
        texts = frames.pop(0)
        request_id = 2 - len(frames)
        threads[f"read {request_id}"] = threading.current_thread().name
        job = Job(request_id, engine.tokenize(texts), True, on_done)
        if request_id == 2:
            second_read.set()
            if not batcher.run_now(job):
                batcher.submit(job)
            return True
        original = engine.forward

        def forward_until_the_next_read(token_ids: Any) -> Any:
            first_running.set()
            assert second_read.wait(60), "nobody read the next frame during the run"
            return original(token_ids)

        engine.forward = forward_until_the_next_read  # type: ignore[method-assign]
        try:
            assert batcher.run_now(job)
        finally:
            del engine.forward
        return True

    batcher = Batcher(engine, max_batch_tokens=256, max_pending_texts=100, lanes=2, reader=reader)
    batcher.start()
    assert replies.all_done.wait(JOIN_TIMEOUT)
    batcher.close()
    assert batcher.join(JOIN_TIMEOUT)
    assert all(job.error is None for job in replies.jobs)
    assert threads["done 1"] == threads["read 1"]  # no hand-over for the lone query
    assert threads["read 2"] != threads["read 1"]  # read during the first query's run


# ------------------------------------------------------------- real workers with lanes


@pytest.fixture(scope="module")
def lanes_client(metadata: ModelMetadata) -> Iterator[EmbeddingClient]:
    with EmbeddingClient(metadata.directory, lanes=2, threads=1, request_timeout=120.0) as client:
        yield client


@pytest.fixture(scope="module")
def one_lane_vectors(metadata: ModelMetadata) -> npt.NDArray[np.float32]:
    with EmbeddingClient(metadata.directory, lanes=1, threads=1) as client:
        return client.embed(sentences(1800))


def test_the_hello_reports_lanes_and_threads(lanes_client: EmbeddingClient) -> None:
    assert (lanes_client.lanes, lanes_client.threads) == (2, 1)


def test_mixed_load_on_two_lanes_gives_the_one_lane_vectors(
    lanes_client: EmbeddingClient, one_lane_vectors: npt.NDArray[np.float32]
) -> None:
    # 16 single-text callers and two 900-text bulk calls at once
    texts = sentences(1800)
    results: dict[str, npt.NDArray[np.float32]] = {}
    failures: list[BaseException] = []

    def bulk(half: int) -> None:
        try:
            results[f"bulk {half}"] = lanes_client.embed(texts[half * 900 : (half + 1) * 900])
        except BaseException as exc:
            failures.append(exc)

    def single(caller: int) -> None:
        try:
            for call in range(6):
                index = (caller * 97 + call * 13) % len(texts)
                results[f"single {index}"] = lanes_client.embed([texts[index]])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=bulk, args=(half,)) for half in (0, 1)]
    threads += [threading.Thread(target=single, args=(caller,)) for caller in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert failures == []
    assert min_cosine(results.pop("bulk 0"), one_lane_vectors[:900]) >= MIN_COSINE
    assert min_cosine(results.pop("bulk 1"), one_lane_vectors[900:]) >= MIN_COSINE
    assert len(results) > 16
    for key, vectors in results.items():
        index = int(key.split()[1])
        assert min_cosine(vectors, one_lane_vectors[index : index + 1]) >= MIN_COSINE


def test_killed_worker_with_busy_lanes_loses_nothing(
    metadata: ModelMetadata, one_lane_vectors: npt.NDArray[np.float32]
) -> None:
    texts = sentences(1800)
    with EmbeddingClient(metadata.directory, lanes=2, threads=1, request_timeout=120.0) as client:
        doomed = client.stats().worker_pid
        assert doomed is not None
        results: dict[int, npt.NDArray[np.float32]] = {}
        failures: list[BaseException] = []

        def caller(index: int) -> None:
            try:
                results[index] = client.embed(texts[index * 300 : (index + 1) * 300])
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=caller, args=(index,)) for index in range(6)]
        for thread in threads:
            thread.start()
        # both lanes are busy once the worker holds more texts than one run's worth
        wait_until(lambda: client.stats().in_flight_texts >= 600, "texts in flight")
        os.kill(doomed, signal.SIGKILL)
        for thread in threads:
            thread.join(JOIN_TIMEOUT)
        assert failures == []
        for index, vectors in results.items():
            expected = one_lane_vectors[index * 300 : (index + 1) * 300]
            assert min_cosine(vectors, expected) >= MIN_COSINE
        assert len(results) == 6
        assert client.stats().restarts == 1
        assert client.lanes == 2  # the replacement has its lanes too
        assert_reaped(doomed)


def test_lanes_come_from_the_environment_too(metadata: ModelMetadata) -> None:
    with EmbeddingClient(metadata.directory, env={"AKIDB_EMBED_LANES": "3"}) as client:
        assert (client.lanes, client.threads) == size_lanes(usable_cores(), lanes=3)


def test_micro_batches_are_cut_before_padding_outweighs_batching() -> None:
    # 3 x 30 padded tokens for 50 real ones is more than MAX_PADDING allows: the long text
    # runs alone; texts of nearly one length still share a run
    assert plan_micro_batches([10, 10, 30], 1000) == [[0, 1], [2]]
    assert plan_micro_batches([12, 10, 11], 1000) == [[1, 2, 0]]
    lengths = [5, 9, 17, 30, 8, 22, 14, 6, 27, 11]
    for batch in plan_micro_batches(lengths, 1000):
        padded = len(batch) * max(lengths[i] for i in batch)
        assert len(batch) == 1 or padded <= MAX_PADDING * sum(lengths[i] for i in batch)
