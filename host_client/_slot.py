"""One worker slot of the pool: its worker process, the hello, the hang watch and the restart
budget. The requests themselves live in the dispatcher's one table; a slot only reports what
happens to its worker.

::

    supervisor thread, one per slot (the KernelRestarter part; the policy is _restart.py):
       spawner.command(slot) ─► WorkerProcess ─► hello (start_timeout) ─► ready:
         ▲                                          serving = (generation, worker)
         │ RestartPolicy: backoff 0.05 s doubling    │ owner.slot_ready: the dispatcher routes
         │ to 2 s, restart_limit in a row, reset      │ requests here, each entry of its table
         │ by a worker that ran stable_start_time     │ marked with (slot, generation)
         │                                           │
         │                                           │ stdout EOF (crash, kill -9, OOM), or no
         │                                           │ reply for request_timeout while the
         │                                           │ table holds requests routed here
         │                                           │ (hung or stopped: SIGKILL)
         └──── owner.slot_lost(slot, generation) ◄───┘ every entry routed to that generation
                                                       goes back to the table, unrouted, and
                                                       is routed again at the cost of one
                                                       attempt

    reader thread of the worker ── owner.slot_replied(slot, generation, ...) ──► the table

Events go to the owner (the dispatcher) as they happen: ``slot_ready``, ``slot_replied`` (in the
worker's reader thread), ``slot_lost`` and ``slot_gave_up``. A slot calls its owner without
holding its own lock, except ``oldest_request`` from the hang watch: the lock order is slot,
then dispatcher, and the dispatcher never takes a slot's lock while holding its own.

A slot gives up (``slot_gave_up``) when its restart budget is spent, when a worker refuses to
start (an ``ok: false`` hello), or when its very first start fails. What giving up means for the
client is the dispatcher's decision.
"""

from __future__ import annotations

import enum
import functools
import logging
import signal
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

from akidb_embed.errors import EmbeddingError, ServiceUnavailable
from akidb_embed.host_client._config import ClientConfig
from akidb_embed.host_client._hello import Hello, parse_hello
from akidb_embed.host_client._restart import GiveUp, RestartPolicy
from akidb_embed.host_client._types import WorkerStats
from akidb_embed.host_client._worker import (
    REAP_TIMEOUT,
    STDERR_DRAIN_TIMEOUT,
    Spawner,
    WorkerProcess,
)

__all__ = ["SlotOwner", "WorkerSlot"]

logger = logging.getLogger("akidb_embed.host_client")

EXIT_WAIT = REAP_TIMEOUT + STDERR_DRAIN_TIMEOUT + 1.0
"""How long to wait for a killed worker to be reaped and reported."""


class SlotOwner(Protocol):
    """What a worker slot reports to the dispatcher. Each hook takes the dispatcher's lock."""

    def slot_ready(self, slot: WorkerSlot, hello: Hello) -> None: ...

    def slot_replied(
        self, slot: WorkerSlot, generation: int, worker: WorkerProcess, message: dict[str, Any]
    ) -> None: ...

    def slot_lost(self, slot: WorkerSlot, generation: int, reason: str, *, hung: bool) -> None: ...

    def slot_gave_up(self, slot: WorkerSlot, error: EmbeddingError) -> None: ...

    def oldest_request(self, slot: WorkerSlot, generation: int) -> tuple[float, int] | None:
        """When the oldest request routed to that worker was written, and how many it holds."""
        ...


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    GIVEN_UP = "given up"
    CLOSING = "closing"
    CLOSED = "closed"


_SUPERVISED = (State.STARTING, State.READY, State.RESTARTING)


