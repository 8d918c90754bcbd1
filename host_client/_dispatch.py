"""The dispatcher under both client twins: admission, chunking, the one table of requests, and
routing to the least-loaded of the pool's worker slots.

::

    caller threads / asyncio tasks
       │ submit_embed(request) ──► Future           submit_op("health") ──► Future
       ▼                                             │
    waiting calls (round robin) ──admit──► the table {id: wire request, its frame, its route}
       one chunk per turn, cut to the       │  texts in flight ≤ max_in_flight_texts, over
       hello's max_texts_per_request,       │  the whole pool (the rest waits here, as
       max_frame_bytes and ~4 runs of       │  references to the caller's strings)
       max_batch_tokens (estimated;         │
       chunking.py)                         │ route = (slot, generation of its worker): the
                                            │ ready slot with the fewest estimated tokens
                                            │ routed to it, summed over the table
                  ┌─────────────────┬───────┴─────────┐
                  ▼                 ▼                 ▼
             WorkerSlot 0      WorkerSlot 1   ...  WorkerSlot N-1      (_slot.py: the worker
             └ worker process  └ worker process    └ worker process    process, its hello,
                  │                 │                 │                 hang watch, restarts)
                  └───── reply by id ──► the entry leaves the table ──► rows copied into the
                                         call's output array; the call's Future resolved when
                                         its last chunk is in

    lone path: a call that fits one wire request, with no call waiting before it, skips the
       waiting line: encoded first, then admitted, routed and written under one acquisition
       of the lock (same bound, same order, same errors; anything else takes the line above)

    a slot's worker died or hung ──► every entry routed to that (slot, generation) is unrouted
       (one attempt spent) ──► routed again to any ready slot, or left unrouted until one is

A request lives in one place, this table, from admission to its settling; where it was written
is a field of its entry (``route``), and what each worker holds (its load, its oldest request
for the hang watch, the stats) is read from the table. The slots own no request.

What a caller sees on failure:

* a worker death or hang: nothing, unless one of its wire requests runs out of
  ``max_attempts``; then ``RequestTimeout`` (the last worker hung) or ``ServiceUnavailable``
  (the last worker died), both carrying the worker's exit and last stderr lines. In a pool the
  other workers take the requests over at once; with one worker they wait for its replacement;
* an error reply (``invalid_input``, ``model_not_found``, ``internal``...): that exception at
  once, never retried (it would fail the same way again);
* a worker that cannot start (``ok: false`` hello, an exit before the hello, no hello within
  ``start_timeout``): on the first start of any slot, the client's start fails with that
  worker's own reason (``ModelNotFound``/``ServiceUnavailable``) and every other worker is
  stopped; later, a slot whose restart budget is spent (or whose worker refuses to start) gives
  up, and the others serve on. Once every slot has given up, every call fails fast with the
  last one's error: there is no restart loop;
* ``close()``: calls with texts not yet written fail with ``ServiceUnavailable``; every
  worker's stdin is closed so it answers what it holds (calls wholly written complete), and
  whatever is not answered within ``close_timeout`` fails with ``ServiceUnavailable`` after a
  SIGKILL. Every process is reaped.

The dispatcher's lock guards the table and the waiting line. A slot has a lock of its own: a
slot may call the dispatcher holding it, the dispatcher never takes a slot's lock holding its
own (what it asks of a slot then runs after it is released). Futures are always resolved
outside the lock: their callbacks (asyncio's, the chunk assembly) may take it.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy.typing as npt

from akidb_embed import wire
from akidb_embed.encodings import (
    DEFAULT_ENCODING,
    TRUNCATION_SIDES,
    check_encoding,
    check_truncation_side,
)
from akidb_embed.errors import (
    EmbeddingError,
    InvalidInput,
    ProtocolError,
    RequestTimeout,
    ServiceUnavailable,
    from_wire,
)
from akidb_embed.host_client._config import ClientConfig
from akidb_embed.host_client._hello import Hello
from akidb_embed.host_client._slot import WorkerSlot
from akidb_embed.host_client._types import (
    BatchEmbeddingRequest,
    BatchEmbeddingResponse,
    ClientStats,
    RequestTrace,
    Usage,
)
from akidb_embed.host_client._worker import REAP_TIMEOUT, CommandSpawner, Spawner, WorkerProcess
from akidb_embed.host_client.chunking import (
    ChunkLimits,
    EmbedCall,
    chunk_end,
    estimated_tokens,
    utf8_size,
)

__all__ = ["Dispatcher", "TraceHook"]

logger = logging.getLogger("akidb_embed.host_client")

T = TypeVar("T")

Outcome = dict[str, Any] | EmbeddingError
"""What settles a wire request: its reply (ok or error), or a failure found by the client."""
Deferred = list[Callable[[], None]]
"""Future resolutions (and slot commands) collected under the lock and run after releasing it."""
TraceHook = Callable[[RequestTrace], None]


def run(deferred: Deferred) -> None:
    for action in deferred:
        action()


class Route(NamedTuple):
    """Where a request of the table was written: a slot's worker of one generation."""

    slot: int
    generation: int
    sent_at: float
    """``time.monotonic()`` of the write: the hang watch's clock."""


