"""Dynamic batching: the texts of every pending request share ONNX Runtime runs.

::

    reader thread                       inference thread (one)
    -------------                       ----------------------
    run_now(job): the model idle, no    (waits while run_now runs: one run at a time)
      job queued, the job one run's
      worth: run it here, at once, as
      one micro-batch (a lone query:
      no hand-over, nothing to plan)
    otherwise submit(job) --> queue of jobs -> the next model with pending jobs (round-robin),
      (one queue per model;                then its snapshot, up to snapshot_tokens tokens:
       blocks while more than              first the oldest job's next texts (one micro-batch
       max_pending_texts texts             worth), then the jobs with the fewest tokens left
       wait: backpressure)                        |
                                           plan_micro_batches: sort the snapshot by length,
                                           cut under max_batch_tokens padded tokens
                                                  |
                                           engine.forward + engine.pool per micro-batch -->
                                           vectors into jobs
                                                  |
                                           a job whose texts are all done is finished at
                                           once: job.on_done(job) writes its reply

The reader calls ``run_now`` only when no other frame is waiting behind the request, so
requests that arrive together still go through the queue and share runs.

Several models: each has its own queue, and the inference thread takes its snapshots from the
models with pending jobs in turn (round-robin), so one ONNX Runtime run never mixes models and a
flood of requests for one model delays another's by at most one snapshot.

A lone query does not wait for a whole snapshot of a bulk load either: between two
micro-batches of a snapshot, jobs that arrived meanwhile and fit one run (up to one run's worth)
are taken out of their queue and run first (``_take_newcomers``), so such a query waits for one
run, and the snapshot still advances by one run between two such runs.

Fairness within a model: a snapshot is bounded in tokens. The oldest job always gets a
micro-batch worth of its texts into it, so every job advances once it is the oldest and a flood
of later requests cannot starve an earlier one. The rest of the snapshot goes to the jobs with
the fewest tokens left, so a search query arriving behind a bulk load (one huge request or many
big ones) runs in the next snapshot instead of after all of it. Within a snapshot the shortest
texts run first, so small requests answer first.

Failure: an exception inside a run is retried once per request of that micro-batch, so that a
request whose own texts fail gets ``Internal`` (its remaining texts are dropped) and the others
are served; the thread goes on with the next micro-batch. An exception anywhere else in the
thread is a bug: it is logged, ``on_fatal`` is called and the thread ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from akidb_embed.errors import EmbeddingError, Internal, ServiceUnavailable
from akidb_embed.pooling import l2_normalize

if TYPE_CHECKING:  # the engine imports onnxruntime; the batcher itself does not need it
    from akidb_embed.worker.engine import Engine, TokenIds

__all__ = ["SNAPSHOT_BATCHES", "Batcher", "Job", "plan_micro_batches"]

log = logging.getLogger(__name__)

SNAPSHOT_BATCHES = 8
"""A snapshot holds about this many micro-batches of texts (or of the longest texts, if
max_batch_tokens is below max_tokens): enough to sort lengths well, small enough that a request
arriving meanwhile waits at most about one snapshot's run time. Measured on the bench corpus
(1000 mixed texts in requests of 64, 2 cores): padding 1.14x the real tokens at 8 against 1.20x
at 4, worker CPU 8.4-8.9 s against 8.9-9.6 s, and a query sent during the load answered in
about 0.1 s (0.06-0.4 s at 4; 6-10 s when the snapshot was filled in arrival order)."""


def plan_micro_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into micro-batches of similar length.

    Sorting by length keeps padding small; each micro-batch holds as many texts as fit in
    ``max_batch_tokens`` padded tokens (rows x longest row). A text longer than the budget on
    its own still runs, alone, so nothing waits forever.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # ascending order: the text being added is the longest of the batch so far
        if current and (len(current) + 1) * lengths[index] > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@dataclass(eq=False)
class Job:
    """The texts of one request on their way through the model, and what to do when done."""

    request_id: int
    token_ids: list[TokenIds]
    normalize: bool
    on_done: Callable[[Job], None]
    """Called once, from the inference thread, when ``vectors`` or ``error`` is final."""
    received_at: float = field(default_factory=time.perf_counter)
    engine: Engine | None = None
    """The model that runs the texts; None: the batcher's default (first) model."""
    skip_tokens: int = 0
    """Leading tokens of each text that pooling leaves out (a prompt, see Engine.resolve_prompt)."""
    vectors: npt.NDArray[np.float32] | None = None
    error: EmbeddingError | None = None
    scheduled: int = 0
    """Texts handed to a snapshot so far (they are taken in order)."""
    scheduled_tokens: int = 0
    completed: int = 0
    total_tokens: int = field(init=False)
    arrival: int = 0
    """Its place in the order jobs were queued in (set by ``submit``)."""
    trace: dict[str, int] | None = None
    """Stage marks (``time.monotonic_ns()``) when the request asked for them: the batcher adds
    ``queued`` (only if it went through the queue rather than ``run_now``), ``started`` (its
    first run began), ``ran`` (its last ONNX Runtime run returned) and ``pooled`` (its vectors
    are pooled and normalised)."""

    def __post_init__(self) -> None:
        self.total_tokens = sum(len(ids) for ids in self.token_ids)

    @property
    def size(self) -> int:
        return len(self.token_ids)


