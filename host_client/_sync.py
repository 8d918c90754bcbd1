"""``EmbeddingClient``: the blocking twin, for threads.

Every method hands its work to the shared dispatcher (``_dispatch.Dispatcher``) and blocks on
the ``concurrent.futures.Future`` it gets back; any number of threads may call at once and their
requests are in flight together. See ``_dispatch`` for the data path and what happens on
failure, ``_slot`` for the supervision of each worker.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import numpy as np
import numpy.typing as npt

from akidb_embed.encodings import DEFAULT_ENCODING
from akidb_embed.host_client._base import ClientBase, ranges_of
from akidb_embed.host_client._base import embed_request as _request
from akidb_embed.host_client._types import (
    BatchEmbeddingRequest,
    BatchEmbeddingResponse,
    ModelInfo,
)

__all__ = ["EmbeddingClient"]

T = TypeVar("T")


def _wait(future: Future[T]) -> T:
    try:
        return future.result()
    except BaseException:
        future.cancel()  # interrupted (KeyboardInterrupt): what is not sent yet is dropped
        raise


class EmbeddingClient(ClientBase):
    """Embeds texts through a pool of supervised worker processes (one by default);
    thread-safe and pipelined.

    ``EmbeddingClient(model_dir=None, *, workers="auto", provider="auto", threads=None,
    lanes=None, request_timeout=30.0, start_timeout=60.0, close_timeout=10.0, max_attempts=3,
    restart_limit=5, stable_start_time=10.0, max_in_flight_texts=2048, worker_command=None,
    worker_args=(), env=None, trace=None, spawner=None)`` spawns ``workers`` processes of
    ``python -m akidb_embed.worker`` in parallel (same interpreter; ``worker_command`` replaces
    that prefix, ``worker_args`` are appended), each serving every model with ``lanes`` ONNX
    Runtime runs at once on sessions of ``threads`` intra-op threads (by default sized to fill
    the worker's share of the cores; ``workers="auto"``: one worker per 32 usable CPUs), and
    returns once every hello has been read and its protocol version checked. A worker that
    cannot start makes the constructor raise its own reason: ``ModelNotFound`` (no usable model
    directory) or ``ServiceUnavailable`` (anything else, with its last stderr lines). The knobs
    are described in ``ClientConfig``; the resolved values are ``client.config``. ``trace``, a
    callable, gets a ``RequestTrace`` (when the call and its reply passed each stage, on
    ``time.monotonic_ns()``, with the worker's own marks) for every embed wire request once
    its reply is handled, in the thread that handled it; ``spawner`` replaces how each
    worker is started (``akidb_embed.host_client.supervision.Spawner``).

    Use it as a context manager, or call ``close()``; it is also closed when garbage-collected
    and at interpreter exit.
    """

    def embed_batch(self, request: BatchEmbeddingRequest) -> BatchEmbeddingResponse:
        """One vector per input of ``request``, in order; any number of inputs.

        Raises ``InvalidInput``, ``ModelNotFound`` (``request.model`` is not a loaded model),
        ``ServiceUnavailable``/``RequestTimeout`` (no worker could answer within the
        supervision budget, or the client is closed) or ``Internal``.
        """
        return _wait(self._dispatcher.submit_embed(request))

    def embed_encoded(
        self, request: BatchEmbeddingRequest, encoding: str
    ) -> BatchEmbeddingResponse:
        """``embed_batch`` with the vectors in ``encoding`` (see ``embed``): the response's
        ``embeddings`` is that encoding's array, its usage as ``embed_batch``'s."""
        return _wait(self._dispatcher.submit_embed(request, encoding))

    @overload
    def embed(
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
    ) -> npt.NDArray[np.float32]: ...

    @overload
    def embed(
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
    ) -> npt.NDArray[Any]: ...

    def embed(
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
    ) -> npt.NDArray[Any]:
        """The vectors of ``texts`` from ``model`` (``None``: the default model), one row per
        text: ``(len(texts), dimensions)`` float32 by default; ``normalize`` and
        ``prompt_name`` ``None``: the model's own defaults. ``dimensions`` keeps each vector's
        first components (re-normalised when normalising; ``None``: all). ``encoding``:
        ``float16``, ``int8`` or ``uint8`` give that dtype, ``binary`` (int8) and ``ubinary``
        (uint8) ``dimensions / 8`` bytes of packed sign bits per row, as sentence-transformers'
        ``quantize_embeddings``. ``truncation_side="left"`` keeps an over-long text's end;
        ``truncate=False``: a text over the model's ``max_tokens`` fails the call with
        ``InvalidInput`` instead of being cut."""
        request = _request(
            texts, normalize, model, prompt_name, dimensions, truncate, truncation_side
        )
        return self.embed_encoded(request, encoding).embeddings

    def quantization_ranges(
        self,
        *,
        model: str | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
    ) -> npt.NDArray[np.float32]:
        """The ``(2, dimensions)`` per-dimension min and max that ``int8``/``uint8`` codes of
        an ``embed`` with the same arguments are cut over: ``akidb_embed.encodings.dequantize``
        maps codes back with them (compare codes that way, not by their raw dot product)."""
        reply = _wait(self._dispatcher.submit_ranges(model, dimensions, normalize))
        return ranges_of(reply)

    def tokenize(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        prompt_name: str | None = None,
        truncate: bool = True,
        truncation_side: str = "right",
    ) -> list[list[int]]:
        """The token ids each text would run with (special tokens and the prompt included,
        cut to ``max_tokens`` unless ``truncate`` is false, which raises ``InvalidInput`` for an
        over-long text instead), without embedding anything."""
        future = self._dispatcher.submit_tokenize(
            texts, model, prompt_name, truncate, truncation_side
        )
        return _wait(future)

    def count_tokens(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        prompt_name: str | None = None,
        truncate: bool = True,
        truncation_side: str = "right",
    ) -> list[int]:
        """How many tokens each text would run with; see ``tokenize``."""
        ids = self.tokenize(
            texts,
            model=model,
            prompt_name=prompt_name,
            truncate=truncate,
            truncation_side=truncation_side,
        )
        return [len(row) for row in ids]

    def model_info(self, model: str | None = None) -> ModelInfo:
        """A loaded model (``None``: the default one) as the worker announced it (no round
        trip); ``ModelNotFound`` listing the loaded ids for another name."""
        return self._model_info(model)

    def models(self) -> list[ModelInfo]:
        """Every model the worker serves, the default first (no round trip)."""
        return self._models()

    def health_check(self) -> bool:
        """True when the worker embedded its check sentence correctly through its queue;
        raises ``Internal`` (a failed check) or ``ServiceUnavailable`` otherwise."""
        _wait(self._dispatcher.submit_op("health"))
        return True

    def ping(self) -> float:
        """Seconds for one ``ping`` round trip: the cost of the bridge without the model."""
        started = time.perf_counter()
        _wait(self._dispatcher.submit_op("ping"))
        return time.perf_counter() - started

    def close(self) -> None:
        """Let the worker answer what it holds (up to ``close_timeout``), then stop it.
        Calls not yet sent fail with ``ServiceUnavailable``. Idempotent."""
        self._finalizer.detach()
        self._dispatcher.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _after_init(self) -> None:
        try:
            _wait(self._dispatcher.start())
        except BaseException:
            self.close()
            raise
