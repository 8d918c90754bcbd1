"""What the two client twins share: construction, configuration, the worker's facts, and each
call, written once.

``EmbeddingClient`` and ``AsyncEmbeddingClient`` both build a ``ClientConfig`` and one
``Dispatcher`` here; they differ only in how they wait for the dispatcher's futures. Each call
(``embed``, ``tokenize``, ...) is one op of ``ClientBase`` (``_embed``, ``_tokenize``, ...): its
signature, overloads and documentation, and what it hands the dispatcher. An op returns a
``Pending``, the dispatcher's future and how the caller's answer is made of its reply; each
twin's method of the same name wraps the op and differs only in the wait::

    client.embed(texts, ...)       ─► _sync.blocking ──┐
    await client.embed(texts, ...) ─► _async.awaiting ─┴─► ClientBase._embed(texts, ...)
      (the async twin starts the workers first if need be)      └─► Pending(future, answer)
    blocking: answer(future.result())   awaiting: answer(await asyncio.wrap_future(future))

``twin_method`` shows each wrapper with its op's signature (returning what the ``Pending``
holds) and the class decorator ``twin`` names it as the twin's own, so ``help()`` and
``inspect`` see each twin's methods as if written out in it; mypy reads the same signatures,
overloads included, through the wrappers' ``ParamSpec``.

Each client registers its dispatcher's ``close`` with ``weakref.finalize``: it runs when the
client is garbage-collected or at interpreter exit, whichever comes first, so a forgotten client
leaves no worker behind and a dropped one can still be collected.
"""

from __future__ import annotations

import inspect
import time
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

import numpy as np
import numpy.typing as npt

from akidb_embed import wire
from akidb_embed.encodings import DEFAULT_ENCODING
from akidb_embed.errors import ProtocolError, ServiceUnavailable
from akidb_embed.host_client._config import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IN_FLIGHT_TEXTS,
    DEFAULT_PROVIDER,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_RESTART_LIMIT,
    DEFAULT_STABLE_START_TIME,
    DEFAULT_START_TIMEOUT,
    DEFAULT_WORKERS,
    ClientConfig,
    PathArgument,
    as_argv,
    as_paths,
    resolve_workers,
)
from akidb_embed.host_client._dispatch import Dispatcher, TraceHook
from akidb_embed.host_client._hello import Hello
from akidb_embed.host_client._types import (
    BatchEmbeddingRequest,
    BatchEmbeddingResponse,
    ClientStats,
    ModelInfo,
)
from akidb_embed.host_client._worker import Spawner

__all__ = ["ClientBase", "Pending", "twin", "twin_method"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
U = TypeVar("U")
F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)


class Pending(Generic[T]):
    """A call handed to the dispatcher: the future of its reply, and how the caller's answer is
    made of that reply once the caller has it (in the caller's thread or task, after its wait)."""

    def __init__(self, reply: Future[R], answer: Callable[[R], T]) -> None:
        self.reply: Future[Any] = reply
        self._answer: Callable[[Any], T] = answer

    @staticmethod
    def of(reply: Future[T]) -> Pending[T]:
        """The reply itself is the answer."""
        return Pending(reply, _itself)

    @staticmethod
    def ready(answer: T) -> Pending[T]:
        """An answer the client holds already (no round trip)."""
        reply: Future[T] = Future()
        reply.set_result(answer)
        return Pending.of(reply)

    def answer(self, reply: Any) -> T:
        return self._answer(reply)

    def then(self, step: Callable[[T], U]) -> Pending[U]:
        """The same call, its answer passed through ``step``."""
        answer = self._answer
        return Pending(self.reply, lambda reply: step(answer(reply)))


def _itself(value: T) -> T:
    return value


def twin_method(method: F, op: Callable[..., Pending[Any]], doc: str | None) -> F:
    """``method``, a twin's wrapper of ``op``, made to look like ``op`` written out in the twin:
    ``op``'s signature returning what its ``Pending`` holds, and ``doc`` (``None``: ``op``'s).
    The class decorator ``twin`` gives it the name it has in the twin."""
    # annotations are strings here (``from __future__ import annotations``): "Pending[X]"
    held = str(inspect.signature(op).return_annotation).removeprefix("Pending[")[:-1]
    _present(method, op, held, op.__doc__ if doc is None else doc)
    method.__wrapped__ = op  # type: ignore[attr-defined]
    return method


def _present(
    function: Callable[..., Any], op: Callable[..., Any], returns: str, doc: str | None
) -> None:
    """``function`` shown (``inspect.signature``, ``typing.get_type_hints``, ``help()``) with
    ``op``'s parameters, returning ``returns``, documented by ``doc``."""
    signature = inspect.signature(op).replace(return_annotation=returns)
    function.__signature__ = signature  # type: ignore[attr-defined]
    function.__annotations__ = {**op.__annotations__, "return": returns}
    function.__doc__ = doc


