"""Dynamic batching on lanes: the texts of every pending request share ONNX Runtime runs, and
up to ``lanes`` runs go on at once over one session per model.

::

    lane threads (lanes + 1 of them; whichever holds the input reads, up to ``lanes`` run)
    ------------------------------------------------------------------------------------
    the input's holder: reads a frame, tokenizes it (the server's ``reader`` step), then
      run_now(job): a lane free, nothing   --> runs it in this thread as one micro-batch,
        queued, the job one run's worth        after handing the input to an idle thread
        (a lone query)                         (with one lane it keeps the input: no other
                                               run could start meanwhile)
      otherwise submit(job) --> queue of jobs (one per model; blocks while more than
                                max_pending_texts texts wait: backpressure)
                                      |
    every other thread, when a lane   v
    is free: the next micro-batch of the plan; the plan empty: the next model with pending
      jobs (round-robin), its snapshot (up to snapshot_tokens tokens: first the oldest job's
      next texts, then the jobs with the fewest tokens left), cut by plan_micro_batches
      (sorted by length, under lane_batch_tokens padded tokens, at least ``lanes`` micro-batches
      when there are texts enough) into the plan
                                      |
      engine.forward + engine.pool per micro-batch --> rows into their jobs (under the lock;
      a job's micro-batches may run on several lanes at once) --> a job whose texts are all
      done is finished at once: job.on_done(job) writes its reply

Sharing the session: every lane calls ``run`` on the model's one session (ONNX Runtime allows
it), so the weights and their pre-packed copies are held once. Each run works on its own lane
thread and borrows the session's ``threads - 1`` intra-op pool threads when they are free: a
lone query gets ``threads`` cores, and ``lanes`` runs at once keep ``lanes + threads - 1``
threads busy (the worker's default sizing fills the cores that way: worker/config.py).

Memory: the lanes share ``max_batch_tokens``: each run is planned under
``lane_batch_tokens = max_batch_tokens // lanes`` padded tokens (one text longer than that still
runs, alone), so the activations alive at once stay about those of one ``max_batch_tokens`` run.

The reader calls ``run_now`` only when no other frame is waiting behind the request, so
requests that arrive together still go through the queue and share runs.

Several models: each has its own queue, and snapshots are taken from the models with pending
jobs in turn (round-robin), so one ONNX Runtime run never mixes models and a flood of requests
for one model delays another's by at most one snapshot.

A lone query does not wait for a whole snapshot of a bulk load either: a lane taking the next
micro-batch of the plan first takes the jobs that arrived since the plan was made and fit one
run (up to one run's worth, ``_take_newcomers``), and then the plan's next micro-batch, so such
a query waits for one run, and the snapshot still advances between two such runs.

Fairness within a model: a snapshot is bounded in tokens. The oldest job always gets a
micro-batch worth of its texts into it, so every job advances once it is the oldest and a flood
of later requests cannot starve an earlier one. The rest of the snapshot goes to the jobs with
the fewest tokens left, so a search query arriving behind a bulk load (one huge request or many
big ones) runs in the next snapshot instead of after all of it. Within a snapshot the shortest
texts run first, so small requests answer first.

Failure: an exception inside a run is retried once per request of that micro-batch, so that a
request whose own texts fail gets ``Internal`` (its remaining texts are dropped) and the others
are served; the lane goes on with the next micro-batch. An exception anywhere else in a lane
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

__all__ = ["MAX_PADDING", "SNAPSHOT_BATCHES", "Batcher", "Job", "plan_micro_batches"]

log = logging.getLogger(__name__)

SNAPSHOT_BATCHES = 8
"""A snapshot holds about this many ``max_batch_tokens`` runs of texts (or of the longest
texts, if max_batch_tokens is below max_tokens): enough to sort lengths well, small enough that
a request arriving meanwhile waits at most about one snapshot's run time. Measured on the bench
corpus (1000 mixed texts in requests of 64, 2 cores, one lane): padding 1.14x the real tokens
at 8 against 1.20x at 4, worker CPU 8.4-8.9 s against 8.9-9.6 s, and a query sent during the
load answered in about 0.1 s (0.06-0.4 s at 4; 6-10 s when the snapshot was filled in arrival
order)."""


MAX_PADDING = 1.25
"""A micro-batch is cut before its padded tokens (rows x longest) exceed this many times its
texts' own tokens: on a CPU a padded token costs as much as a real one, and a batched run saves
less than that. Measured here (MiniLM, 1 thread, CPU time of 16 one-sentence queries of the
bench corpus, 5-30 tokens, median of 6 alternating rounds): one padded run 133.7 ms, 16 single
runs 106.9 ms, runs cut at 1.1x padding 87.7 ms, at 1.25x 88.8 ms, at 1.5x 101.4 ms."""


def plan_micro_batches(
    lengths: Sequence[int], max_batch_tokens: int, max_rows: int | None = None
) -> list[list[int]]:
    """Indices into ``lengths`` grouped into micro-batches of similar length.

    Sorting by length keeps padding small; each micro-batch holds as many texts as fit in
    ``max_batch_tokens`` padded tokens (rows x longest row), pads them to at most
    ``MAX_PADDING`` times their own tokens and, when given, holds at most ``max_rows`` texts
    (so that several lanes get a share of a small snapshot). A text longer than the budget on
    its own still runs, alone, so nothing waits forever.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    rows_cap = max_rows or len(lengths)
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0  # the current micro-batch's tokens before padding
    for index in order:
        length = lengths[index]
        # ascending order: the text being added is the longest of the batch so far
        padded = (len(current) + 1) * length
        if current and (
            padded > max_batch_tokens
            or len(current) == rows_cap
            or padded > MAX_PADDING * (real + length)
        ):
            batches.append(current)
            current, real = [], 0
        current.append(index)
        real += length
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
    """Called once, from the lane thread that completes it, when ``vectors`` or ``error`` is
    final."""
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
    """Texts whose vectors are in ``vectors`` (counted under the batcher's lock: a job's
    micro-batches may finish on several lanes at once)."""
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
_MicroBatch = list[_SnapshotItem]


