"""The worker's serving loop: frames in on the private stdin, frames out on the private stdout.

::

    host --frame--> the input's holder (one lane thread at a time; batcher.py)
                     | unpack, validate        ping/info: reply at once
                     | embed: route by model,  shutdown/EOF: stop reading
                     |   prompt, tokenize
                     |
                     +-- a frame waiting behind it, or no lane free --> queue (one per model)
                     |                                                    |
                     +-- nothing else waiting, a lane free: run_now:      | free lanes (up to
                     |   hands the input to an idle lane thread and runs  | --lanes at once):
                     |   the query here, as one micro-batch               | round-robin over
                     v                                                    | models, snapshot,
                 ONNX Runtime (the model's one session, --threads) <------+ sorted, cut into
                     |   --> vectors                                        micro-batches
                     v
    host <--frame-- writer (one lock, private stdout): a reply when a request's texts are
                    all done (any order, from whichever lane finished it)

A lone query runs in the thread that read it (``Batcher.run_now``): no hand-over to another
thread, whose wake-up would add to its latency; with more than one lane, another lane thread
takes over the reading meanwhile, so requests arriving during the run are read and start on
free lanes. Requests that arrive together (a frame already waiting behind the one just read) go
through the queue and share runs.

What happens when something fails:

* A frame that is not a msgpack map, a bad envelope (id, op), bad embed fields, a string that
  is not UTF-8, an id already in flight: one error reply (protocol_error / invalid_input /
  model_not_found, with the id whenever it could be read), and the reader goes on.
* A broken stream (frame over ``max_frame_bytes``, EOF inside a frame): one protocol_error
  reply with id nil, the queued requests are finished and answered, exit code 3.
* An exception while running a micro-batch: each request in it is retried alone; those that
  still fail get an ``internal`` reply, the others their vectors; the worker keeps serving.
  An exception anywhere else is a bug: logged, exit code 1.
* EOF on stdin, ``shutdown``, SIGTERM or SIGINT: stop reading, answer everything already read
  (then the shutdown's own reply), exit 0. A signal wakes the main thread at once (through
  ``signal.set_wakeup_fd``); a frame the reader was waiting for when the stop came is answered
  ``service_unavailable``. The host closing our stdout: nobody can read replies; exit 0.
* The parent process dies: exit at once (code 0), so a crashed host leaves no orphan.
* A model or the provider cannot load (or two directories hold the same model id): a hello
  with ``ok: false`` naming the directory, exit 4 or 5, nothing read.

Nothing from a request is ever used as a path, unpickled or evaluated: requests carry texts and
flags only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from akidb_embed import __version__
from akidb_embed.encodings import DEFAULT_ENCODING, OutputForm
from akidb_embed.errors import (
    EmbeddingError,
    Internal,
    InvalidInput,
    ModelNotFound,
    ServiceUnavailable,
)
from akidb_embed.wire import (
    PROTOCOL_VERSION,
    FrameEncoder,
    FrameError,
    FrameReader,
    embeddings_to_bytes,
    error_reply,
    pack,
)
from akidb_embed.worker.batcher import Batcher, Job
from akidb_embed.worker.config import WorkerConfig
from akidb_embed.worker.validation import (
    EmbedRequest,
    RangesRequest,
    RejectedRequest,
    RequestLimits,
    TokenizeRequest,
    parse_payload,
)

if TYPE_CHECKING:  # imported for real inside serve(), where a missing dependency is reported
    from akidb_embed.worker.engine import Engine

__all__ = [
    "EXIT_BAD_ARGUMENTS",
    "EXIT_BROKEN_STREAM",
    "EXIT_INTERNAL",
    "EXIT_MODEL_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "HEALTH_SENTENCE",
    "FrameWriter",
    "serve",
]

log = logging.getLogger(__name__)

# exit codes, protocol.md section 8
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_ARGUMENTS = 2
EXIT_BROKEN_STREAM = 3
EXIT_MODEL_NOT_FOUND = 4
EXIT_UNAVAILABLE = 5

HEALTH_SENTENCE = "The quick brown fox jumps over the lazy dog."
HEALTH_NORM_TOLERANCE = 1e-3
PARENT_POLL_SECONDS = 0.5
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_STOPPING = 0
"""The byte ``_stop`` writes to the main thread's wake-up socket (signals write their number)."""


