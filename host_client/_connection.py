"""One supervised worker connection: a worker slot of the pool, the requests its worker holds,
and the supervisor that replaces that worker when it dies or hangs.

::

    dispatcher ──send_locked(request)──► pending {id: request} ──► WorkerProcess ──► worker
                                           │ (frames kept for re-sending)            │
    dispatcher.replied_locked ◄── reply by id ◄── reader thread ◄────────────────────┘

    supervisor thread, one per connection (the KernelRestarter part):
       spawn ─► hello (start_timeout) ─► ready: the dispatcher may route requests here
         ▲                                         │
         │ backoff 0.05 s doubling to 2 s           │ stdout EOF (crash, kill -9, OOM)
         │ (restart_limit in a row, reset by a      │ or no reply for request_timeout while
         │  worker that ran stable_start_time)      │ holding requests (hung/stopped: SIGKILL)
         └──── every request it held goes back ◄────┘
               to the dispatcher (dispatcher.lost_locked), which re-routes it to any ready
               connection, this one's replacement or another, at the cost of one attempt

A connection never keeps requests for a worker that is not there: the moment its worker is
gone, what it held belongs to the dispatcher again. So a pool of several connections moves a
dead or hung worker's requests to the live ones at once, and a pool of one waits for the
replacement as a single worker always did.

The restart budget is per connection: ``restart_limit`` consecutive restarts (reset by a
worker that served ``stable_start_time``) and this slot gives up (``dispatcher.gave_up_locked``),
as does a worker that refuses to start (an ``ok: false`` hello) or the very first start of a
slot failing. What giving up means for the client is the dispatcher's decision.

Every connection of a client shares the dispatcher's lock: methods ending in ``_locked`` are
called with it held, and the dispatcher's hooks return the future resolutions (``Deferred``)
to run after it is released.
"""

from __future__ import annotations

import enum
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol

from akidb_embed.errors import EmbeddingError, ServiceUnavailable
from akidb_embed.host_client._config import ClientConfig
from akidb_embed.host_client._types import WorkerStats
from akidb_embed.host_client._worker import (
    REAP_TIMEOUT,
    STDERR_DRAIN_TIMEOUT,
    Hello,
    WorkerProcess,
    parse_hello,
)

__all__ = ["Connection", "ConnectionOwner", "Deferred", "Outcome", "WireRequest", "run"]

logger = logging.getLogger("akidb_embed.host_client")

Outcome = dict[str, Any] | EmbeddingError
"""What settles a wire request: its reply (ok or error), or a failure found by the client."""
Deferred = list[Callable[[], None]]
"""Future resolutions collected under the lock and run after releasing it."""


def run(deferred: Deferred) -> None:
    for action in deferred:
        action()


@dataclass(eq=False)
class WireRequest:
    """One request frame and what to do with its outcome."""

    request_id: int
    text_count: int
    tokens: int
    """Estimated tokens of its texts: what routing weighs (0 for text-free ops)."""
    settle: Callable[[Outcome], None]
    message: dict[str, Any] | None
    frame: bytes | None = None
    connection: Connection | None = None
    """The connection whose worker holds it; ``None`` while no worker does."""
    sent_at: float = 0.0
    attempts: int = 0
    """Workers that died or hung holding it."""
    proves_progress: bool = True
    """Whether its reply shows the worker's model at work. A ``ping`` is answered by the
    worker's reader alone, so a worker stuck in the model would still answer it."""


class ConnectionOwner(Protocol):
    """What a connection reports to the dispatcher, with the shared lock held."""

    def ready_locked(self, connection: Connection, hello: Hello) -> Deferred: ...

    def replied_locked(self, connection: Connection, request: WireRequest) -> Deferred: ...

    def lost_locked(
        self, connection: Connection, requests: list[WireRequest], reason: str, *, hung: bool
    ) -> Deferred: ...

    def gave_up_locked(self, connection: Connection, error: EmbeddingError) -> Deferred: ...


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    GIVEN_UP = "given up"
    CLOSING = "closing"
    CLOSED = "closed"