def twin(cls: C) -> C:
    """Class decorator of a twin: each of its ``twin_method`` methods named as the twin's own
    (``help()`` and reprs say ``EmbeddingClient.embed``, not the wrapper's name)."""
    for name, method in vars(cls).items():
        if inspect.isfunction(method) and hasattr(method, "__wrapped__"):
            method.__name__ = name
            method.__qualname__ = f"{cls.__qualname__}.{name}"
            method.__module__ = cls.__module__
    return cls


def answering(
    op: Callable[P, Pending[T]], step: Callable[[T], U], doc: str
) -> Callable[P, Pending[U]]:
    """An op with ``op``'s arguments whose answer is ``op``'s passed through ``step``."""

    def derived(*args: P.args, **kwargs: P.kwargs) -> Pending[U]:
        return op(*args, **kwargs).then(step)

    _present(derived, op, f"Pending[{inspect.signature(step).return_annotation}]", doc)
    return derived


def _ranges_of(reply: Mapping[str, Any]) -> npt.NDArray[np.float32]:
    """The (2, dimensions) array of a ``quantization_ranges`` reply."""
    shape = reply.get("shape")
    data = reply.get("ranges")
    if not (isinstance(shape, list) and len(shape) == 2 and isinstance(data, bytes)):
        raise ProtocolError(f"malformed quantization_ranges reply: {sorted(reply)}")
    ranges: npt.NDArray[np.float32] = wire.embeddings_from_bytes(data, (shape[0], shape[1]))
    return ranges


def _embeddings(response: BatchEmbeddingResponse) -> npt.NDArray[Any]:
    return response.embeddings


def _token_counts(token_ids: list[list[int]]) -> list[int]:
    return [len(row) for row in token_ids]