_SnapshotItem = tuple[Job, int]
"""A text in a snapshot: its job and its index in the job's inputs."""


class Batcher:
    """The queue of jobs and the one thread that runs them through the engine."""

    def __init__(
        self,
        engines: Engine | Sequence[Engine],
        max_batch_tokens: int,
        max_pending_texts: int,
        on_fatal: Callable[[BaseException], None] = lambda exc: None,
    ) -> None:
        models = list(engines) if isinstance(engines, Sequence) else [engines]
        self._default_engine = models[0]
        self.max_batch_tokens = max_batch_tokens
        self.max_pending_texts = max_pending_texts
        # never smaller than a few of the longest texts, or one text could fill a snapshot alone
        longest = max(engine.metadata.max_tokens for engine in models)
        self.snapshot_tokens = SNAPSHOT_BATCHES * max(max_batch_tokens, longest)
        self._on_fatal = on_fatal
        self._changed = threading.Condition()
        self._queues: dict[Engine, deque[Job]] = {engine: deque() for engine in models}
        self._turn = 0
        """Index (into the models) of the next model to take a snapshot from."""
        self._pending_texts = 0
        self._closed = False
        self._running = False
        """A snapshot is being run, by the inference thread or by ``run_now``'s caller."""
        self._arrivals = 0
        """Jobs queued so far: the next one's ``arrival``."""
        self._thread = threading.Thread(target=self._serve, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; blocks while too many texts wait (the caller stops reading input).
        Raises ``ServiceUnavailable`` once the batcher is closed."""
        with self._changed:
            while (
                not self._closed
                and self._pending_texts > 0
                and self._pending_texts + job.size > self.max_pending_texts
            ):
                self._changed.wait()
            self._queues[self._accept_locked(job)].append(job)
            job.arrival = self._arrivals
            self._arrivals += 1
            if job.trace is not None:
                job.trace["queued"] = time.monotonic_ns()
            self._changed.notify_all()

    def run_now(self, job: Job) -> bool:
        """Run ``job`` in the calling thread if the model is idle and it fits in one run (a lone
        query: no hand-over to the inference thread, no wait for its wake-up); False, and
        nothing done, otherwise (then ``submit`` it). Raises ``ServiceUnavailable`` once the
        batcher is closed."""
        if not self._fits_one_run(job):
            return False  # several runs: the queue keeps a later request from waiting for all
        with self._changed:
            if not self._closed and (self._running or any(self._queues.values())):
                return False
            self._accept_locked(job)  # raises once closed
            self._running = True
            job.scheduled, job.scheduled_tokens = job.size, job.total_tokens
        try:
            # one micro-batch, no snapshot to plan: the fewest steps between frame and reply
            self._run_micro_batch([(job, index) for index in range(job.size)])
        finally:
            with self._changed:
                self._pending_texts -= job.size
                self._running = False
                self._changed.notify_all()
        return True

    def _accept_locked(self, job: Job) -> Engine:
        """Count ``job`` as pending (lock held); returns its model's engine."""
        if self._closed:
            raise ServiceUnavailable("the worker is shutting down")
        engine = job.engine = job.engine or self._default_engine
        self._pending_texts += job.size
        return engine

    def close(self) -> None:
        """Accept no more jobs; the thread finishes the queued ones, then ends."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; ``True`` if it has (or never started)."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def pending_texts(self) -> int:
        return self._pending_texts

    def _serve(self) -> None:
        try:
            while True:
                with self._changed:
                    while True:  # never while run_now runs a snapshot: one run at a time
                        queue = None if self._running else self._next_queue()
                        if queue or (self._closed and not self._running):
                            break
                        self._changed.wait()
                    if not queue:
                        return
                    snapshot = self._take_snapshot(queue)
                    self._running = True
                self._run_and_release(snapshot)
        except BaseException as exc:  # a bug: report it rather than leave requests hanging
            log.exception("inference thread failed")
            self._on_fatal(exc)

    def _run_and_release(self, snapshot: list[_SnapshotItem]) -> None:
        """Run ``snapshot``, whose caller set ``_running`` under the lock; clear it after."""
        try:
            self._run_snapshot(snapshot)
        finally:
            with self._changed:
                self._running = False
                self._changed.notify_all()

    def _next_queue(self) -> deque[Job] | None:
        """The queue of the next model with pending jobs, round-robin (lock held); None if all
        are empty."""
        queues = list(self._queues.values())
        for step in range(len(queues)):
            position = (self._turn + step) % len(queues)
            if queues[position]:
                self._turn = position + 1
                return queues[position]
        return None

    def _take_snapshot(self, queue: deque[Job]) -> list[_SnapshotItem]:
        """The next texts to run from one model's ``queue`` (called with the lock held); fully
        taken jobs leave the queue."""
        snapshot: list[_SnapshotItem] = []
        budget = self.snapshot_tokens

        def take(job: Job, limit: int) -> None:
            nonlocal budget
            taken = 0
            while budget > 0 and taken < limit and job.scheduled < job.size:
                length = len(job.token_ids[job.scheduled])
                snapshot.append((job, job.scheduled))
                job.scheduled += 1
                job.scheduled_tokens += length
                taken += length
                budget -= length

        take(queue[0], self.max_batch_tokens)
        # sorted() is stable: among jobs of equal size the older goes first
        for job in sorted(queue, key=lambda job: job.total_tokens - job.scheduled_tokens):
            if budget <= 0:
                break
            take(job, budget)
        remaining = [job for job in queue if job.scheduled < job.size]
        queue.clear()
        queue.extend(remaining)
        return snapshot

    def _run_snapshot(self, snapshot: list[_SnapshotItem]) -> None:
        lengths = [len(job.token_ids[index]) for job, index in snapshot]
        batches = plan_micro_batches(lengths, self.max_batch_tokens)
        horizon = self._arrivals  # jobs submitted from now on are newcomers to this snapshot
        for number, batch in enumerate(batches, 1):
            items = [snapshot[position] for position in batch]
            live = [(job, index) for job, index in items if job.error is None]
            if live:
                self._run_micro_batch(live)
            with self._changed:
                self._pending_texts -= len(items)
                self._changed.notify_all()
                newcomers = self._take_newcomers(horizon) if number < len(batches) else None
            if newcomers:
                horizon = self._arrivals
                self._run_snapshot(newcomers)

    def _fits_one_run(self, job: Job) -> bool:
        return job.size * max(len(ids) for ids in job.token_ids) <= self.max_batch_tokens

    def _take_newcomers(self, horizon: int) -> list[_SnapshotItem]:
        """Jobs submitted since ``horizon`` that fit one run (lone queries), taken from one
        model's queue (lock held) up to one run of ``max_batch_tokens``, oldest first: they run
        between the micro-batches of the snapshot under way, so such a query waits for one run
        of a bulk load, not for all of its snapshot, and the snapshot still advances by one
        run between two such runs."""
        for queue in self._queues.values():
            taken: list[Job] = []
            rows = longest = 0
            for job in queue:
                if job.arrival < horizon or job.scheduled or not self._fits_one_run(job):
                    continue
                job_longest = max(longest, *(len(ids) for ids in job.token_ids))
                if taken and (rows + job.size) * job_longest > self.max_batch_tokens:
                    break
                taken.append(job)
                rows, longest = rows + job.size, job_longest
            if not taken:
                continue
            remaining = [job for job in queue if job not in taken]
            queue.clear()
            queue.extend(remaining)
            group: list[_SnapshotItem] = []
            for job in taken:
                job.scheduled, job.scheduled_tokens = job.size, job.total_tokens
                group += [(job, index) for index in range(job.size)]
            return group
        return []

    def _run_micro_batch(self, items: list[_SnapshotItem]) -> None:
        engine = items[0][0].engine
        assert engine is not None  # set by submit; a snapshot holds one model's jobs
        traced = [job.trace for job, _ in items if job.trace is not None]
        started = time.monotonic_ns()
        for trace in traced:
            trace.setdefault("started", started)
        try:
            hidden, attention_mask = engine.forward([job.token_ids[index] for job, index in items])
            ran = time.monotonic_ns()
            for trace in traced:
                trace["ran"] = ran
            first = items[0][0]
            # a whole job in its own order (a lone query): its vectors are the run's, pooled
            # and normalised in one go; otherwise rows are copied into each job's array
            whole = len(items) == first.size and all(
                job is first and index == row for row, (job, index) in enumerate(items)
            )
            skips = [job.skip_tokens for job, _ in items]
            vectors = engine.pool(hidden, attention_mask, skips, whole and first.normalize)
        except Exception as exc:  # one bad run fails its requests, not the worker
            jobs = list(dict.fromkeys(job for job, _ in items))
            if len(jobs) > 1:
                # run each request's share alone, so that one poisonous input fails only its
                # own request and not the others that happened to share the batch
                log.warning("inference failed (%s); retrying its %d requests apart", exc, len(jobs))
                for job in jobs:
                    self._run_micro_batch([item for item in items if item[0] is job])
                return
            log.exception("inference failed for request %s", jobs[0].request_id)
            self._fail(jobs[0], Internal(f"inference failed: {type(exc).__name__}: {exc}"))
            return
        if whole:
            first.vectors, first.completed = vectors, first.size
            self._finished(first)
            return
        for row, (job, index) in enumerate(items):
            if job.vectors is None:
                job.vectors = np.empty((job.size, engine.metadata.dimension), dtype=np.float32)
            job.vectors[index] = vectors[row]
            job.completed += 1
            if job.completed == job.size:
                if job.normalize:
                    job.vectors = l2_normalize(job.vectors)
                self._finished(job)

    def _finished(self, job: Job) -> None:
        """``job``'s vectors are all in: mark the trace, send the reply."""
        if job.trace is not None:
            job.trace["pooled"] = time.monotonic_ns()
        self._finish(job)

    def _fail(self, job: Job, error: EmbeddingError) -> None:
        job.error = error
        job.vectors = None
        with self._changed:
            # texts not yet in a snapshot will never run: they no longer count as pending
            unscheduled = job.size - job.scheduled
            job.scheduled = job.size
            queue = self._queues.get(job.engine) if job.engine is not None else None
            if queue is not None and job in queue:
                queue.remove(job)
            self._pending_texts -= unscheduled
            self._changed.notify_all()
        self._finish(job)

    def _finish(self, job: Job) -> None:
        try:
            job.on_done(job)
        except Exception:  # a failed reply must not stop the other requests
            log.exception("could not deliver the reply to request %s", job.request_id)