class WorkerSlot:
    """Worker slot ``index`` of a client: spawns, watches and replaces its worker."""

    def __init__(
        self,
        index: int,
        config: ClientConfig,
        spawner: Spawner,
        owner: SlotOwner,
        *,
        mark_frames: bool = False,
    ) -> None:
        self.index = index
        self.mark_frames = mark_frames
        """Whether its workers' readers note when each frame was read (the client traces)."""
        self.config = config
        self._spawner = spawner
        self._owner = owner
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self.state = State.NEW
        self.ever_ready = False
        """Whether a worker of this slot ever said hello: a failed start before that is final."""
        self.serving: tuple[int, WorkerProcess] | None = None
        """The generation (spawn number) and process of the ready worker; one attribute, so
        the dispatcher reads both at once without this slot's lock."""
        self.spawns = 0
        self.restarts = 0
        self.answered_requests = 0
        """Replies matched by the dispatcher (it counts them, holding its lock)."""
        self.policy = RestartPolicy(config.restart_limit, config.stable_start_time)
        self._starting_worker: WorkerProcess | None = None
        self._closing_workers: list[WorkerProcess] = []
        self._killed_on_close: list[WorkerProcess] = []
        self._killed_workers: list[WorkerProcess] = []
        """Workers killed when the client gave up: ``close`` still waits for their end."""
        self._start_due: float | None = None
        self._supervisor: threading.Thread | None = None

    # ------------------------------------------------------------------ for the dispatcher

    @property
    def given_up(self) -> bool:
        return self.state is State.GIVEN_UP

    def start(self) -> None:
        """Start supervising: the first worker is spawned at once, in the supervisor thread."""
        with self._lock:
            if self.state is not State.NEW:
                return
            self.state = State.STARTING
            self._start_due = time.monotonic()
            self._supervisor = threading.Thread(
                target=self._supervise, name=f"akidb-embed-supervisor-{self.index}", daemon=True
            )
            self._supervisor.start()

    def stats(self, in_flight_texts: int, in_flight_tokens: int) -> WorkerStats:
        serving = self.serving
        return WorkerStats(
            index=self.index,
            state=self.state.value,
            pid=serving[1].pid if serving is not None else None,
            spawns=self.spawns,
            restarts=self.restarts,
            in_flight_texts=in_flight_texts,
            in_flight_tokens=in_flight_tokens,
            answered_requests=self.answered_requests,
        )

    def give_up(self, reason: str) -> None:
        """The client failed: stop supervising and kill the worker (its reader reaps it)."""
        with self._lock:
            if self.state not in _SUPERVISED:
                return
            self.state = State.GIVEN_UP
            self._start_due = None
            serving, self.serving = self.serving, None
            if serving is not None:
                serving[1].kill(reason)
                self._killed_workers.append(serving[1])
            if self._starting_worker is not None:
                self._starting_worker.kill(reason)
            self._wakeup.notify_all()

    def begin_close(self) -> None:
        """Stop supervising; the worker keeps what it holds until ``close_input``."""
        with self._lock:
            starting = [] if self._starting_worker is None else [self._starting_worker]
            serving = [] if self.serving is None else [self.serving[1]]
            self._killed_on_close = self._killed_workers + starting
            self._closing_workers = self._killed_on_close + serving
            if self.state is not State.CLOSED:
                self.state = State.CLOSING
            self._start_due = None
            self._wakeup.notify_all()

    def close_input(self) -> None:
        """Close the ready worker's stdin (it answers what it holds, then exits); a starting
        one is killed."""
        for worker in self._closing_workers:
            if worker in self._killed_on_close:
                worker.kill("the client was closed while it started")
            else:
                worker.close_input()

    def finish_close(self, deadline: float) -> None:
        """Kill the worker if it is still running at ``deadline``; reap it and end the
        threads."""
        for worker in self._closing_workers:
            if not worker.wait_exited(max(deadline - time.monotonic(), 0.0)):
                worker.kill("still running after its stdin was closed (close_timeout)")
                worker.wait_exited(EXIT_WAIT)
        with self._lock:
            self.state = State.CLOSED
            self.serving = None
            self._wakeup.notify_all()
        for worker in self._closing_workers:
            worker.join_threads(STDERR_DRAIN_TIMEOUT)
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(self.config.start_timeout)

    # ------------------------------------------------------------------------- supervision

    def _supervise(self) -> None:
        try:
            while self._wait_for_start_due():
                self._start_worker()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            logger.exception("the akidb-embed supervisor of worker slot %d failed", self.index)
            with self._lock:
                self.state = State.GIVEN_UP
            error = ServiceUnavailable(f"the client's supervisor failed: {exc!r}")
            self._owner.slot_gave_up(self, error)

    def _wait_for_start_due(self) -> bool:
        """Sleep until a worker must be started (True) or supervision is over (False); kill
        the serving worker meanwhile if it holds requests and answers none for too long."""
        with self._lock:
            while True:
                if self.state not in _SUPERVISED:
                    return False
                now = time.monotonic()
                if self._start_due is not None and now >= self._start_due:
                    self._start_due = None
                    return True
                hang_deadline = self._hang_deadline_locked()
                if hang_deadline is not None and now >= hang_deadline:
                    self._kill_hung_locked()
                    continue
                wake_times = [t for t in (self._start_due, hang_deadline) if t is not None]
                # no wake-up when a request is written: this nap never passes request_timeout,
                # so it looks again before that request's hang deadline (a wake-up per lone
                # request would cost a thread switch on the latency path)
                idle_nap = self.config.request_timeout
                self._wakeup.wait(min([*wake_times, now + idle_nap]) - now)

    def _hang_deadline_locked(self) -> float | None:
        """When the worker counts as hung: ``request_timeout`` after the later of its oldest
        unanswered request and its last reply of any kind."""
        serving = self.serving
        if serving is None or serving[1].kill_reason is not None:
            return None
        oldest = self._owner.oldest_request(self, serving[0])
        if oldest is None:
            return None
        return max(oldest[0], serving[1].last_reply_at) + self.config.request_timeout

    def _kill_hung_locked(self) -> None:
        assert self.serving is not None
        generation, worker = self.serving
        oldest = self._owner.oldest_request(self, generation)
        reason = (
            f"no reply for {self.config.request_timeout:g} s while holding "
            f"{oldest[1] if oldest else 0} request(s): hung or stopped"
        )
        logger.warning("worker %s: %s; killing it", worker.pid, reason)
        worker.hung = True
        worker.kill(reason)  # the reader sees EOF and reports the exit like any death

    def _start_worker(self) -> None:
        with self._lock:
            if self.state not in _SUPERVISED:
                return
            self.spawns += 1
            generation = self.spawns
            command = self._spawner.command(self.index)
            worker = WorkerProcess(
                command.argv,
                command.env,
                on_frame=functools.partial(self._owner.slot_replied, self, generation),
                on_exit=lambda worker: self._on_exit(generation, worker),
            )
            worker.mark_frames = self.mark_frames
            self._starting_worker = worker
            first_start = not self.ever_ready
        try:
            worker.start()
            message = worker.hello.result(timeout=self.config.start_timeout)
        except FutureTimeout:
            worker.kill(f"no hello within start_timeout={self.config.start_timeout:g} s")
            worker.wait_exited(EXIT_WAIT)
            tail = worker.stderr_tail()
            self._start_failed(
                worker,
                ServiceUnavailable(
                    f"worker {worker.pid} wrote no hello within {self.config.start_timeout:g} s"
                    + (f"; its stderr ends with:\n{tail}" if tail else "")
                ),
                final=first_start,
            )
            return
        except ServiceUnavailable as exc:  # could not spawn, or it ended before its hello
            self._start_failed(worker, exc, final=first_start)
            return
        try:
            hello = parse_hello(message)
        except EmbeddingError as exc:  # it refused to start, saying why; final
            self._start_failed(worker, exc, final=True)
            return
        self._install(generation, worker, hello)

    def _start_failed(self, worker: WorkerProcess, error: EmbeddingError, *, final: bool) -> None:
        self._retire(worker)
        # a final failure goes on to the dispatcher, which raises it to the caller or logs it
        logger.log(
            logging.DEBUG if final else logging.WARNING,
            "worker slot %d: the worker could not start: %s",
            self.index,
            error.message,
        )
        with self._lock:
            self._starting_worker = None
            if self.state not in _SUPERVISED:
                return
            gave_up = error if final else self._schedule_restart_locked(error.message)
        if gave_up is not None:
            self._owner.slot_gave_up(self, gave_up)

    @staticmethod
    def _retire(worker: WorkerProcess) -> None:
        """End a worker that will not serve: close its stdin, then kill it if it lingers."""
        worker.close_input()
        if not worker.wait_exited(1.0):
            worker.kill("not needed")
            worker.wait_exited(EXIT_WAIT)

    def _install(self, generation: int, worker: WorkerProcess, hello: Hello) -> None:
        """Make a worker that sent a good hello this slot's serving one; the dispatcher then
        routes requests to it (those of a dead worker of any slot included)."""
        with self._lock:
            self._starting_worker = None
            supervised = self.state in _SUPERVISED
            died_at_once = supervised and worker.exit_description is not None
            if supervised and not died_at_once:
                worker.ready_at = worker.last_reply_at = time.monotonic()
                worker.accept_replies_up_to(hello.max_reply_bytes())
                self.serving = (generation, worker)
                self.policy.ready()
                if self.state is State.RESTARTING:
                    self.restarts += 1
                self.state = State.READY
                self.ever_ready = True
        if not supervised:
            self._retire(worker)  # closed or given up while it started
            return
        if died_at_once:  # died right after its hello: its reader reported it to no one
            self._worker_gone(generation, worker)
            return
        logger.info(
            "worker %s ready (slot %d): %s (dimension %d) on %s",
            hello.pid,
            self.index,
            hello.model,
            hello.dimension,
            ", ".join(hello.providers) or "?",
        )
        self._owner.slot_ready(self, hello)

    def _on_exit(self, generation: int, worker: WorkerProcess) -> None:
        """The reader of ``worker`` saw its end (the process is reaped)."""
        with self._lock:
            serving = self.serving
            if serving is None or serving[0] != generation:
                return  # a starting worker (its hello future says why) or one replaced already
            self.serving = None
        self._worker_gone(generation, worker)

    def _worker_gone(self, generation: int, worker: WorkerProcess) -> None:
        """Worker ``generation`` is gone: what the table routed to it goes back, and a restart
        is scheduled (unless the client is closing)."""
        uptime = time.monotonic() - (worker.ready_at or time.monotonic())
        reason = f"{worker.describe()} after {uptime:.1f} s of service"
        if worker.returncode != -signal.SIGKILL:  # a crash may have said why; a SIGKILL cannot
            tail = worker.stderr_tail(5)
            reason += f"; its stderr ends with:\n{tail}" if tail else ""
        with self._lock:
            gave_up = self._schedule_restart_locked(reason) if self.state in _SUPERVISED else None
        self._owner.slot_lost(self, generation, reason, hung=worker.hung)
        if gave_up is not None:
            self._owner.slot_gave_up(self, gave_up)

    def _schedule_restart_locked(self, reason: str) -> ServiceUnavailable | None:
        """Ask the restart policy: the next start is scheduled, or the error giving up."""
        decision = self.policy.failed()
        if isinstance(decision, GiveUp):
            self.state = State.GIVEN_UP
            self._start_due = None
            return ServiceUnavailable(decision.message(reason))
        self.state = State.RESTARTING
        self._start_due = time.monotonic() + decision
        self._wakeup.notify_all()
        return None