class Batcher:
    """The queues of jobs, the plan of micro-batches, and the lane threads that run them (and
    take turns reading the input, when a ``reader`` is given)."""

    def __init__(
        self,
        engines: Engine | Sequence[Engine],
        max_batch_tokens: int,
        max_pending_texts: int,
        on_fatal: Callable[[BaseException], None] = lambda exc: None,
        lanes: int = 1,
        reader: Callable[[], bool] | None = None,
    ) -> None:
        """``reader``: reads and handles one frame of input (it may call ``run_now`` and
        ``submit``); False once the input has ended. Whichever lane thread holds the input
        calls it, so that reading goes on while a lone query runs."""
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        models = list(engines) if isinstance(engines, Sequence) else [engines]
        self._default_engine = models[0]
        self.lanes = lanes
        self.max_batch_tokens = max_batch_tokens
        self.lane_batch_tokens = max(1, max_batch_tokens // lanes)
        """Padded tokens per run: the lanes share ``max_batch_tokens`` (module docstring)."""
        self.max_pending_texts = max_pending_texts
        # never smaller than a few of the longest texts, or one text could fill a snapshot alone
        longest = max(engine.metadata.max_tokens for engine in models)
        self.snapshot_tokens = SNAPSHOT_BATCHES * max(max_batch_tokens, longest)
        self._on_fatal = on_fatal
        self._reader = reader
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        """Lane threads wait here for a micro-batch to run or for the input to hold."""
        self._changed = threading.Condition(self._lock)
        """``submit`` (room for more texts) and ``join`` (all done) wait here."""
        self._queues: dict[Engine, deque[Job]] = {engine: deque() for engine in models}
        self._turn = 0
        """Index (into the models) of the next model to take a snapshot from."""
        self._plan: deque[_MicroBatch] = deque()
        """Micro-batches of the current snapshot that no lane has taken yet."""
        self._horizon = 0
        """Jobs queued from this arrival on are newcomers to the plan (``_take_newcomers``)."""
        self._newcomers_ran = False
        """The last micro-batch taken was newcomers: the next comes from the plan."""
        self._pending_texts = 0
        self._closed = False
        self._running = 0
        """Runs under way, by lane threads or by ``run_now``'s caller; at most ``lanes``."""
        self._answering = 0
        """Runs whose lane is released and whose finished jobs are being answered: ``join``
        waits for them too, so that no reply is left unwritten."""
        self._input_free = reader is not None
        """No thread holds the input: the next idle lane thread takes it."""
        self._input_holder: threading.Thread | None = None
        self._arrivals = 0
        """Jobs queued so far: the next one's ``arrival``."""
        self._threads = [
            threading.Thread(target=self._serve, name=f"lane-{number}", daemon=True)
            for number in range(lanes + (reader is not None))
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; blocks while too many texts wait (the caller stops reading input).
        Raises ``ServiceUnavailable`` once the batcher is closed."""
        with self._lock:
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
            self._work.notify()

    def run_now(self, job: Job) -> bool:
        """Run ``job`` in the calling thread if a lane is free, nothing is queued and it fits
        in one run (a lone query: no hand-over to another thread, no wait for its wake-up);
        False, and nothing done, otherwise (then ``submit`` it). If the caller holds the input
        and other lanes could start runs meanwhile, it hands the input to an idle lane thread
        first. Raises ``ServiceUnavailable`` once the batcher is closed."""
        if not self._fits_one_run(job):
            return False  # several runs: the queue keeps a later request from waiting for all
        with self._lock:
            if not self._closed and (
                self._running >= self.lanes or self._plan or any(self._queues.values())
            ):
                return False
            self._accept_locked(job)  # raises once closed
            self._running += 1
            job.scheduled, job.scheduled_tokens = job.size, job.total_tokens
            if self.lanes > 1 and self._input_holder is threading.current_thread():
                self._input_holder, self._input_free = None, True
                self._work.notify()
        # one micro-batch, no snapshot to plan: the fewest steps between frame and reply
        self._run_and_release([(job, index) for index in range(job.size)])
        return True

    def _accept_locked(self, job: Job) -> Engine:
        """Count ``job`` as pending (lock held); returns its model's engine."""
        if self._closed:
            raise ServiceUnavailable("the worker is shutting down")
        engine = job.engine = job.engine or self._default_engine
        self._pending_texts += job.size
        return engine

    def close(self) -> None:
        """Accept no more jobs; the lanes finish the queued ones, then end."""
        with self._lock:
            self._closed = True
            self._work.notify_all()
            self._changed.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every accepted job is done and the lane threads that are not reading
        have ended; ``True`` if so (or the lanes never started)."""
        if self._threads[0].ident is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not (self._closed and self._idle_locked()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
        for thread in self._threads:
            if thread is not self._input_holder:  # blocked reading input that may never come
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                thread.join(left)
        return not any(t.is_alive() for t in self._threads if t is not self._input_holder)

    @property
    def pending_texts(self) -> int:
        return self._pending_texts

    def _idle_locked(self) -> bool:
        return not (self._running or self._answering or self._plan or any(self._queues.values()))

    # -- lane threads --------------------------------------------------------------------

    def _serve(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self._lock:
                    while True:
                        if self._input_free and not self._closed:
                            self._input_free, self._input_holder = False, me
                            work = None
                            break
                        work = self._take_work_locked()
                        if work is not None:
                            self._running += 1
                            break
                        if self._closed and self._idle_locked():
                            self._work.notify_all()  # the other lanes end too
                            return
                        self._work.wait()
                if work is None:
                    self._read(me)
                else:
                    self._run_and_release(work)
        except BaseException as exc:  # a bug: report it rather than leave requests hanging
            log.exception("lane thread failed")
            self._on_fatal(exc)

    def _read(self, me: threading.Thread) -> None:
        """Read and handle frames while this thread holds the input (``run_now`` may hand it
        over to another lane thread)."""
        assert self._reader is not None
        while self._input_holder is me:
            if not self._reader():  # the input has ended or the worker stops: nobody reads
                with self._lock:
                    if self._input_holder is me:  # not handed over meanwhile
                        self._input_holder = None
                return

    def _take_work_locked(self) -> _MicroBatch | None:
        """The next micro-batch for a free lane (lock held), planning the next snapshot when
        the plan is empty; None if every lane is busy or nothing waits."""
        if self._running >= self.lanes:
            return None
        if self._plan:
            if not self._newcomers_ran:
                newcomers = self._take_newcomers(self._horizon)
                if newcomers:
                    self._newcomers_ran = True
                    self._horizon = self._arrivals
                    return newcomers
            self._newcomers_ran = False
            return self._plan.popleft()
        queue = self._next_queue()
        if queue is None:
            return None
        snapshot = self._take_snapshot(queue)
        lengths = [len(job.token_ids[index]) for job, index in snapshot]
        rows = -(-len(snapshot) // self.lanes)  # every lane gets a share of a small snapshot
        for batch in plan_micro_batches(lengths, self.lane_batch_tokens, rows):
            self._plan.append([snapshot[position] for position in batch])
        self._horizon, self._newcomers_ran = self._arrivals, False
        self._work.notify(len(self._plan) - 1)  # the other micro-batches, to idle lanes
        return self._plan.popleft()

    def _run_and_release(self, items: _MicroBatch) -> None:
        """Run ``items``, whose taker counted the run in ``_running`` under the lock; release
        its lane and its texts' place in the pending count, then answer the jobs it
        finished: a host that sends its next query on reading a reply finds the lane free."""
        answered: list[Job] = []
        try:
            live = [(job, index) for job, index in items if job.error is None]
            if live:
                self._run_micro_batch(live, answered)
        finally:
            with self._lock:
                self._running -= 1
                self._pending_texts -= len(items)
                self._answering += 1
                self._changed.notify_all()
                self._work.notify()  # a lane is free: queued work may start
        try:
            for job in answered:
                self._finish(job)
        finally:
            with self._lock:
                self._answering -= 1
                self._changed.notify_all()
                if self._closed:
                    self._work.notify_all()  # the lanes waiting for the end may end

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

    def _fits_one_run(self, job: Job) -> bool:
        return job.size == 1 or job.size * max(map(len, job.token_ids)) <= self.lane_batch_tokens

    def _take_newcomers(self, horizon: int) -> _MicroBatch:
        """Jobs submitted since ``horizon`` that fit one run (lone queries), taken from one
        model's queue (lock held) up to one run of ``lane_batch_tokens``, oldest first: they
        run between the micro-batches of the plan under way, so such a query waits for one run
        of a bulk load, not for all of its snapshot, and the snapshot still advances by one
        run between two such runs."""
        for queue in self._queues.values():
            taken: list[Job] = []
            rows = longest = 0
            for job in queue:
                if job.arrival < horizon or job.scheduled or not self._fits_one_run(job):
                    continue
                job_longest = max(longest, *(len(ids) for ids in job.token_ids))
                if taken and (rows + job.size) * job_longest > self.lane_batch_tokens:
                    break
                taken.append(job)
                rows, longest = rows + job.size, job_longest
            if not taken:
                continue
            remaining = [job for job in queue if job not in taken]
            queue.clear()
            queue.extend(remaining)
            group: _MicroBatch = []
            for job in taken:
                job.scheduled, job.scheduled_tokens = job.size, job.total_tokens
                group += [(job, index) for index in range(job.size)]
            return group
        return []

    def _run_micro_batch(self, items: _MicroBatch, answered: list[Job]) -> None:
        """Run one micro-batch; the jobs it finishes (vectors all in, or failed) are appended
        to ``answered``."""
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
                    self._run_micro_batch([item for item in items if item[0] is job], answered)
                return
            log.exception("inference failed for request %s", jobs[0].request_id)
            if self._fail(jobs[0], Internal(f"inference failed: {type(exc).__name__}: {exc}")):
                answered.append(jobs[0])
            return
        if whole:
            first.vectors, first.completed = vectors, first.size
            answered.append(self._pooled(first))
            return
        finished: list[Job] = []
        with self._lock:  # other lanes may be filling other rows of the same jobs
            for row, (job, index) in enumerate(items):
                if job.error is not None:  # failed on another lane meanwhile: answered
                    continue
                if job.vectors is None:
                    job.vectors = np.empty((job.size, engine.metadata.dimension), np.float32)
                job.vectors[index] = vectors[row]
                job.completed += 1
                if job.completed == job.size:
                    finished.append(job)
        for job in finished:
            if job.normalize and job.vectors is not None:
                job.vectors = l2_normalize(job.vectors)
            answered.append(self._pooled(job))

    def _pooled(self, job: Job) -> Job:
        """``job``'s vectors are all in: mark the trace."""
        if job.trace is not None:
            job.trace["pooled"] = time.monotonic_ns()
        return job

    def _fail(self, job: Job, error: EmbeddingError) -> bool:
        """Mark ``job`` failed with ``error``; False if it had failed already (its share on
        another lane): it is answered once."""
        with self._lock:
            if job.error is not None:
                return False
            job.error = error
            job.vectors = None
            # texts not yet in a snapshot will never run: they no longer count as pending
            unscheduled = job.size - job.scheduled
            job.scheduled = job.size
            queue = self._queues.get(job.engine) if job.engine is not None else None
            if queue is not None and job in queue:
                queue.remove(job)
            self._pending_texts -= unscheduled
            self._changed.notify_all()
        return True

    def _finish(self, job: Job) -> None:
        try:
            job.on_done(job)
        except Exception:  # a failed reply must not stop the other requests
            log.exception("could not deliver the reply to request %s", job.request_id)