class FrameWriter:
    """The only writer of the protocol's stdout: whole frames, one at a time."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._encoder = FrameEncoder()
        self.on_broken: Callable[[], None] = lambda: None
        self.broken = False

    def close(self) -> None:
        """Write nothing more; waits for a frame being written to be complete."""
        with self._lock:
            self.broken = True

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            if self.broken:
                return
            prefix, payload = self._encoder.encode(message)
            try:
                written = os.writev(self._fd, (prefix, payload))
                if written < len(prefix) + len(payload):  # a reply larger than the pipe holds
                    rest = memoryview(prefix + payload)[written:]
                    while rest:
                        rest = rest[os.write(self._fd, rest) :]
            except OSError as exc:
                self.broken = True
                log.warning("cannot write replies any more (%s); the host is gone", exc)
                self.on_broken()


_ENTRY_FACTS = ("default_prompt_name", "variant", "base_model")
"""The metadata's fields that each model's entry carries as they are, after ModelInfo's,
``normalize_default`` and the prompts' names."""


def _model_info(engine: Engine) -> dict[str, Any]:
    """AkiDB's ModelInfo, as the hello's and the ``info`` reply's ``model`` carry it."""
    metadata = engine.metadata
    return {
        "model": metadata.model,
        "dimension": metadata.dimension,
        "max_tokens": metadata.max_tokens,
    }


def _model_entry(engine: Engine) -> dict[str, Any]:
    """One model of the hello's and the ``info`` reply's ``models`` list."""
    metadata = engine.metadata
    return {
        **_model_info(engine),
        "normalize_default": metadata.normalize,
        "pooling": metadata.pooling,
        "prompts": list(metadata.prompts),
        **{name: getattr(metadata, name) for name in _ENTRY_FACTS},
        "encodings": engine.encodings,
        **(
            {"matryoshka_dimensions": list(metadata.matryoshka_dimensions)}
            if metadata.matryoshka_dimensions
            else {}
        ),
    }


def _served_models(engines: list[Engine]) -> dict[str, Any]:
    """What the hello and the ``info`` reply say of the models: the default model's fields of
    protocol 1's first release, and every model in ``models``."""
    default = engines[0]
    return {
        "model": _model_info(default),
        "normalize_default": default.metadata.normalize,
        "models": [_model_entry(engine) for engine in engines],
        "providers": default.providers,
    }


def _lanes(config: WorkerConfig) -> dict[str, int]:
    """How the worker runs the model, as the hello and the ``info`` reply say: ``lanes`` runs
    at once over each model's session of ``threads`` intra-op threads."""
    return {"lanes": config.lanes, "threads": config.threads}


def _hello(engines: list[Engine], config: WorkerConfig) -> dict[str, Any]:
    return {
        "op": "hello",
        "ok": True,
        "protocol": PROTOCOL_VERSION,
        "worker_version": __version__,
        "pid": os.getpid(),
        **_served_models(engines),
        **_lanes(config),
        "limits": config.limits(),
    }


def _failed_hello(error: EmbeddingError) -> dict[str, Any]:
    return {
        "op": "hello",
        "ok": False,
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "worker_version": __version__,
        "error": {"code": error.code, "message": error.message},
    }


def serve(config: WorkerConfig, protocol_in: int, protocol_out: int) -> int:
    """Load the models, send the hello, serve until told to stop; returns the exit code."""
    parent_pid = os.getppid()  # before loading: a parent dying meanwhile is noticed too
    writer = FrameWriter(protocol_out)
    log.info("starting: %s", config.describe())
    started = time.perf_counter()
    try:
        # imported here so that a missing onnxruntime or tokenizers becomes a failed hello
        from akidb_embed.worker.engine import load_engines

        engines = load_engines(config)
    except ImportError as exc:
        error: EmbeddingError = ServiceUnavailable(f"missing dependency: {exc}")
    except EmbeddingError as exc:
        error = exc
    else:
        log.info(
            "model%s %s loaded in %.2f s, providers %s",
            "s" if len(engines) > 1 else "",
            ", ".join(engine.metadata.model for engine in engines),
            time.perf_counter() - started,
            ", ".join(engines[0].providers),
        )
        writer.send(_hello(engines, config))
        return _Server(engines, config, writer, protocol_in).run(parent_pid)
    log.error("cannot start: %s", error.message)
    writer.send(_failed_hello(error))
    return EXIT_MODEL_NOT_FOUND if isinstance(error, ModelNotFound) else EXIT_UNAVAILABLE


