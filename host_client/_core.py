"""The one core under both client twins: admission, the pending table and supervision.

::

    caller threads / asyncio tasks
       │ submit_embed(request) ──► Future           submit_op("health") ──► Future
       ▼                                             │
    waiting calls (round robin) ──admit──► pending table {id: wire request + its frame}
       one chunk per turn, cut to the       │  ▲ texts in flight ≤ max_in_flight_texts
       hello's max_texts_per_request,       │  │ (the rest waits here, as references)
       max_frame_bytes and ~4 runs of       │  │
       max_batch_tokens (estimated)         ▼  │
                            WorkerProcess.send ─► worker ─► reader thread ─► reply by id
                                                               │
       call's output array ◄── rows copied in place ◄──────────┘
       call's Future resolved when its last chunk is in

    supervisor thread (the KernelRestarter part):
       spawn ─► hello (start_timeout) ─► install ─► send every pending request
         ▲                                              │
         │ backoff 0.05 s doubling to 2 s                │ stdout EOF (crash, kill -9, OOM)
         │ (restart_limit in a row, reset by a           │ or no reply for request_timeout
         │  worker that ran stable_start_time)           │ (hung/stopped: SIGKILL first)
         └──────────── pending requests stay pending ◄───┘ each costs one of max_attempts

What a caller sees on failure:

* a worker death or hang: nothing, unless one of its wire requests runs out of
  ``max_attempts``; then ``RequestTimeout`` (the last worker hung) or ``ServiceUnavailable``
  (the last worker died), both carrying the worker's exit and last stderr lines;
* an error reply (``invalid_input``, ``model_not_found``, ``internal``...): that exception at
  once, never retried (it would fail the same way again);
* a worker that cannot start (``ok: false`` hello, an exit before the hello, no hello within
  ``start_timeout``): on the first start, every call fails fast with the worker's own reason
  (``ModelNotFound``/``ServiceUnavailable``); on a restart, a failed start counts against
  ``restart_limit``; a refused hello (``ok: false``) is final at once. Once given up, every
  call fails fast with the same error: there is no restart loop;
* ``close()``: calls with texts not yet written fail with ``ServiceUnavailable``; the worker's
  stdin is closed so it answers what it holds (calls wholly written complete), and whatever it
  has not answered within ``close_timeout`` fails with ``ServiceUnavailable`` after a SIGKILL.
  Every process is reaped.

Futures are always resolved outside the core's lock: their callbacks (asyncio's, the chunk
assembly) may take it.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from akidb_embed import wire
from akidb_embed.errors import (
    EmbeddingError,
    Internal,
    InvalidInput,
    ProtocolError,
    RequestTimeout,
    ServiceUnavailable,
    from_wire,
)
from akidb_embed.host_client._config import ClientConfig
from akidb_embed.host_client._types import (
    BatchEmbeddingRequest,
    BatchEmbeddingResponse,
    ClientStats,
    ModelInfo,
    Usage,
)
from akidb_embed.host_client._worker import (
    REAP_TIMEOUT,
    STDERR_DRAIN_TIMEOUT,
    Hello,
    WorkerProcess,
    parse_hello,
)

__all__ = ["Core"]

logger = logging.getLogger("akidb_embed.host_client")

T = TypeVar("T")
Outcome = dict[str, Any] | EmbeddingError
"""What settles a wire request: its reply (ok or error), or a failure found by the client."""
Deferred = list[Callable[[], None]]
"""Future resolutions collected under the lock and run after releasing it."""

ENVELOPE_BYTES = 256
"""Room in an embed frame for everything but the texts, the model and the prompt name (id, op,
flags)."""
EMPTY_BATCH = "empty input batch"
"""The ``InvalidInput`` message of an embed call without inputs, as AkiDB's providers word it
(the Rust client's is the same)."""
TEXT_HEADER_BYTES = 5
"""Largest msgpack header of one str."""
SPECIAL_TOKENS = 2
"""[CLS] and [SEP] around every input (an estimate: only chunk sizes depend on it)."""
CHUNK_MICRO_BATCHES = 4
"""An embed wire request carries about this many of the worker's ONNX Runtime runs
(``max_batch_tokens``) of estimated tokens: a busy worker then answers something every few
seconds, which is how ``request_timeout`` tells a busy worker from a hung one."""

NOT_SENT = 0
"""``sent_generation`` of a request that no live worker holds; generations start at 1."""


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    CLOSING = "closing"
    CLOSED = "closed"


_SUPERVISED = (_State.STARTING, _State.RUNNING, _State.RESTARTING)


@dataclass(eq=False)
class _WireRequest:
    """One request frame and what to do with its outcome."""

    request_id: int
    text_count: int
    settle: Callable[[Outcome], None]
    message: dict[str, Any] | None
    frame: bytes | None = None
    sent_generation: int = NOT_SENT
    sent_at: float = 0.0
    attempts: int = 0
    proves_progress: bool = True
    """Whether its reply shows the worker's model at work. A ``ping`` is answered by the
    worker's reader alone, so a worker stuck in the model would still answer it."""


class _EmbedCall:
    """One ``embed_batch`` call: its texts, how far they were admitted, and its output."""

    def __init__(
        self, request: BatchEmbeddingRequest, texts: list[str], sizes: list[int], served: ModelInfo
    ) -> None:
        self.future: Future[BatchEmbeddingResponse] = Future()
        # The texts go out shortest first: each wire request, and so each of the worker's
        # micro-batches, then holds texts of similar length and pads little (measured: +10%
        # texts/s on the mixed-length bench corpus). ``order[i]`` is the caller's index of the
        # i-th text sent; replies are written back to those rows.
        self.order = np.argsort(np.asarray(sizes, dtype=np.int64), kind="stable")
        self.texts = [texts[i] for i in self.order]
        self.sizes = [sizes[i] for i in self.order]
        """UTF-8 bytes of each text, in sending order."""
        self.model = request.model
        self.served = served
        """The model the worker announced under that name (the default one for ``None``)."""
        self.normalize = request.normalize
        self.truncate = request.truncate
        self.prompt_name = request.prompt_name
        dimension = self.dimension = served.dimension
        self.embeddings: npt.NDArray[np.float32] = np.empty((len(texts), dimension), np.float32)
        self.next_index = 0
        self.chunk_stop: int | None = None
        """End of the next chunk once computed (it waits for room in the in-flight bound)."""
        self.outstanding = 0
        self.total_tokens = 0
        self.reply_model = ""
        self.finished = False
        self.started_at = time.perf_counter()

    @property
    def fully_admitted(self) -> bool:
        return self.next_index >= len(self.texts)


def _copy(error: EmbeddingError) -> EmbeddingError:
    """A fresh instance per waiter: one exception object raised in many threads would share
    (and keep growing) one traceback."""
    if isinstance(error, InvalidInput):
        return InvalidInput(error.message, error.index)
    return type(error)(error.message)


def _settle_future(future: Future[T], outcome: T | EmbeddingError) -> None:
    try:
        if isinstance(outcome, EmbeddingError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass  # the waiter cancelled it (asyncio cancellation, KeyboardInterrupt)


def _run(deferred: Deferred) -> None:
    for action in deferred:
        action()


def utf8_size(text: str, index: int) -> int:
    """Bytes of ``text`` in UTF-8 (ASCII text, the common case, without encoding it)."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"inputs[{index}] is not valid Unicode text: {exc}", index) from None


@dataclass(frozen=True)
class ChunkLimits:
    """How much one embed wire request may carry, from a worker's hello."""

    max_texts: int
    max_payload_bytes: int
    max_tokens_per_text: int
    max_chunk_tokens: int

    @classmethod
    def of(
        cls, hello: Hello, max_in_flight_texts: int, request: BatchEmbeddingRequest | _EmbedCall
    ) -> ChunkLimits:
        named = len((request.model or "").encode("utf-8"))
        named += len((request.prompt_name or "").encode("utf-8"))
        max_tokens = hello.served(request.model).max_tokens
        return cls(
            max_texts=min(hello.max_texts_per_request, max_in_flight_texts),
            max_payload_bytes=hello.max_frame_bytes - ENVELOPE_BYTES - named,
            max_tokens_per_text=max_tokens,
            max_chunk_tokens=CHUNK_MICRO_BATCHES * max(hello.max_batch_tokens, max_tokens),
        )


def chunk_end(texts: Sequence[str], sizes: Sequence[int], start: int, limits: ChunkLimits) -> int:
    """End of the chunk starting at ``start``: at most ``max_texts`` texts whose UTF-8 ``sizes``
    fit ``max_payload_bytes`` and whose estimated tokens fit ``max_chunk_tokens``; a single
    text always makes a chunk (its size was checked before).

    Tokens are estimated without a tokenizer: WordPiece makes at most one token per character,
    plus the special tokens, and truncation caps the count at ``max_tokens``.
    """
    stop_limit = min(len(texts), start + limits.max_texts)
    used_bytes = used_tokens = 0
    for index in range(start, stop_limit):
        text = texts[index]
        tokens = min(len(text) + SPECIAL_TOKENS, limits.max_tokens_per_text)
        size = sizes[index] + TEXT_HEADER_BYTES
        over = (
            used_bytes + size > limits.max_payload_bytes
            or used_tokens + tokens > limits.max_chunk_tokens
        )
        if over and index > start:
            return index
        used_bytes += size
        used_tokens += tokens
    return stop_limit


class Core:
    """Supervision and request routing shared by ``EmbeddingClient`` and
    ``AsyncEmbeddingClient``; it hands out ``concurrent.futures.Future`` objects and leaves the
    waiting to them."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._state = _State.NEW
        self._failure: EmbeddingError | None = None
        self._started: Future[None] = Future()
        self._supervisor: threading.Thread | None = None
        self._hello: Hello | None = None
        self._worker: WorkerProcess | None = None
        self._starting_worker: WorkerProcess | None = None
        self._generation = NOT_SENT
        self._start_due: float | None = None
        self._consecutive_restarts = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, _WireRequest] = {}
        self._waiting: deque[_EmbedCall] = deque()
        self._in_flight_texts = 0
        self._peak_in_flight_texts = 0
        self._spawns = 0
        self._restarts = 0
        self._resent_requests = 0

    # ----------------------------------------------------------------- public to the twins

    @property
    def hello(self) -> Hello | None:
        """The serving (or last) worker's hello; ``None`` before the first one."""
        return self._hello

    def start(self) -> Future[None]:
        """Start supervising (idempotent); the future resolves at the first hello or fails
        with the reason the first worker could not start."""
        with self._lock:
            if self._state is _State.NEW:
                self._state = _State.STARTING
                self._start_due = time.monotonic()
                self._supervisor = threading.Thread(
                    target=self._supervise, name="akidb-embed-supervisor", daemon=True
                )
                self._supervisor.start()
            waiter: Future[None] = Future()

            def relay(started: Future[None]) -> None:
                error = started.exception()
                _settle_future(waiter, _copy(error) if isinstance(error, EmbeddingError) else None)

            # A future of its own per caller: cancelling one wait (asyncio wraps the future it
            # is given and cancels it with the task) must not cancel the start for everyone.
            self._started.add_done_callback(relay)
            return waiter

    def submit_embed(self, request: BatchEmbeddingRequest) -> Future[BatchEmbeddingResponse]:
        """Queue one ``embed_batch`` call; it is split, admitted and sent as room allows."""
        hello = self._hello
        if hello is None:
            with self._lock:
                error = self._refusal_locked() or ServiceUnavailable("the client is not started")
            raise error
        served = hello.served(request.model)
        texts, sizes = self._checked_texts(request, hello)
        call = _EmbedCall(request, texts, sizes, served)
        with self._lock:
            refusal = self._refusal_locked()
            if refusal is not None:
                raise refusal
            self._waiting.append(call)
            admitted = self._admit_locked()
        self._pump(admitted)
        return call.future

    def submit_op(self, op: str) -> Future[dict[str, Any]]:
        """Send one text-free op (``ping``, ``info``, ``health``); the future holds its ok
        reply. These bypass the text bound: they carry no caller texts."""
        future: Future[dict[str, Any]] = Future()

        def settle(outcome: Outcome) -> None:
            if not isinstance(outcome, EmbeddingError) and outcome.get("ok") is not True:
                outcome = self._reply_error(outcome)
            _settle_future(future, outcome)

        with self._lock:
            refusal = self._refusal_locked()
            if refusal is not None:
                raise refusal
            request_id = next(self._ids)
            request = _WireRequest(
                request_id,
                0,
                settle,
                message={"id": request_id, "op": op},
                proves_progress=op != "ping",
            )
            self._pending[request_id] = request
        self._pump([request])
        return future

    def stats(self) -> ClientStats:
        with self._lock:
            worker = self._worker
            return ClientStats(
                worker_pid=worker.pid if worker is not None else None,
                spawns=self._spawns,
                restarts=self._restarts,
                resent_requests=self._resent_requests,
                in_flight_texts=self._in_flight_texts,
                peak_in_flight_texts=self._peak_in_flight_texts,
            )

    def close(self, timeout: float | None = None) -> None:
        """Stop: fail what was not sent, let the worker answer what it holds for ``timeout``
        seconds (default ``close_timeout``), then kill it; reap everything. Idempotent."""
        grace = self.config.close_timeout if timeout is None else timeout
        with self._lock:
            if self._state is _State.CLOSED:
                return
            if self._state is _State.CLOSING:  # another thread is closing: wait for it
                self._wakeup.wait_for(
                    lambda: self._state is _State.CLOSED, grace + REAP_TIMEOUT + 5.0
                )
                return
            self._state = _State.CLOSING
            self._start_due = None
            closed = ServiceUnavailable("the client was closed")
            deferred: Deferred = []
            for call in self._waiting:
                deferred += self._finish_call_locked(call, closed)
            self._waiting.clear()
            unsent = [r for r in self._pending.values() if r.sent_generation == NOT_SENT]
            deferred += self._drop_requests_locked(unsent, closed)
            deferred.append(functools.partial(_settle_future, self._started, _copy(closed)))
            worker, starting = self._worker, self._starting_worker
            self._wakeup.notify_all()
        _run(deferred)
        if starting is not None:
            starting.kill("the client was closed while it started")
        if worker is not None:
            worker.close_input()
            if not worker.wait_exited(grace):
                worker.kill(f"still running {grace:g} s after its stdin was closed")
                worker.wait_exited(REAP_TIMEOUT + STDERR_DRAIN_TIMEOUT + 1.0)
        with self._lock:
            self._worker = None
            left = ServiceUnavailable("the client was closed before the worker answered")
            deferred = self._drop_requests_locked(list(self._pending.values()), left)
            self._state = _State.CLOSED
            self._wakeup.notify_all()
        _run(deferred)
        for thread_owner in (worker, starting):
            if thread_owner is not None:
                thread_owner.join_threads(STDERR_DRAIN_TIMEOUT)
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(self.config.start_timeout)

    # --------------------------------------------------------------------------- admission

    def _refusal_locked(self) -> EmbeddingError | None:
        if self._state in (_State.CLOSING, _State.CLOSED):
            return ServiceUnavailable("the client is closed")
        if self._state is _State.FAILED:
            assert self._failure is not None
            return _copy(self._failure)
        return None

    def _checked_texts(
        self, request: BatchEmbeddingRequest, hello: Hello
    ) -> tuple[list[str], list[int]]:
        """The inputs as a list of str and their UTF-8 sizes, each text encodable and small
        enough for the worker (a text too large for one frame would break the stream and kill
        the worker). Checked here, in the caller's thread, so that admission cannot fail."""
        if isinstance(request.inputs, (str, bytes)):
            raise InvalidInput("inputs must be a sequence of strings, not a single string")
        texts = list(request.inputs)
        if not texts:
            raise InvalidInput(EMPTY_BATCH)
        frame_room = ChunkLimits.of(hello, 1, request).max_payload_bytes - TEXT_HEADER_BYTES
        max_text_bytes = min(hello.max_text_bytes, frame_room)
        sizes = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInput(f"inputs[{index}] is a {type(text).__name__}, not a str", index)
            size = utf8_size(text, index)
            if size > max_text_bytes:
                raise InvalidInput(
                    f"inputs[{index}] has {size} UTF-8 bytes, over the worker's limit of "
                    f"{max_text_bytes} (max_text_bytes)",
                    index,
                )
            sizes.append(size)
        return texts, sizes

    def _admit_locked(self) -> list[_WireRequest]:
        """Turn waiting texts into wire requests while the in-flight bound has room."""
        hello = self._hello
        if hello is None or self._state not in _SUPERVISED:
            return []
        bound = self.config.max_in_flight_texts
        admitted: list[_WireRequest] = []
        while self._waiting:
            call = self._waiting[0]
            if call.finished or call.future.cancelled():
                call.finished = True
                self._waiting.popleft()
                continue
            start = call.next_index
            if call.chunk_stop is None:
                limits = ChunkLimits.of(hello, bound, call)
                call.chunk_stop = chunk_end(call.texts, call.sizes, start, limits)
            stop = call.chunk_stop
            count = stop - start
            if self._in_flight_texts + count > bound:
                break  # first come, first served: wait for replies to make room
            request_id = next(self._ids)
            message = {
                "id": request_id,
                "op": "embed",
                "model": call.model,
                "inputs": call.texts[start:stop],
                "normalize": call.normalize,
                "truncate": call.truncate,
                "prompt_name": call.prompt_name,
            }
            settle = functools.partial(self._settle_chunk, call, start, stop)
            request = _WireRequest(request_id, count, settle, message)
            self._pending[request_id] = request
            self._in_flight_texts += count
            self._peak_in_flight_texts = max(self._peak_in_flight_texts, self._in_flight_texts)
            call.next_index, call.chunk_stop = stop, None
            call.outstanding += 1
            self._waiting.popleft()
            if not call.fully_admitted:
                self._waiting.append(call)  # round robin: one huge call does not starve others
            admitted.append(request)
        return admitted

    def _pump(self, requests: list[_WireRequest]) -> None:
        """Encode newly admitted requests (outside the lock) and send them."""
        while requests:
            failures: list[tuple[_WireRequest, EmbeddingError]] = []
            for request in requests:
                assert request.message is not None
                try:
                    request.frame = wire.pack(request.message)
                except (UnicodeEncodeError, TypeError, ValueError, OverflowError) as exc:
                    failures.append((request, InvalidInput(f"cannot encode the request: {exc}")))
                request.message = None
            with self._lock:
                for request in requests:
                    if request.frame is not None:
                        self._send_locked(request)
                deferred: Deferred = []
                for request, error in failures:
                    deferred += self._drop_requests_locked([request], error)
                requests = self._admit_locked() if failures else []
            _run(deferred)

    def _send_locked(self, request: _WireRequest) -> None:
        worker = self._worker
        if (
            worker is None
            or request.frame is None
            or self._pending.get(request.request_id) is not request
            or request.sent_generation == worker.generation
        ):
            return  # no worker now: sent when the next one is installed
        request.sent_generation = worker.generation
        request.sent_at = time.monotonic()
        worker.sent_unanswered += 1
        if worker.sent_unanswered == 1:
            self._wakeup.notify_all()  # the supervisor has a deadline to watch again
        worker.send(request.frame)

    def _drop_requests_locked(
        self, requests: list[_WireRequest], error: EmbeddingError
    ) -> Deferred:
        """Remove requests from the table, free their texts, and fail them with ``error``."""
        deferred: Deferred = []
        for request in requests:
            if self._pending.pop(request.request_id, None) is request:
                self._in_flight_texts -= request.text_count
                deferred.append(functools.partial(request.settle, _copy(error)))
        return deferred

    # ----------------------------------------------------------------------------- replies

    def _on_frame(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        """A reply from a worker (its reader thread): settle the request it answers."""
        request_id = message.get("id")
        with self._lock:
            if worker is not self._worker:
                return  # from a worker already given up on; its requests went elsewhere
            request = self._pending.get(request_id) if isinstance(request_id, int) else None
            if request is None or request.sent_generation != worker.generation:
                self._log_unmatched(worker, message)
                return
            if request.proves_progress:
                worker.last_reply_at = time.monotonic()
            del self._pending[request.request_id]
            worker.sent_unanswered -= 1
            self._in_flight_texts -= request.text_count
            admitted = self._admit_locked() if request.text_count else []
        request.settle(message)
        self._pump(admitted)

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

    @staticmethod
    def _reply_error(reply: dict[str, Any]) -> EmbeddingError:
        error = reply.get("error")
        if not isinstance(error, dict):
            return ProtocolError(f"reply without ok and error: {sorted(reply)}")
        return from_wire(error.get("code"), error.get("message"), error.get("index"))

    def _settle_chunk(self, call: _EmbedCall, start: int, stop: int, outcome: Outcome) -> None:
        """One chunk's outcome: rows copied into the call's output, or the call failed."""
        if call.finished:
            return
        try:
            if isinstance(outcome, EmbeddingError):
                raise outcome
            if outcome.get("ok") is not True:
                error = self._reply_error(outcome)
                if isinstance(error, InvalidInput) and error.index is not None:
                    if not 0 <= error.index < stop - start:
                        raise ProtocolError(f"error about inputs[{error.index}] of {stop - start}")
                    error = error.at(int(call.order[start + error.index]))
                raise error
            vectors, tokens, model = self._decode_embeddings(outcome, stop - start, call)
        except EmbeddingError as error:
            with self._lock:
                deferred = self._finish_call_locked(call, error)
            _run(deferred)
            return
        call.embeddings[call.order[start:stop]] = vectors
        with self._lock:
            call.total_tokens += tokens
            call.reply_model = model
            call.outstanding -= 1
            done = not call.finished and call.fully_admitted and call.outstanding == 0
            if done:
                call.finished = True
        if done:
            _settle_future(call.future, self._response(call))

    def _decode_embeddings(
        self, reply: dict[str, Any], count: int, call: _EmbedCall
    ) -> tuple[npt.NDArray[np.float32], int, str]:
        shape = reply.get("shape")
        if shape != [count, call.dimension]:
            raise ProtocolError(
                f"embed reply of shape {shape!r}, expected {[count, call.dimension]}"
            )
        model = reply.get("model")
        if model != call.served.model:
            raise ProtocolError(
                f"embed reply from model {model!r}, the request was for {call.served.model!r}"
            )
        data = reply.get("embeddings")
        if not isinstance(data, bytes):
            raise ProtocolError("embed reply without embeddings bytes")
        usage = reply.get("usage")
        tokens = usage.get("total_tokens", 0) if isinstance(usage, dict) else 0
        return wire.embeddings_from_bytes(data, (count, call.dimension)), int(tokens), model

    def _response(self, call: _EmbedCall) -> BatchEmbeddingResponse:
        model = call.reply_model or call.served.model
        elapsed_ms = (time.perf_counter() - call.started_at) * 1000.0
        return BatchEmbeddingResponse(
            model=model,
            embeddings=call.embeddings,
            usage=Usage(total_tokens=call.total_tokens, duration_ms=elapsed_ms),
        )

    def _finish_call_locked(self, call: _EmbedCall, error: EmbeddingError) -> Deferred:
        if call.finished:
            return []
        call.finished = True  # its waiting texts are dropped; late replies are ignored
        return [functools.partial(_settle_future, call.future, _copy(error))]

    # ------------------------------------------------------------------------- supervision

    def _supervise(self) -> None:
        try:
            while self._wait_for_start_due():
                self._start_worker()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            logger.exception("the akidb-embed supervisor failed")
            with self._lock:
                deferred = self._fail_locked(Internal(f"the client's supervisor failed: {exc!r}"))
            _run(deferred)

    def _wait_for_start_due(self) -> bool:
        """Sleep until a worker must be started (True) or supervision is over (False); kill
        the serving worker meanwhile if it holds requests and answers none for too long."""
        with self._lock:
            while True:
                if self._state not in _SUPERVISED:
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
                self._wakeup.wait(min(wake_times) - now if wake_times else None)

    def _hang_deadline_locked(self) -> float | None:
        """When the serving worker counts as hung: ``request_timeout`` after the later of its
        oldest unanswered request and its last reply of any kind."""
        worker = self._worker
        if worker is None or worker.sent_unanswered == 0 or worker.kill_reason is not None:
            return None
        oldest = min(
            (r.sent_at for r in self._pending.values() if r.sent_generation == worker.generation),
            default=None,
        )
        if oldest is None:
            return None
        return max(oldest, worker.last_reply_at) + self.config.request_timeout

    def _kill_hung_locked(self) -> None:
        worker = self._worker
        assert worker is not None
        reason = (
            f"no reply for {self.config.request_timeout:g} s while holding "
            f"{worker.sent_unanswered} request(s): hung or stopped"
        )
        logger.warning("worker %s: %s; killing it", worker.pid, reason)
        worker.hung = True
        worker.kill(reason)  # the reader sees EOF and reports the exit like any death

    def _start_worker(self) -> None:
        with self._lock:
            if self._state not in _SUPERVISED:
                return
            self._generation += 1
            worker = WorkerProcess(
                self.config.worker_argv(),
                self.config.worker_env(),
                generation=self._generation,
                on_frame=self._on_frame,
                on_exit=self._on_exit,
            )
            self._starting_worker = worker
            self._spawns += 1
            first_start = self._hello is None
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
        logger.error("the worker could not start: %s", error.message)
        with self._lock:
            self._starting_worker = None
            if self._state not in _SUPERVISED:
                return
            if final:
                deferred = self._fail_locked(error)
            else:
                deferred = self._schedule_restart_locked(error.message, stable=False)
        _run(deferred)

    def _retire(self, worker: WorkerProcess) -> None:
        """End a worker that will not serve: close its stdin, then kill it if it lingers."""
        worker.close_input()
        if not worker.wait_exited(1.0):
            worker.kill("not needed")
            worker.wait_exited(REAP_TIMEOUT + STDERR_DRAIN_TIMEOUT + 1.0)

    def _install(self, worker: WorkerProcess, hello: Hello) -> None:
        """Make a worker that sent a good hello the serving one and send it every request
        still pending (those of a dead predecessor included)."""
        deferred: Deferred = []
        admitted: list[_WireRequest] = []
        with self._lock:
            self._starting_worker = None
            supervised = self._state in _SUPERVISED
            if supervised and worker.exit_description is not None:
                deferred = self._handle_death_locked(worker)  # died right after its hello
            elif supervised:
                self._hello = hello
                worker.ready_at = worker.last_reply_at = time.monotonic()
                worker.accept_replies_up_to(hello.max_reply_bytes())
                self._worker = worker
                if self._state is _State.RESTARTING:
                    self._restarts += 1
                self._state = _State.RUNNING
                for request in list(self._pending.values()):
                    if request.attempts:
                        self._resent_requests += 1
                    self._send_locked(request)
                admitted = self._admit_locked()
                deferred = [functools.partial(_settle_future, self._started, None)]
        if not supervised:
            self._retire(worker)  # closed or given up while it started
            return
        logger.info(
            "worker %s ready: %s (dimension %d) on %s",
            hello.pid,
            hello.model,
            hello.dimension,
            ", ".join(hello.providers) or "?",
        )
        _run(deferred)
        self._pump(admitted)

    def _on_exit(self, worker: WorkerProcess) -> None:
        """The reader of ``worker`` saw its end (the process is reaped)."""
        with self._lock:
            if worker is not self._worker:
                return  # a starting worker (its hello future says why) or one replaced already
            deferred = self._handle_death_locked(worker)
        _run(deferred)

    def _handle_death_locked(self, worker: WorkerProcess) -> Deferred:
        """The serving worker is gone: its requests wait for the next worker (or fail when out
        of attempts), and a restart is scheduled."""
        if self._worker is worker:
            self._worker = None
        uptime = time.monotonic() - (worker.ready_at or time.monotonic())
        reason = f"{worker.describe()} after {uptime:.1f} s of service"
        if worker.returncode != -signal.SIGKILL:  # a crash may have said why; a SIGKILL cannot
            tail = worker.stderr_tail(5)
            reason += f"; its stderr ends with:\n{tail}" if tail else ""
        if self._state is _State.CLOSING:
            gone = ServiceUnavailable(f"the client was closing and {reason}")
            return self._drop_requests_locked(list(self._pending.values()), gone)
        deferred: Deferred = []
        held = 0
        for request in list(self._pending.values()):
            if request.sent_generation != worker.generation:
                continue
            held += 1
            request.sent_generation = NOT_SENT
            request.attempts += 1
            if request.attempts >= self.config.max_attempts:
                error_type = RequestTimeout if worker.hung else ServiceUnavailable
                error = error_type(f"gave up after {request.attempts} attempt(s): {reason}")
                deferred += self._drop_requests_locked([request], error)
        logger.warning(
            "%s; %d request(s) it held go to the next worker, %d ran out of attempts",
            reason,
            held - len(deferred),
            len(deferred),
        )
        stable = uptime >= self.config.stable_start_time
        return deferred + self._schedule_restart_locked(reason, stable=stable)

    def _schedule_restart_locked(self, reason: str, *, stable: bool) -> Deferred:
        if stable:
            self._consecutive_restarts = 0
        self._consecutive_restarts += 1
        if self._consecutive_restarts > self.config.restart_limit:
            return self._fail_locked(
                ServiceUnavailable(
                    f"giving up after {self._consecutive_restarts - 1} restart(s) in a row "
                    f"(restart_limit={self.config.restart_limit}); the last failure: {reason}"
                )
            )
        delay = self.config.restart_delay(self._consecutive_restarts)
        self._state = _State.RESTARTING
        self._start_due = time.monotonic() + delay
        self._wakeup.notify_all()
        return []

    def _fail_locked(self, error: EmbeddingError) -> Deferred:
        """Give up for good: every waiting and pending call fails with ``error``, and so will
        every later one."""
        logger.error("akidb-embed client gives up: %s", error.message)
        self._state = _State.FAILED
        self._failure = error
        self._start_due = None
        deferred = self._drop_requests_locked(list(self._pending.values()), error)
        for call in self._waiting:
            deferred += self._finish_call_locked(call, error)
        self._waiting.clear()
        deferred.append(functools.partial(_settle_future, self._started, _copy(error)))
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill("the client gave up on it")
        self._wakeup.notify_all()
        return deferred
