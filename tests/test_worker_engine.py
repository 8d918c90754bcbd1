"""The engine and the batcher in-process, with the real model: the API the benchmark uses
(``Engine.load(...).embed``), and the batcher's order guarantees (fair share, FIFO,
backpressure), observed through the order in which requests finish. No timing is asserted."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from akidb_embed.errors import InvalidInput, ServiceUnavailable
from akidb_embed.models import ModelMetadata
from akidb_embed.worker.batcher import Batcher, Job
from akidb_embed.worker.config import WorkerConfig
from akidb_embed.worker.engine import Engine

MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def engine(metadata: ModelMetadata) -> Engine:
    return Engine.load(WorkerConfig(model_dir=metadata.directory, max_batch_tokens=64))


def test_in_process_engine_embeds_like_the_golden_vectors(
    engine: Engine, golden: dict[str, Any]
) -> None:
    vectors = engine.embed(golden["sentences"])
    expected = np.asarray(golden["embeddings"], dtype=np.float32)
    assert vectors.shape == expected.shape
    assert np.sum(vectors * expected, axis=1).min() >= MIN_COSINE
    lengths = [len(ids) for ids in engine.tokenize(golden["sentences"])]
    assert lengths == golden["token_counts"]


def test_in_process_engine_refuses_overlong_input_without_truncation(
    engine: Engine, golden: dict[str, Any], metadata: ModelMetadata
) -> None:
    long_index = golden["token_counts"].index(metadata.max_tokens)
    with pytest.raises(InvalidInput, match=r"inputs\[1\] has \d+ tokens"):
        engine.embed(["fine", golden["sentences"][long_index]], truncate=False)


class Recorder:
    """Collects the order in which jobs finish."""

    def __init__(self) -> None:
        self.finished: list[int] = []
        self.all_done = threading.Event()
        self.expected = 0
        self._lock = threading.Lock()

    def job(self, engine: Engine, request_id: int, texts: list[str]) -> Job:
        self.expected += 1
        return Job(request_id, engine.tokenize(texts), normalize=True, on_done=self.done)

    def done(self, job: Job) -> None:
        assert job.error is None, job.error
        with self._lock:
            self.finished.append(job.request_id)
            if len(self.finished) == self.expected:
                self.all_done.set()


@pytest.fixture
def batcher(engine: Engine) -> Iterator[Batcher]:
    batcher = Batcher(engine, max_batch_tokens=64, max_pending_texts=10_000)
    yield batcher
    batcher.close()
    assert batcher.join(timeout=120)


def test_small_request_behind_a_huge_one_finishes_first(
    engine: Engine, batcher: Batcher, golden: dict[str, Any], metadata: ModelMetadata
) -> None:
    long_text = golden["sentences"][golden["token_counts"].index(metadata.max_tokens)]
    recorder = Recorder()
    batcher.submit(recorder.job(engine, 1, [long_text] * 12))  # 12 snapshots of 256 tokens
    batcher.submit(recorder.job(engine, 2, ["a small request"]))
    batcher.start()
    assert recorder.all_done.wait(120)
    assert recorder.finished == [2, 1]


def test_query_arriving_behind_a_bulk_of_requests_finishes_first(
    engine: Engine, batcher: Batcher, golden: dict[str, Any]
) -> None:
    # many big requests already queued hold many snapshots of work; in arrival order the query
    # would wait for all of them
    recorder = Recorder()
    for request_id in range(1, 31):
        batcher.submit(recorder.job(engine, request_id, golden["sentences"]))
    assert 30 * sum(golden["token_counts"]) > 10 * batcher.snapshot_tokens
    batcher.submit(recorder.job(engine, 99, ["a search query typed by someone"]))
    batcher.start()
    assert recorder.all_done.wait(300)
    assert recorder.finished[0] == 99


def test_flood_of_later_requests_does_not_starve_an_earlier_one(
    engine: Engine, batcher: Batcher, golden: dict[str, Any]
) -> None:
    # The flood holds many snapshots' worth of short texts, each request smaller than the early
    # one: by size alone the early request's long texts would run last. As the oldest it gets a
    # share of every snapshot, so it finishes while much of the flood still waits.
    longest_first = sorted(golden["sentences"], key=len, reverse=True)
    recorder = Recorder()
    batcher.submit(recorder.job(engine, 0, longest_first[:4]))
    flood = [recorder.job(engine, n, [f"small request number {n}"]) for n in range(1, 3001)]
    assert sum(job.total_tokens for job in flood) > 8 * batcher.snapshot_tokens
    for job in flood:
        batcher.submit(job)
    batcher.start()
    assert recorder.all_done.wait(300)
    assert recorder.finished.index(0) < len(recorder.finished) - 500


def test_reading_pauses_while_too_many_texts_are_pending(
    engine: Engine, golden: dict[str, Any]
) -> None:
    batcher = Batcher(engine, max_batch_tokens=64, max_pending_texts=4)
    events: list[str] = []
    first = Job(1, engine.tokenize(["a"] * 4), True, on_done=lambda job: events.append("done 1"))
    second = Job(2, engine.tokenize(["b"]), True, on_done=lambda job: events.append("done 2"))
    batcher.submit(first)

    def submit_second() -> None:
        batcher.submit(second)
        events.append("submitted 2")

    submitter = threading.Thread(target=submit_second)
    submitter.start()
    submitter.join(0.5)
    assert submitter.is_alive(), "submit returned although max_pending_texts was reached"
    batcher.start()
    submitter.join(120)
    batcher.close()
    assert batcher.join(120)
    assert events == ["done 1", "submitted 2", "done 2"]


def test_query_arriving_during_a_snapshot_runs_between_its_micro_batches(
    engine: Engine, batcher: Batcher, golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # one bulk request that fits one snapshot but takes many runs of max_batch_tokens: a query
    # sent while its first run is under way is answered before the rest of the snapshot
    bulk_texts = golden["sentences"][:12]
    assert sum(golden["token_counts"][:12]) <= batcher.snapshot_tokens
    first_run, query_sent = threading.Event(), threading.Event()
    forward = engine.forward

    def forward_after_the_query(token_ids: Any) -> Any:
        if not first_run.is_set():
            first_run.set()
            query_sent.wait(30)
        return forward(token_ids)

    monkeypatch.setattr(engine, "forward", forward_after_the_query)
    recorder = Recorder()
    bulk = recorder.job(engine, 1, bulk_texts)
    batcher.submit(bulk)
    batcher.start()
    assert first_run.wait(60)
    batcher.submit(recorder.job(engine, 2, ["a search query typed by someone"]))
    query_sent.set()
    assert recorder.all_done.wait(120)
    assert recorder.finished == [2, 1]
    assert bulk.vectors is not None and bulk.vectors.shape == (12, engine.metadata.dimension)


def test_run_now_runs_a_lone_job_in_the_calling_thread_only_when_idle(
    engine: Engine, golden: dict[str, Any]
) -> None:
    batcher = Batcher(engine, max_batch_tokens=64, max_pending_texts=10_000)
    threads: list[str] = []

    def job(request_id: int, texts: list[str]) -> Job:
        def done(finished: Job) -> None:
            threads.append(threading.current_thread().name)

        return Job(request_id, engine.tokenize(texts), normalize=True, on_done=done)

    lone = job(1, ["a search query"])
    assert batcher.run_now(lone)  # the inference thread is not even started
    assert threads == [threading.current_thread().name]
    assert lone.vectors is not None and lone.vectors.shape == (1, engine.metadata.dimension)
    several_runs = job(2, golden["sentences"][:12])
    assert not batcher.run_now(several_runs)
    batcher.submit(several_runs)
    assert not batcher.run_now(job(3, ["another query"]))  # a job is queued: no overtaking
    batcher.close()
    with pytest.raises(ServiceUnavailable):
        batcher.run_now(job(4, ["too late"]))