class _Server:
    """The running worker: reader thread, batcher, parent watch; the main thread waits."""

    def __init__(
        self, engines: list[Engine], config: WorkerConfig, writer: FrameWriter, protocol_in: int
    ) -> None:
        self._engines = engines
        self._by_model = {engine.metadata.model: engine for engine in engines}
        self._model_ids = list(self._by_model)
        self._config = config
        self._writer = writer
        self._writer.on_broken = lambda: self._stop(EXIT_OK, "the host closed our stdout")
        self._input = os.fdopen(protocol_in, "rb", buffering=0)  # FrameReader buffers
        self._frames = FrameReader(self._input, config.max_frame_bytes)
        self._input_poll = select.poll()
        self._input_poll.register(protocol_in, select.POLLIN)
        self._limits = RequestLimits(config.max_texts_per_request, config.max_text_bytes)
        self._batcher = Batcher(
            engines,
            max_batch_tokens=config.max_batch_tokens,
            max_pending_texts=config.max_pending_texts,
            on_fatal=lambda exc: self._stop(EXIT_INTERNAL, f"lane thread failed: {exc}"),
            lanes=config.lanes,
            reader=self._read_frame,
        )
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()
        # the main thread sleeps on _wake_up; signals (through set_wakeup_fd, from whichever
        # thread the kernel picked) and _stop write to _wake_up_writer
        self._wake_up, self._wake_up_writer = socket.socketpair()
        self._wake_up_writer.setblocking(False)
        self._exit_code = EXIT_OK
        self._shutdown_id: int | None = None
        self._in_flight: set[int] = set()
        """Ids of the embed and health requests not answered yet (reader adds, replies remove)."""

    # -- lifecycle (main thread) ---------------------------------------------------------

    def run(self, parent_pid: int) -> int:
        # The C-level handler writes the signal's number to the wake-up socket at once, whichever
        # thread receives it; the Python-level handler has nothing left to do. (A flag polled by
        # the main thread left the reader serving for up to the poll interval after SIGTERM.)
        signal.set_wakeup_fd(self._wake_up_writer.fileno(), warn_on_full_buffer=False)
        for stop_signal in STOP_SIGNALS:  # SIGINT too: Ctrl-C reaches the whole process group
            signal.signal(stop_signal, lambda signum, frame: None)
        if self._writer.broken:  # the hello could not be written: nobody is listening
            self._stop(EXIT_OK, "the host closed our stdout")
        self._batcher.start()  # its lane threads read the input too, one at a time
        threading.Thread(
            target=self._watch_parent, args=(parent_pid,), name="parent-watch", daemon=True
        ).start()
        while not self._stopping.is_set():
            for byte in self._wake_up.recv(64):
                if byte != _STOPPING:
                    self._stop(EXIT_OK, signal.Signals(byte).name)
        self._batcher.close()
        self._batcher.join()
        if self._shutdown_id is not None:
            self._writer.send({"id": self._shutdown_id, "ok": True})
        # the reader thread may still be answering a last frame: let it finish that frame, so
        # that the process never ends in the middle of one
        self._writer.close()
        log.info("exiting with code %d", self._exit_code)
        return self._exit_code

    def _stop(self, exit_code: int, reason: str) -> None:
        with self._stop_lock:
            if self._stopping.is_set():
                return
            self._exit_code = exit_code
            log.info(
                "stopping (%s): finishing %d queued texts", reason, self._batcher.pending_texts
            )
            self._stopping.set()
        with contextlib.suppress(BlockingIOError):  # full of wake-ups already: enough
            self._wake_up_writer.send(bytes([_STOPPING]))

    def _watch_parent(self, parent_pid: int) -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        log.warning("parent process %d is gone: exiting", parent_pid)
        os._exit(EXIT_OK)  # nobody is left to read replies: do not finish the queue

    # -- reading (the lane thread that holds the input) ---------------------------------

    def _read_frame(self) -> bool:
        """Read and handle one frame (run by whichever lane thread holds the input); False once
        there is nothing more to read."""
        try:
            try:
                payload = self._frames.read()
            except FrameError as exc:
                log.error("broken input stream: %s", exc.message)
                self._writer.send(error_reply(None, exc))
                self._stop(EXIT_BROKEN_STREAM, "broken input stream")
                return False
            if payload is None:
                self._stop(EXIT_OK, "end of input")
                return False
            if self._stopping.is_set():  # the stop came while this frame was awaited
                self._refuse(payload, ServiceUnavailable("the worker is shutting down"))
                return False
            self._handle(payload, time.perf_counter(), time.monotonic_ns())
            return not self._stopping.is_set()
        except BaseException as exc:  # a bug: exit visibly rather than stop reading silently
            log.exception("reader failed")
            self._stop(EXIT_INTERNAL, f"reader failed: {exc}")
            return False

    def _refuse(self, payload: bytes, error: EmbeddingError) -> None:
        """Answer the request in ``payload`` with ``error`` (or with what is wrong with it)."""
        try:
            request = parse_payload(payload, self._limits, self._model_ids)
        except RejectedRequest as rejected:
            self._writer.send(error_reply(rejected.request_id, rejected.error))
            return
        self._writer.send(error_reply(request.id, error))

    def _more_input_waiting(self) -> bool:
        """Whether another frame has arrived (or begun to) behind the one being handled."""
        if self._frames.buffered:
            return True
        return bool(self._input_poll.poll(0))

    def _handle(self, payload: bytes, received_at: float, read_ns: int) -> None:
        try:
            request = parse_payload(payload, self._limits, self._model_ids)
        except RejectedRequest as rejected:
            self._writer.send(error_reply(rejected.request_id, rejected.error))
            return
        if request.id in self._in_flight:
            # answering both would leave the client unable to tell the replies apart
            duplicate = InvalidInput(
                f"id {request.id} is already in flight; ids must be unique among requests in flight"
            )
            self._writer.send(error_reply(request.id, duplicate))
            return
        if isinstance(request, EmbedRequest):
            trace = {"read": read_ns, "parsed": time.monotonic_ns()} if request.trace else None
            self._submit(request, received_at, self._embed_done, trace)
        elif isinstance(request, TokenizeRequest):
            self._writer.send(self._tokenize_reply(request))
        elif isinstance(request, RangesRequest):
            self._writer.send(self._ranges_reply(request))
        elif request.op == "ping":
            self._writer.send({"id": request.id, "ok": True})
        elif request.op == "info":
            self._writer.send(self._info_reply(request.id))
        elif request.op == "shutdown":
            self._shutdown_id = request.id
            self._stop(EXIT_OK, "shutdown request")
        else:  # health: one fixed sentence through the same queue and batches as any request
            health = EmbedRequest(
                request.id, [HEALTH_SENTENCE], self._model_ids[0], normalize=True, truncate=True
            )
            self._submit(health, received_at, self._health_done)

    def _submit(
        self,
        request: EmbedRequest,
        received_at: float,
        on_done: Callable[..., None],
        trace: dict[str, int] | None = None,
    ) -> None:
        """Tokenize ``request`` and run it: at once in this thread when a lane is free and
        nothing else has arrived (a lone query skips the hand-over to another thread), else
        through the batcher's queue, where requests that arrive together share runs.
        ``on_done(job, request=, form=)`` answers it."""
        request_id = request.id
        engine = self._by_model[request.model]
        self._in_flight.add(request_id)
        try:
            normalize = (
                engine.metadata.normalize if request.normalize is None else request.normalize
            )
            form = engine.output_form(
                request.dimensions, normalize, request.encoding or DEFAULT_ENCODING
            )
            prompt, skip_tokens = engine.resolve_prompt(request.prompt_name)
            token_ids = engine.tokenize(
                request.inputs, request.truncate, prompt, request.truncation_side
            )
            # a shortened vector is normalised after its cut, when the reply is made
            shortens = form.shortens(engine.metadata.dimension)
            job = Job(
                request_id,
                token_ids,
                normalize and not shortens,
                functools.partial(on_done, request=request, form=form),
                received_at=received_at,
                engine=engine,
                skip_tokens=skip_tokens,
                trace=trace,
            )
            if trace is not None:
                trace["tokenized"] = time.monotonic_ns()
            if self._more_input_waiting() or not self._batcher.run_now(job):
                self._batcher.submit(job)
        except EmbeddingError as error:
            self._answer(request_id, error_reply(request_id, error))
        except Exception as exc:  # e.g. the tokenizer choking on one text: fail that request
            log.exception("could not tokenize request %s", request_id)
            self._answer(
                request_id, error_reply(request_id, Internal(f"tokenization failed: {exc}"))
            )

    def _answer(self, request_id: int, reply: dict[str, Any]) -> None:
        """Write the reply of an embed or health request; its id is free again before the
        client can see the reply (and reuse the id)."""
        self._in_flight.discard(request_id)
        self._writer.send(reply)

    # -- replies (lane threads) ----------------------------------------------------------

    def _info_reply(self, request_id: int) -> dict[str, Any]:
        served = _served_models(self._engines)
        return {
            "id": request_id,
            "ok": True,
            **served.pop("model"),
            **served,
            **_lanes(self._config),
        }

    def _tokenize_reply(self, request: TokenizeRequest) -> dict[str, Any]:
        """The token ids of a ``tokenize`` request's texts, answered at once by the reader."""
        engine = self._by_model[request.model]
        try:
            prompt, _ = engine.resolve_prompt(request.prompt_name)
            token_ids = engine.tokenize(
                request.inputs, request.truncate, prompt, request.truncation_side
            )
        except EmbeddingError as error:
            return error_reply(request.id, error)
        except Exception as exc:  # e.g. the tokenizer choking on one text: fail that request
            log.exception("could not tokenize request %s", request.id)
            return error_reply(request.id, Internal(f"tokenization failed: {exc}"))
        return {
            "id": request.id,
            "ok": True,
            "model": engine.metadata.model,
            "token_counts": [len(ids) for ids in token_ids],
            "ids": [ids.tolist() for ids in token_ids],
        }

    def _ranges_reply(self, request: RangesRequest) -> dict[str, Any]:
        """The int8/uint8 ranges of a ``quantization_ranges`` request, answered at once."""
        engine = self._by_model[request.model]
        metadata = engine.metadata
        normalize = metadata.normalize if request.normalize is None else request.normalize
        try:
            form = engine.output_form(request.dimensions, normalize, "int8")
        except EmbeddingError as error:
            return error_reply(request.id, error)
        assert form.ranges is not None
        return {
            "id": request.id,
            "ok": True,
            "model": metadata.model,
            "shape": list(form.ranges.shape),
            "ranges": embeddings_to_bytes(form.ranges),
        }

    def _embed_done(self, job: Job, request: EmbedRequest, form: OutputForm) -> None:
        if job.error is not None or job.vectors is None:
            self._answer(
                job.request_id, error_reply(job.request_id, job.error or Internal("no vectors"))
            )
            return
        vectors = form.apply(job.vectors, normalized=job.normalize)
        reply = {
            "id": job.request_id,
            "ok": True,
            "model": job.engine.metadata.model if job.engine else self._model_ids[0],
            "shape": list(vectors.shape),
            **({"dtype": form.encoding} if request.encoding is not None else {}),
            "embeddings": embeddings_to_bytes(vectors),
            "usage": {
                "total_tokens": job.total_tokens,
                "duration_ms": (time.perf_counter() - job.received_at) * 1000.0,
            },
        }
        if job.trace is not None:
            encoding = time.monotonic_ns()
            pack(reply)  # once more than needed: the reply cannot time its own encoding
            reply["trace"] = {**job.trace, "encode_ns": time.monotonic_ns() - encoding}
        self._answer(job.request_id, reply)

    def _health_done(self, job: Job, request: EmbedRequest, form: OutputForm) -> None:
        if job.error is not None or job.vectors is None:
            self._answer(
                job.request_id, error_reply(job.request_id, job.error or Internal("no vectors"))
            )
            return
        vector = job.vectors[0]
        dimension = self._engines[0].metadata.dimension
        norm = float(np.linalg.norm(vector))
        if vector.shape != (dimension,):
            problem = f"vector has shape {vector.shape}, expected ({dimension},)"
        elif not np.isfinite(vector).all():
            problem = "vector has non-finite values"
        elif abs(norm - 1.0) > HEALTH_NORM_TOLERANCE:
            problem = f"vector norm is {norm:.6f}, expected 1"
        else:
            self._answer(
                job.request_id,
                {
                    "id": job.request_id,
                    "ok": True,
                    "status": "ok",
                    "dimension": int(vector.shape[0]),
                    "norm": norm,
                    "duration_ms": (time.perf_counter() - job.received_at) * 1000.0,
                },
            )
            return
        failure = Internal(f"health check failed: {problem}")
        self._answer(job.request_id, error_reply(job.request_id, failure))