@dataclass(eq=False)
class WireRequest:
    """An entry of the table: one request frame, what to do with its outcome, and its route."""

    request_id: int
    text_count: int
    tokens: int
    """Estimated tokens of its texts: what routing weighs (0 for text-free ops)."""
    settle: Callable[[Outcome], None]
    message: dict[str, Any] | None
    frame: bytes | None = None
    route: Route | None = None
    """``None`` while no worker holds it (not yet written, or its worker is gone)."""
    attempts: int = 0
    """Workers that died or hung holding it."""
    proves_progress: bool = True
    """Whether its reply shows the worker's model at work. A ``ping`` is answered by the
    worker's reader alone, so a worker stuck in the model would still answer it."""
    marks: dict[str, int] | None = None
    """The client's ``RequestTrace`` marks so far, when the client traces."""


ENCODE_ERRORS = (UnicodeEncodeError, TypeError, ValueError, OverflowError)
"""What ``wire.pack`` raises for a message it cannot encode."""
EMPTY_BATCH = "empty input batch"
TRUNCATE_WORDING = "pass truncate=True (the default)"
"""What this client says in place of the worker's ``wire.TRUNCATE_HINT``."""
"""The ``InvalidInput`` message of an embed call without inputs, as AkiDB's providers word it
(the Rust client's is the same)."""


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    CLOSING = "closing"
    CLOSED = "closed"


_SERVING = (_State.STARTING, _State.RUNNING)


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