_SUPERVISED = (State.STARTING, State.READY, State.RESTARTING)


class Connection:
    """Worker slot ``index`` of a client: spawns, watches and replaces its worker."""

    def __init__(
        self, index: int, config: ClientConfig, lock: threading.Lock, owner: ConnectionOwner
    ) -> None:
        self.index = index
        self.config = config
        self._lock = lock
        self._wakeup = threading.Condition(lock)
        self._owner = owner
        self.state = State.NEW
        self.ever_ready = False
        """Whether a worker of this slot ever said hello: a failed start before that is final."""
        self.pending: dict[int, WireRequest] = {}
        """Requests written to the current worker and not answered."""
        self.in_flight_texts = 0
        self.in_flight_tokens = 0
        self.spawns = 0
        self.restarts = 0
        self.answered_requests = 0
        self._worker: WorkerProcess | None = None
        self._starting_worker: WorkerProcess | None = None
        self._closing_workers: list[WorkerProcess] = []
        self._killed_on_close: list[WorkerProcess] = []
        self._killed_workers: list[WorkerProcess] = []
        """Workers killed when the client gave up: ``close`` still waits for their end."""
        self._start_due: float | None = None
        self._consecutive_restarts = 0
        self._supervisor: threading.Thread | None = None

    # ------------------------------------------------------------------ for the dispatcher

    @property
    def ready(self) -> bool:
        return self.state is State.READY and self._worker is not None

    @property
    def given_up(self) -> bool:
        return self.state is State.GIVEN_UP

    def load_locked(self) -> tuple[int, int, int]:
        """What routing minimises: estimated tokens in flight, then requests, then the slot."""
        return (self.in_flight_tokens, len(self.pending), self.index)

    def start_locked(self) -> None:
        """Start supervising: the first worker is spawned at once, in the supervisor thread."""
        if self.state is not State.NEW:
            return
        self.state = State.STARTING
        self._start_due = time.monotonic()
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"akidb-embed-supervisor-{self.index}", daemon=True
        )
        self._supervisor.start()

    def send_locked(self, request: WireRequest) -> None:
        """Write ``request`` to this connection's worker (it must be ``ready``)."""
        worker = self._worker
        assert worker is not None and request.frame is not None
        request.connection = self
        request.sent_at = time.monotonic()
        self.pending[request.request_id] = request
        self.in_flight_texts += request.text_count
        self.in_flight_tokens += request.tokens
        # no wake-up of the supervisor: it never sleeps longer than request_timeout, so it
        # looks again before this request's hang deadline (a wake-up per lone request would
        # cost a thread switch on the latency path)
        worker.send(request.frame)

    def forget_locked(self, request: WireRequest) -> None:
        """The dispatcher failed ``request``: a late reply to it is ignored."""
        if self.pending.pop(request.request_id, None) is request:
            self._count_out(request)
        request.connection = None

    def stats_locked(self) -> WorkerStats:
        worker = self._worker
        return WorkerStats(
            index=self.index,
            state=self.state.value,
            pid=worker.pid if worker is not None else None,
            spawns=self.spawns,
            restarts=self.restarts,
            in_flight_texts=self.in_flight_texts,
            in_flight_tokens=self.in_flight_tokens,
            answered_requests=self.answered_requests,
        )

    def give_up_locked(self, reason: str) -> None:
        """The client failed: stop supervising and kill the worker (its reader reaps it)."""
        if self.state not in _SUPERVISED:
            return
        self.state = State.GIVEN_UP
        self._start_due = None
        self._drop_pending_locked()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill(reason)
            self._killed_workers.append(worker)
        if self._starting_worker is not None:
            self._starting_worker.kill(reason)
        self._wakeup.notify_all()

    def begin_close_locked(self) -> None:
        """Stop supervising; the worker keeps what it holds until ``close_input``."""
        starting = [] if self._starting_worker is None else [self._starting_worker]
        serving = [] if self._worker is None else [self._worker]
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
                worker.wait_exited(REAP_TIMEOUT + STDERR_DRAIN_TIMEOUT + 1.0)
        with self._lock:
            self.state = State.CLOSED
            self._worker = None
            self._drop_pending_locked()
            self._wakeup.notify_all()
        for worker in self._closing_workers:
            worker.join_threads(STDERR_DRAIN_TIMEOUT)
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(self.config.start_timeout)

    # ----------------------------------------------------------------------------- replies

    def _on_frame(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        """A reply from a worker (its reader thread): hand the request it answers back."""
        request_id = message.get("id")
        with self._lock:
            if worker is not self._worker:
                return  # from a worker already given up on; its requests went elsewhere
            request = self.pending.pop(request_id, None) if isinstance(request_id, int) else None
            if request is None:
                self._log_unmatched(worker, message)
                return
            if request.proves_progress:
                worker.last_reply_at = time.monotonic()
            self._count_out(request)
            self.answered_requests += 1
            request.connection = None
            deferred: Deferred = [functools.partial(request.settle, message)]
            deferred += self._owner.replied_locked(self, request)
        run(deferred)

    def _count_out(self, request: WireRequest) -> None:
        self.in_flight_texts -= request.text_count
        self.in_flight_tokens -= request.tokens

    def _drop_pending_locked(self) -> list[WireRequest]:
        requests = list(self.pending.values())
        for request in requests:
            request.connection = None
        self.pending.clear()
        self.in_flight_texts = self.in_flight_tokens = 0
        return requests

    @staticmethod
    def _log_unmatched(worker: WorkerProcess, message: dict[str, Any]) -> None:
        error = message.get("error")
        if message.get("ok") is False and isinstance(error, dict):
            logger.error(
                "worker %s reported %s: %s", worker.pid, error.get("code"), error.get("message")
            )
        else:
            logger.warning(
                "worker %s answered unknown request id %r", worker.pid, message.get("id")
            )

    # ------------------------------------------------------------------------- supervision

    def _supervise(self) -> None:
        try:
            while self._wait_for_start_due():
                self._start_worker()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            logger.exception("the akidb-embed supervisor of worker slot %d failed", self.index)
            with self._lock:
                self.state = State.GIVEN_UP
                deferred = self._owner.gave_up_locked(
                    self, ServiceUnavailable(f"the client's supervisor failed: {exc!r}")
                )
            run(deferred)

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
                idle_nap = self.config.request_timeout  # see send_locked
                self._wakeup.wait(min([*wake_times, now + idle_nap]) - now)

    def _hang_deadline_locked(self) -> float | None:
        """When the worker counts as hung: ``request_timeout`` after the later of its oldest
        unanswered request and its last reply of any kind."""
        worker = self._worker
        if worker is None or not self.pending or worker.kill_reason is not None:
            return None
        oldest = min(request.sent_at for request in self.pending.values())
        return max(oldest, worker.last_reply_at) + self.config.request_timeout

    def _kill_hung_locked(self) -> None:
        worker = self._worker
        assert worker is not None
        reason = (
            f"no reply for {self.config.request_timeout:g} s while holding "
            f"{len(self.pending)} request(s): hung or stopped"
        )
        logger.warning("worker %s: %s; killing it", worker.pid, reason)
        worker.hung = True
        worker.kill(reason)  # the reader sees EOF and reports the exit like any death

    def _start_worker(self) -> None:
        with self._lock:
            if self.state not in _SUPERVISED:
                return
            worker = WorkerProcess(
                self.config.worker_argv(),
                self.config.worker_env(),
                on_frame=self._on_frame,
                on_exit=self._on_exit,
            )
            self._starting_worker = worker
            self.spawns += 1
            first_start = not self.ever_ready
        try:
            worker.start()
            message = worker.hello.result(timeout=self.config.start_timeout)
        except FutureTimeout:
            worker.kill(f"no hello within start_timeout={self.config.start_timeout:g} s")
            worker.wait_exited(REAP_TIMEOUT + STDERR_DRAIN_TIMEOUT + 1.0)
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
        self._install(worker, hello)

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
            if final:
                self.state = State.GIVEN_UP
                deferred = self._owner.gave_up_locked(self, error)
            else:
                deferred = self._schedule_restart_locked(error.message, stable=False)
        run(deferred)

    @staticmethod
    def _retire(worker: WorkerProcess) -> None:
        """End a worker that will not serve: close its stdin, then kill it if it lingers."""
        worker.close_input()
        if not worker.wait_exited(1.0):
            worker.kill("not needed")
            worker.wait_exited(REAP_TIMEOUT + STDERR_DRAIN_TIMEOUT + 1.0)

    def _install(self, worker: WorkerProcess, hello: Hello) -> None:
        """Make a worker that sent a good hello this slot's serving one; the dispatcher then
        routes requests to it (those of a dead worker of any slot included)."""
        deferred: Deferred = []
        with self._lock:
            self._starting_worker = None
            supervised = self.state in _SUPERVISED
            if supervised and worker.exit_description is not None:
                self._worker = worker
                deferred = self._handle_death_locked(worker)  # died right after its hello
            elif supervised:
                worker.ready_at = worker.last_reply_at = time.monotonic()
                worker.accept_replies_up_to(hello.max_reply_bytes())
                self._worker = worker
                if self.state is State.RESTARTING:
                    self.restarts += 1
                self.state = State.READY
                self.ever_ready = True
                deferred = self._owner.ready_locked(self, hello)
        if not supervised:
            self._retire(worker)  # closed or given up while it started
            return
        logger.info(
            "worker %s ready (slot %d): %s (dimension %d) on %s",
            hello.pid,
            self.index,
            hello.model,
            hello.dimension,
            ", ".join(hello.providers) or "?",
        )
        run(deferred)

    def _on_exit(self, worker: WorkerProcess) -> None:
        """The reader of ``worker`` saw its end (the process is reaped)."""
        with self._lock:
            if worker is not self._worker:
                return  # a starting worker (its hello future says why) or one replaced already
            deferred = self._handle_death_locked(worker)
        run(deferred)

    def _handle_death_locked(self, worker: WorkerProcess) -> Deferred:
        """The serving worker is gone: what it held goes back to the dispatcher, and a restart
        is scheduled (unless the client is closing)."""
        self._worker = None
        uptime = time.monotonic() - (worker.ready_at or time.monotonic())
        reason = f"{worker.describe()} after {uptime:.1f} s of service"
        if worker.returncode != -signal.SIGKILL:  # a crash may have said why; a SIGKILL cannot
            tail = worker.stderr_tail(5)
            reason += f"; its stderr ends with:\n{tail}" if tail else ""
        held = self._drop_pending_locked()
        deferred = self._owner.lost_locked(self, held, reason, hung=worker.hung)
        if self.state not in _SUPERVISED:
            return deferred
        stable = uptime >= self.config.stable_start_time
        return deferred + self._schedule_restart_locked(reason, stable=stable)

    def _schedule_restart_locked(self, reason: str, *, stable: bool) -> Deferred:
        if stable:
            self._consecutive_restarts = 0
        self._consecutive_restarts += 1
        if self._consecutive_restarts > self.config.restart_limit:
            self.state = State.GIVEN_UP
            self._start_due = None
            return self._owner.gave_up_locked(
                self,
                ServiceUnavailable(
                    f"giving up after {self._consecutive_restarts - 1} restart(s) in a row "
                    f"(restart_limit={self.config.restart_limit}); the last failure: {reason}"
                ),
            )
        delay = self.config.restart_delay(self._consecutive_restarts)
        self.state = State.RESTARTING
        self._start_due = time.monotonic() + delay
        self._wakeup.notify_all()
        return []