class ClientBase:
    """Spawns nothing by itself; see ``EmbeddingClient`` for the meaning of each argument."""

    def __init__(
        self,
        model_dir: PathArgument | Sequence[PathArgument] | None = None,
        *,
        workers: int | Literal["auto"] = DEFAULT_WORKERS,
        provider: str = DEFAULT_PROVIDER,
        threads: int | None = None,
        lanes: int | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        restart_limit: int = DEFAULT_RESTART_LIMIT,
        stable_start_time: float = DEFAULT_STABLE_START_TIME,
        max_in_flight_texts: int = DEFAULT_MAX_IN_FLIGHT_TEXTS,
        worker_command: Sequence[str] | str | None = None,
        worker_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        trace: TraceHook | None = None,
        spawner: Spawner | None = None,
    ) -> None:
        self.config = ClientConfig(
            model_dirs=as_paths(model_dir),
            workers=resolve_workers(workers),
            provider=provider,
            threads=threads,
            lanes=lanes,
            request_timeout=request_timeout,
            start_timeout=start_timeout,
            close_timeout=close_timeout,
            max_attempts=max_attempts,
            restart_limit=restart_limit,
            stable_start_time=stable_start_time,
            max_in_flight_texts=max_in_flight_texts,
            worker_command=as_argv(worker_command),
            worker_args=tuple(worker_args),
            env=dict(env) if env is not None else None,
        )
        self._dispatcher = Dispatcher(self.config, spawner=spawner, trace=trace)
        self._finalizer = weakref.finalize(self, self._dispatcher.close)
        self._after_init()

    def _after_init(self) -> None:
        """The sync twin starts its worker here; the async one on first use or ``start()``."""

    def _ready_hello(self) -> Hello:
        hello = self._dispatcher.hello
        if hello is None:
            raise ServiceUnavailable("the worker has not said hello yet: start the client first")
        return hello

    # ------------------------------------------- the calls, each wrapped by both twins (started)

    def _embed_batch(self, request: BatchEmbeddingRequest) -> Pending[BatchEmbeddingResponse]:
        """One vector per input of ``request``, in order; any number of inputs.

        Raises ``InvalidInput``, ``ModelNotFound`` (``request.model`` is not a loaded model),
        ``ServiceUnavailable``/``RequestTimeout`` (no worker could answer within the
        supervision budget, or the client is closed) or ``Internal``.
        """
        return Pending.of(self._dispatcher.submit_embed(request))

    def _embed_encoded(
        self, request: BatchEmbeddingRequest, encoding: str
    ) -> Pending[BatchEmbeddingResponse]:
        """``embed_batch`` with the vectors in ``encoding`` (see ``embed``): the response's
        ``embeddings`` is that encoding's array, its usage as ``embed_batch``'s."""
        return Pending.of(self._dispatcher.submit_embed(request, encoding))

    @overload
    def _embed(
        self,
        texts: Sequence[str],
        normalize: bool | None = None,
        *,
        model: str | None = None,
        prompt_name: str | None = None,
        dimensions: int | None = None,
        encoding: Literal["float32"] = "float32",
        truncate: bool = True,
        truncation_side: str = "right",
    ) -> Pending[npt.NDArray[np.float32]]: ...

    @overload
    def _embed(
        self,
        texts: Sequence[str],
        normalize: bool | None = None,
        *,
        model: str | None = None,
        prompt_name: str | None = None,
        dimensions: int | None = None,
        encoding: str,
        truncate: bool = True,
        truncation_side: str = "right",
    ) -> Pending[npt.NDArray[Any]]: ...

    def _embed(
        self,
        texts: Sequence[str],
        normalize: bool | None = None,
        *,
        model: str | None = None,
        prompt_name: str | None = None,
        dimensions: int | None = None,
        encoding: str = DEFAULT_ENCODING,
        truncate: bool = True,
        truncation_side: str = "right",
    ) -> Pending[npt.NDArray[Any]]:
        """The vectors of ``texts`` from ``model`` (``None``: the default model), one row per
        text: ``(len(texts), dimensions)`` float32 by default; ``normalize`` and
        ``prompt_name`` ``None``: the model's own defaults. ``dimensions`` keeps each vector's
        first components (re-normalised when normalising; ``None``: all). ``encoding``:
        ``float16``, ``int8`` or ``uint8`` give that dtype, ``binary`` (int8) and ``ubinary``
        (uint8) ``dimensions / 8`` bytes of packed sign bits per row, as sentence-transformers'
        ``quantize_embeddings``. ``truncation_side="left"`` keeps an over-long text's end;
        ``truncate=False``: a text over the model's ``max_tokens`` fails the call with
        ``InvalidInput`` instead of being cut."""
        request = BatchEmbeddingRequest(
            model,
            texts,
            normalize,
            truncate=truncate,
            prompt_name=prompt_name,
            dimensions=dimensions,
            truncation_side=truncation_side,
        )
        return self._embed_encoded(request, encoding).then(_embeddings)

    def _quantization_ranges(
        self,
        *,
        model: str | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
    ) -> Pending[npt.NDArray[np.float32]]:
        """The ``(2, dimensions)`` per-dimension min and max that ``int8``/``uint8`` codes of
        an ``embed`` with the same arguments are cut over: ``akidb_embed.encodings.dequantize``
        maps codes back with them (compare codes that way, not by their raw dot product)."""
        return Pending(self._dispatcher.submit_ranges(model, dimensions, normalize), _ranges_of)

    def _tokenize(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        prompt_name: str | None = None,
        truncate: bool = True,
        truncation_side: str = "right",
    ) -> Pending[list[list[int]]]:
        """The token ids each text would run with (special tokens and the prompt included,
        cut to ``max_tokens`` unless ``truncate`` is false, which raises ``InvalidInput`` for an
        over-long text instead), without embedding anything."""
        future = self._dispatcher.submit_tokenize(
            texts, model, prompt_name, truncate, truncation_side
        )
        return Pending.of(future)

    _count_tokens = answering(
        _tokenize, _token_counts, """How many tokens each text would run with; see ``tokenize``."""
    )

    def _model_info(self, model: str | None = None) -> Pending[ModelInfo]:
        """A loaded model (``None``: the default one) as the worker announced it (no round
        trip); ``ModelNotFound`` listing the loaded ids for another name."""
        return Pending.ready(self._ready_hello().served(model))

    def _models(self) -> Pending[list[ModelInfo]]:
        """Every model the worker serves, the default first (no round trip)."""
        return Pending.ready(list(self._ready_hello().models))

    def _health_check(self) -> Pending[bool]:
        """True when the worker embedded its check sentence correctly through its queue;
        raises ``Internal`` (a failed check) or ``ServiceUnavailable`` otherwise."""
        return Pending(self._dispatcher.submit_op("health"), lambda _reply: True)

    def _ping(self) -> Pending[float]:
        """Seconds for one ``ping`` round trip: the cost of the bridge without the model."""
        started = time.perf_counter()
        reply = self._dispatcher.submit_op("ping")
        return Pending(reply, lambda _reply: time.perf_counter() - started)

    # --------------------------------------------------------- the worker's facts (no round trip)

    @property
    def providers(self) -> tuple[str, ...]:
        """ONNX Runtime execution providers of the workers' sessions, in priority order."""
        return self._ready_hello().providers

    @property
    def lanes(self) -> int:
        """ONNX Runtime runs each worker makes at once, from its hello."""
        return self._ready_hello().lanes

    @property
    def threads(self) -> int:
        """Intra-op threads of each worker's sessions, from its hello (0: ONNX Runtime's)."""
        return self._ready_hello().threads

    @property
    def limits(self) -> Mapping[str, int]:
        """The worker's limits from its hello (protocol.md section 7), read-only."""
        return types.MappingProxyType(dict(self._ready_hello().limits))

    def stats(self) -> ClientStats:
        """Supervision counters: spawns, restarts, re-sent requests, texts in flight, over the
        pool and (``workers``) per worker slot."""
        return self._dispatcher.stats()