class Dispatcher:
    """Admission, the table and routing over the pool's worker slots, shared by
    ``EmbeddingClient`` and ``AsyncEmbeddingClient``; it hands out ``concurrent.futures.Future``
    objects and leaves the waiting to them. It is the slots' ``SlotOwner``."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        spawner: Spawner | None = None,
        trace: TraceHook | None = None,
    ) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._state = _State.NEW
        self._failure: EmbeddingError | None = None
        self._started: Future[None] = Future()
        self._hello: Hello | None = None
        spawner = spawner or CommandSpawner(config)
        self._slots = [
            WorkerSlot(index, config, spawner, self, mark_frames=trace is not None)
            for index in range(config.workers)
        ]
        self._trace = trace
        self._ids = itertools.count(1)
        self._pending: dict[int, WireRequest] = {}
        """The table: every admitted request not yet settled, routed or not."""
        self._waiting: deque[EmbedCall] = deque()
        self._in_flight_texts = 0
        self._peak_in_flight_texts = 0
        self._resent_requests = 0
        self._limits_of: Hello | None = None
        self._limits_cache: dict[tuple[str | None, str | None], ChunkLimits] = {}

    # ----------------------------------------------------------------- public to the twins

    @property
    def hello(self) -> Hello | None:
        """The latest ready worker's hello (every worker serves the same models and limits);
        ``None`` before the first one."""
        return self._hello

    def start(self) -> Future[None]:
        """Start every worker slot (idempotent); the future resolves once each has said hello,
        or fails with the reason the first one that could not start gave."""
        with self._lock:
            starting = self._state is _State.NEW
            if starting:
                self._state = _State.STARTING
            waiter: Future[None] = Future()

            def relay(started: Future[None]) -> None:
                error = started.exception()
                _settle_future(waiter, _copy(error) if isinstance(error, EmbeddingError) else None)

            # A future of its own per caller: cancelling one wait (asyncio wraps the future it
            # is given and cancels it with the task) must not cancel the start for everyone.
            self._started.add_done_callback(relay)
        if starting:
            for slot in self._slots:
                slot.start()
        return waiter

    def submit_embed(
        self, request: BatchEmbeddingRequest, encoding: str = DEFAULT_ENCODING
    ) -> Future[BatchEmbeddingResponse]:
        """Queue one ``embed_batch`` call, its vectors in ``encoding``; it is split, admitted and
        sent as room allows."""
        submitted = time.monotonic_ns() if self._trace is not None else 0
        hello = self._started_hello()
        served = hello.served(request.model)
        encoding = check_encoding(encoding)
        limits = self._limits(hello, request)
        texts, sizes = self._checked_texts(request, limits)
        call = EmbedCall(request, texts, sizes, served, encoding)
        if self._trace is not None:
            call.submitted_ns = submitted
        if not self._waiting and self._send_whole(call, hello, limits):
            return call.future
        with self._lock:
            refusal = self._refusal_locked()
            if refusal is not None:
                raise refusal
            self._waiting.append(call)
            admitted = self._admit_locked()
        self._pump(admitted)
        return call.future

    def submit_tokenize(
        self,
        texts: Sequence[str],
        model: str | None,
        prompt_name: str | None,
        truncate: bool,
        truncation_side: str,
    ) -> Future[list[list[int]]]:
        """The token ids of ``texts`` (special tokens and prompt included, as the model would
        run them), in wire requests cut like an embed call's; they bypass the text bound (the
        worker answers them at once, without the model)."""
        hello = self._started_hello()
        request = BatchEmbeddingRequest(model, texts, prompt_name=prompt_name)
        truncation_side = check_truncation_side(truncation_side)
        served = hello.served(model)
        limits = self._limits(hello, request)
        texts, sizes = self._checked_texts(request, limits)
        chunks: list[Future[dict[str, Any]]] = []
        start = 0
        while start < len(texts):
            stop = chunk_end(texts, sizes, start, limits)
            message: dict[str, Any] = {"op": "tokenize", "inputs": texts[start:stop]}
            message.update(model=model, prompt_name=prompt_name, truncate=truncate)
            if truncation_side != TRUNCATION_SIDES[0]:
                message["truncation_side"] = truncation_side
            chunks.append(self._submit_message(message, start))
            start = stop
        result: Future[list[list[int]]] = Future()
        remaining = [len(chunks)]

        def collect(chunk: Future[dict[str, Any]]) -> None:
            error = chunk.exception() if not chunk.cancelled() else ServiceUnavailable("cancelled")
            if isinstance(error, EmbeddingError):
                _settle_future(result, _copy(error))
                return
            with self._lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            _settle_future(result, _token_ids([c.result() for c in chunks], served.model, texts))

        for chunk in chunks:
            chunk.add_done_callback(collect)
        return result

    def submit_ranges(
        self, model: str | None, dimensions: int | None, normalize: bool | None
    ) -> Future[dict[str, Any]]:
        """The ``quantization_ranges`` reply for an embed of ``model`` with ``dimensions`` and
        ``normalize`` (worker-side checks, like an embed's)."""
        self._started_hello()
        fields: dict[str, Any] = {"op": "quantization_ranges", "model": model}
        fields.update(dimensions=dimensions, normalize=normalize)
        return self._submit_message(fields)

    def submit_op(self, op: str) -> Future[dict[str, Any]]:
        """Send one text-free op (``ping``, ``info``, ``health``) to the least-loaded worker;
        the future holds its ok reply. These bypass the text bound: they carry no caller
        texts."""
        return self._submit_message({"op": op})

    def _started_hello(self) -> Hello:
        hello = self._hello
        if hello is None:
            with self._lock:
                error = self._refusal_locked() or ServiceUnavailable("the client is not started")
            raise error
        return hello

    def _submit_message(
        self, fields: dict[str, Any], first_index: int = 0
    ) -> Future[dict[str, Any]]:
        """Send one request of ``fields`` (an id is added) outside the text bound; an
        ``InvalidInput`` about one of its inputs is mapped to the caller's index by adding
        ``first_index``."""
        op = fields["op"]
        future: Future[dict[str, Any]] = Future()

        def settle(outcome: Outcome) -> None:
            if not isinstance(outcome, EmbeddingError) and outcome.get("ok") is not True:
                outcome = self._reply_error(outcome)
                if isinstance(outcome, InvalidInput) and outcome.index is not None:
                    outcome = outcome.at(first_index + outcome.index)
            _settle_future(future, outcome)

        with self._lock:
            refusal = self._refusal_locked()
            if refusal is not None:
                raise refusal
            request_id = next(self._ids)
            request = WireRequest(
                request_id,
                text_count=0,
                tokens=0,
                settle=settle,
                message={"id": request_id, **fields},
                proves_progress=op != "ping",
            )
            self._pending[request_id] = request
        self._pump([request])
        return future

    def stats(self) -> ClientStats:
        with self._lock:
            loads = {slot.index: [0, 0] for slot in self._slots}
            for request in self._pending.values():
                route = request.route
                if route is not None:
                    loads[route.slot][0] += request.text_count
                    loads[route.slot][1] += request.tokens
            workers = tuple(slot.stats(*loads[slot.index]) for slot in self._slots)
            return ClientStats(
                worker_pid=workers[0].pid,
                spawns=sum(worker.spawns for worker in workers),
                restarts=sum(worker.restarts for worker in workers),
                resent_requests=self._resent_requests,
                in_flight_texts=self._in_flight_texts,
                peak_in_flight_texts=self._peak_in_flight_texts,
                workers=workers,
            )

    def close(self, timeout: float | None = None) -> None:
        """Stop: fail what was not sent, let every worker answer what it holds for
        ``timeout`` seconds (default ``close_timeout``), then kill it; reap everything.
        Idempotent."""
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
            closed = ServiceUnavailable("the client was closed")
            deferred: Deferred = []
            for call in self._waiting:
                deferred += self._finish_call_locked(call, closed)
            self._waiting.clear()
            unsent = [r for r in self._pending.values() if r.route is None]
            deferred += self._drop_requests_locked(unsent, closed)
            deferred.append(functools.partial(_settle_future, self._started, _copy(closed)))
            self._wakeup.notify_all()
        for slot in self._slots:
            slot.begin_close()
        run(deferred)
        deadline = time.monotonic() + grace
        for slot in self._slots:
            slot.close_input()  # all at once: the workers finish in parallel
        for slot in self._slots:
            slot.finish_close(deadline)
        with self._lock:
            left = ServiceUnavailable("the client was closed before the worker answered")
            deferred = self._drop_requests_locked(list(self._pending.values()), left)
            self._state = _State.CLOSED
            self._wakeup.notify_all()
        run(deferred)

    # ------------------------------------------------------------------ hooks of the slots

    def slot_ready(self, slot: WorkerSlot, hello: Hello) -> None:
        """``slot`` has a ready worker: send it what waits for one, admit more."""
        deferred: Deferred = []
        admitted: list[WireRequest] = []
        with self._lock:
            self._hello = hello
            if self._state is _State.STARTING and all(s.ever_ready for s in self._slots):
                self._state = _State.RUNNING
                deferred.append(functools.partial(_settle_future, self._started, None))
            if self._state in _SERVING:
                for request in list(self._pending.values()):
                    if request.route is None:
                        self._route_locked(request)
                admitted = self._admit_locked()
        run(deferred)
        self._pump(admitted)

    def slot_replied(
        self, slot: WorkerSlot, generation: int, worker: WorkerProcess, message: dict[str, Any]
    ) -> None:
        """A reply from worker ``generation`` of ``slot`` (its reader thread): the request it
        answers leaves the table and is settled; its texts' room goes to waiting calls."""
        request_id = message.get("id")
        with self._lock:
            request = self._pending.get(request_id) if isinstance(request_id, int) else None
            route = request.route if request is not None else None
            if (
                request is None
                or route is None
                or route.slot != slot.index
                or route.generation != generation
            ):
                serving = slot.serving
                if serving is not None and serving[0] == generation:
                    _log_unmatched(worker, message)
                return  # else from a worker already given up on: its requests went elsewhere
            del self._pending[request.request_id]
            self._in_flight_texts -= request.text_count
            slot.answered_requests += 1
            if request.proves_progress:  # the hang watch's clock (see _slot.py)
                worker.last_reply_at = time.monotonic()
            admitted = self._admit_locked() if self._waiting and request.text_count else None
        request.settle(message)
        if request.marks is not None:
            self._report_trace(request, worker, message)
        if admitted:
            self._pump(admitted)

    def slot_lost(self, slot: WorkerSlot, generation: int, reason: str, *, hung: bool) -> None:
        """Worker ``generation`` of ``slot`` died or hung: each request routed to it spends an
        attempt and goes to another ready worker (or waits for one), or fails when out of
        attempts."""
        with self._lock:
            held = [
                request
                for request in self._pending.values()
                if request.route is not None
                and request.route.slot == slot.index
                and request.route.generation == generation
            ]
            if self._state in (_State.CLOSING, _State.CLOSED):
                gone = ServiceUnavailable(f"the client was closing and {reason}")
                deferred = self._drop_requests_locked(held, gone)
            else:
                deferred = []
                moved = 0
                for request in held:
                    request.route = None
                    request.attempts += 1
                    if request.attempts >= self.config.max_attempts:
                        error_type = RequestTimeout if hung else ServiceUnavailable
                        error = error_type(f"gave up after {request.attempts} attempt(s): {reason}")
                        deferred += self._drop_requests_locked([request], error)
                    else:
                        moved += 1
                        self._route_locked(request)
                others = sum(s.serving is not None for s in self._slots)
                logger.warning(
                    "%s; %d request(s) it held go to %s, %d ran out of attempts",
                    reason,
                    moved,
                    f"the {others} other ready worker(s)" if others else "the next ready worker",
                    len(deferred),
                )
        run(deferred)

    def slot_gave_up(self, slot: WorkerSlot, error: EmbeddingError) -> None:
        """``slot`` will start no more workers. Before the client is ready that fails the
        start; later it fails the client only when no slot is left."""
        deferred: Deferred = []
        with self._lock:
            if self._state is _State.STARTING:
                deferred = self._fail_locked(error)
            elif self._state in _SERVING:
                left = sum(not s.given_up for s in self._slots)
                if left == 0:
                    if len(self._slots) > 1:
                        error = _reworded(
                            error, f"every worker slot gave up; the last: {error.message}"
                        )
                    deferred = self._fail_locked(error)
                else:
                    logger.error(
                        "worker slot %d gave up (%s); %d of %d slot(s) serve on",
                        slot.index,
                        error.message,
                        left,
                        len(self._slots),
                    )
        run(deferred)

    def oldest_request(self, slot: WorkerSlot, generation: int) -> tuple[float, int] | None:
        """When the oldest request routed to worker ``generation`` of ``slot`` was written, and
        how many are routed there; ``None`` for none (the hang watch's question)."""
        with self._lock:
            sent = [
                request.route.sent_at
                for request in self._pending.values()
                if request.route is not None
                and request.route.slot == slot.index
                and request.route.generation == generation
            ]
        return (min(sent), len(sent)) if sent else None

    # --------------------------------------------------------------------------- admission

    def _refusal_locked(self) -> EmbeddingError | None:
        if self._state in (_State.CLOSING, _State.CLOSED):
            return ServiceUnavailable("the client is closed")
        if self._state is _State.FAILED:
            assert self._failure is not None
            return _copy(self._failure)
        return None

    @staticmethod
    def _checked_texts(
        request: BatchEmbeddingRequest, limits: ChunkLimits
    ) -> tuple[list[str], list[int]]:
        """The inputs as a list of str and their UTF-8 sizes, each text encodable and small
        enough for the worker (a text too large for one frame would break the stream and kill
        the worker). Checked here, in the caller's thread, so that admission cannot fail."""
        if isinstance(request.inputs, (str, bytes)):
            raise InvalidInput("inputs must be a sequence of strings, not a single string")
        texts = list(request.inputs)
        if not texts:
            raise InvalidInput(EMPTY_BATCH)
        max_text_bytes = limits.max_text_bytes
        sizes = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                kind = type(text).__name__
                article = "an" if kind[0] in "aeiou" else "a"
                raise InvalidInput(f"inputs[{index}] is {article} {kind}, not a str", index)
            size = utf8_size(text, index)
            if size > max_text_bytes:
                raise InvalidInput(
                    f"inputs[{index}] has {size} UTF-8 bytes, over the worker's limit of "
                    f"{max_text_bytes} (max_text_bytes)",
                    index,
                )
            sizes.append(size)
        return texts, sizes

    def _limits(self, hello: Hello, call: BatchEmbeddingRequest | EmbedCall) -> ChunkLimits:
        """What one wire request of ``call`` may carry (cached per hello, model and prompt)."""
        key = (call.model, call.prompt_name)
        if self._limits_of is not hello:
            self._limits_of, self._limits_cache = hello, {}
        limits = self._limits_cache.get(key)
        if limits is None:
            limits = ChunkLimits.of(hello, self.config.max_in_flight_texts, call)
            self._limits_cache[key] = limits
        return limits

    def _admit_locked(self) -> list[WireRequest]:
        """Turn waiting texts into wire requests while the in-flight bound has room."""
        hello = self._hello
        if hello is None or self._state not in _SERVING:
            return []
        bound = self.config.max_in_flight_texts
        admitted: list[WireRequest] = []
        while self._waiting:
            call = self._waiting[0]
            if call.finished or call.future.cancelled():
                call.finished = True
                self._waiting.popleft()
                continue
            start = call.next_index
            if call.chunk_stop is None:
                limits = self._limits(hello, call)
                call.chunk_stop = chunk_end(call.texts, call.sizes, start, limits)
            stop = call.chunk_stop
            count = stop - start
            if self._in_flight_texts + count > bound:
                break  # first come, first served: wait for replies to make room
            request = self._wire_request(call, start, stop)
            self._count_in_locked(request)
            call.next_index, call.chunk_stop = stop, None
            call.outstanding += 1
            self._waiting.popleft()
            if not call.fully_admitted:
                self._waiting.append(call)  # round robin: one huge call does not starve others
            else:
                call.admitted_at = time.perf_counter()
            admitted.append(request)
        return admitted

    def _wire_request(self, call: EmbedCall, start: int, stop: int) -> WireRequest:
        """The wire request of ``call``'s texts ``start:stop`` (not yet encoded)."""
        request_id = next(self._ids)  # atomic: the lone path takes one without the lock
        texts = call.texts[start:stop]
        message: dict[str, Any] = {
            "id": request_id,
            "op": "embed",
            "model": call.model,
            "inputs": texts,
            "normalize": call.normalize,
            "truncate": call.truncate,
            "prompt_name": call.prompt_name,
        }
        # the newer fields only when they ask for something: the frame stays as it was
        if call.dimensions is not None:
            message["dimensions"] = call.dimensions
        if call.encoding != DEFAULT_ENCODING:
            message["encoding"] = call.encoding
        if call.truncation_side != TRUNCATION_SIDES[0]:
            message["truncation_side"] = call.truncation_side
        max_tokens = call.served.max_tokens
        tokens = sum(estimated_tokens(text, max_tokens) for text in texts)
        settle = functools.partial(self._settle_chunk, call, start, stop)
        request = WireRequest(request_id, stop - start, tokens, settle, message)
        if self._trace is not None:
            message["trace"] = True
            request.marks = {"submitted": call.submitted_ns}
        return request

    def _count_in_locked(self, request: WireRequest) -> None:
        self._pending[request.request_id] = request
        self._in_flight_texts += request.text_count
        if self._in_flight_texts > self._peak_in_flight_texts:
            self._peak_in_flight_texts = self._in_flight_texts

    def _send_whole(self, call: EmbedCall, hello: Hello, limits: ChunkLimits) -> bool:
        """The lone path: a call that fits one wire request, with no call waiting before it,
        is encoded before the lock is taken, then admitted, routed and written under a single
        acquisition of it. False, with nothing done, when the call must take the queue path
        (it needs several requests, the bound has no room, another call waits, the client
        refuses, the frame does not encode): that path then does what it always did."""
        count = len(call.texts)
        if chunk_end(call.texts, call.sizes, 0, limits) != count:
            return False
        request = self._wire_request(call, 0, count)
        try:
            self._encode(request)
        except ENCODE_ERRORS:
            return False  # the queue path fails the call with the reason
        with self._lock:
            if (
                self._state not in _SERVING
                or self._waiting
                or self._hello is not hello
                or self._in_flight_texts + count > self.config.max_in_flight_texts
            ):
                return False
            self._count_in_locked(request)
            call.next_index = count
            call.outstanding = 1
            self._route_locked(request)
        return True

    def _pump(self, requests: list[WireRequest]) -> None:
        """Encode newly admitted requests (outside the lock) and route them."""
        while requests:
            failures: list[tuple[WireRequest, EmbeddingError]] = []
            for request in requests:
                try:
                    self._encode(request)
                except ENCODE_ERRORS as exc:
                    failures.append((request, InvalidInput(f"cannot encode the request: {exc}")))
            with self._lock:
                for request in requests:
                    self._route_locked(request)
                deferred: Deferred = []
                for request, error in failures:
                    deferred += self._drop_requests_locked([request], error)
                requests = self._admit_locked() if failures else []
            run(deferred)

    @staticmethod
    def _encode(request: WireRequest) -> None:
        """Encode ``request``'s message into its frame; one of ``ENCODE_ERRORS`` for a message
        the wire cannot carry."""
        message, request.message = request.message, None
        assert message is not None
        marks = request.marks
        if marks is not None:
            marks["encoding"] = time.monotonic_ns()
        request.frame = wire.pack(message)
        if marks is not None:
            marks["encoded"] = time.monotonic_ns()

    def _route_locked(self, request: WireRequest) -> None:
        """Write ``request`` to the ready worker with the fewest estimated tokens routed to it
        in the table (ties: fewer requests, then the lower slot); with none ready it stays in
        the table unrouted, and goes to the next worker that becomes ready."""
        if (
            request.frame is None
            or request.route is not None
            or self._pending.get(request.request_id) is not request
        ):
            return
        slots = self._slots
        if len(slots) == 1:  # a single worker (the lone path's common case): no loads to weigh
            target = slots[0]
        else:
            ready = [slot for slot in slots if slot.serving is not None]
            if not ready:
                return
            target = ready[0] if len(ready) == 1 else self._least_loaded_locked(ready)
        serving = target.serving
        if serving is None:
            return
        generation, worker = serving
        if request.attempts:
            self._resent_requests += 1
        request.route = Route(target.index, generation, time.monotonic())
        marks = request.marks
        if marks is not None:
            marks["writing"] = time.monotonic_ns()
        worker.send(request.frame)
        if marks is not None:
            marks["written"] = time.monotonic_ns()

    def _least_loaded_locked(self, ready: list[WorkerSlot]) -> WorkerSlot:
        """The slot of ``ready`` whose worker holds the fewest estimated tokens, then the fewest
        requests, then the lowest index: loads summed over the table."""
        loads = {slot.index: [0, 0, slot.index] for slot in ready}
        generations = {slot.index: slot.serving[0] for slot in ready if slot.serving is not None}
        for request in self._pending.values():
            route = request.route
            if route is not None and generations.get(route.slot) == route.generation:
                load = loads[route.slot]
                load[0] += request.tokens
                load[1] += 1
        return self._slots[min(loads.values())[2]]

    def _drop_requests_locked(self, requests: list[WireRequest], error: EmbeddingError) -> Deferred:
        """Remove requests from the table, free their texts, and fail them with ``error``; a
        late reply to one of them is then ignored."""
        deferred: Deferred = []
        for request in requests:
            if self._pending.pop(request.request_id, None) is request:
                request.route = None
                self._in_flight_texts -= request.text_count
                deferred.append(functools.partial(request.settle, _copy(error)))
        return deferred

    def _report_trace(
        self, request: WireRequest, worker: WorkerProcess, reply: dict[str, Any]
    ) -> None:
        """Hand the ``trace`` hook the marks of ``request``, settled just now."""
        delivered = time.monotonic_ns()
        marks = request.marks
        assert marks is not None and self._trace is not None
        read, decoded = worker.frame_marks
        worker_marks = reply.get("trace")
        trace = RequestTrace(
            request_id=request.request_id,
            texts=request.text_count,
            submitted=marks["submitted"],
            encoding=marks["encoding"],
            encoded=marks["encoded"],
            writing=marks["writing"],
            written=marks["written"],
            read=read,
            decoded=decoded,
            delivered=delivered,
            worker=dict(worker_marks) if isinstance(worker_marks, dict) else {},
        )
        try:
            self._trace(trace)
        except Exception:  # the host's hook must not break the reader
            logger.exception("the client's trace hook failed")

    # ----------------------------------------------------------------------------- replies

    @staticmethod
    def _reply_error(reply: dict[str, Any]) -> EmbeddingError:
        error = reply.get("error")
        if not isinstance(error, dict):
            return ProtocolError(f"reply without ok and error: {sorted(reply)}")
        return from_wire(error.get("code"), error.get("message"), error.get("index"))

    def _settle_chunk(self, call: EmbedCall, start: int, stop: int, outcome: Outcome) -> None:
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
                    error = error.at(call.caller_index(start + error.index))
                    if wire.TRUNCATE_HINT in error.message:  # in this API's words
                        wording = error.message.replace(wire.TRUNCATE_HINT, TRUNCATE_WORDING)
                        error = InvalidInput(wording, error.index)
                raise error
            vectors, tokens, model = self._decode_embeddings(outcome, stop - start, call)
        except EmbeddingError as error:
            with self._lock:
                deferred = self._finish_call_locked(call, error)
            run(deferred)
            return
        call.place(start, stop, vectors)
        if call.outstanding == 1 and call.fully_admitted:
            # the call's only request in flight (fully admitted first: no chunk can follow),
            # so nothing to count with another reply under the lock
            call.total_tokens += tokens
            call.reply_model = model
            call.outstanding = 0
            call.finished = True
            _settle_future(call.future, self._response(call))
            return
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
        self, reply: dict[str, Any], count: int, call: EmbedCall
    ) -> tuple[npt.NDArray[Any], int, str]:
        shape = reply.get("shape")
        if shape != [count, call.width]:
            raise ProtocolError(f"embed reply of shape {shape!r}, expected {[count, call.width]}")
        if reply.get("dtype", DEFAULT_ENCODING) != call.encoding:
            raise ProtocolError(f"embed reply of dtype {reply.get('dtype')!r}, not {call.encoding}")
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
        vectors = wire.embeddings_from_bytes(data, (count, call.width), call.encoding)
        return vectors, int(tokens), model

    def _response(self, call: EmbedCall) -> BatchEmbeddingResponse:
        model = call.reply_model or call.served.model
        elapsed_ms = (time.perf_counter() - call.started_at) * 1000.0
        # the lone path admits at once: no admission time, no queue
        queued_s = 0.0 if call.admitted_at is None else call.admitted_at - call.started_at
        usage = Usage(call.total_tokens, elapsed_ms, queue_ms=max(queued_s * 1000.0, 0.0))
        return BatchEmbeddingResponse(model=model, embeddings=call.embeddings, usage=usage)

    def _finish_call_locked(self, call: EmbedCall, error: EmbeddingError) -> Deferred:
        if call.finished:
            return []
        call.finished = True  # its waiting texts are dropped; late replies are ignored
        return [functools.partial(_settle_future, call.future, _copy(error))]

    def _fail_locked(self, error: EmbeddingError) -> Deferred:
        """Give up for good: every waiting and pending call fails with ``error``, and so will
        every later one; every worker is stopped."""
        # while starting, the error is the caller's (raised by the constructor): not logged
        level = logging.DEBUG if self._state is _State.STARTING else logging.ERROR
        logger.log(level, "akidb-embed client gives up: %s", error.message)
        self._state = _State.FAILED
        self._failure = error
        deferred = self._drop_requests_locked(list(self._pending.values()), error)
        for call in self._waiting:
            deferred += self._finish_call_locked(call, error)
        self._waiting.clear()
        deferred.append(functools.partial(_settle_future, self._started, _copy(error)))
        self._wakeup.notify_all()
        # the slots first: a caller told of the failure may close the client at once
        return [functools.partial(s.give_up, "the client gave up on it") for s in self._slots] + (
            deferred
        )


def _token_ids(
    replies: list[dict[str, Any]], model: str, texts: list[str]
) -> list[list[int]] | EmbeddingError:
    """The ids of every text from the ok replies of a tokenize call's wire requests."""
    try:
        ids = [[int(token) for token in row] for reply in replies for row in reply["ids"]]
        models = {reply["model"] for reply in replies}
    except (KeyError, TypeError, ValueError) as exc:
        return ProtocolError(f"malformed tokenize reply: {exc!r}")
    if len(ids) != len(texts) or models != {model}:
        return ProtocolError(f"tokenize replies hold {len(ids)} rows of {models}")
    return ids


def _reworded(error: EmbeddingError, message: str) -> EmbeddingError:
    if isinstance(error, InvalidInput):
        return InvalidInput(message, error.index)
    return type(error)(message)


def _log_unmatched(worker: WorkerProcess, message: dict[str, Any]) -> None:
    error = message.get("error")
    if message.get("ok") is False and isinstance(error, dict):
        logger.error(
            "worker %s reported %s: %s", worker.pid, error.get("code"), error.get("message")
        )
    else:
        logger.warning("worker %s answered unknown request id %r", worker.pid, message.get("id"))
