"""What the two client twins share: construction, configuration, and the worker's facts.

``EmbeddingClient`` and ``AsyncEmbeddingClient`` both build a ``ClientConfig`` and one
``Dispatcher`` here; they differ only in how they wait for the dispatcher's futures. Each client
registers its dispatcher's ``close`` with ``weakref.finalize``: it runs when the client is
garbage-collected or at interpreter exit, whichever comes first, so a forgotten client leaves no
worker behind and a dropped one can still be collected.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from akidb_embed import wire
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
from akidb_embed.host_client._types import BatchEmbeddingRequest, ClientStats, ModelInfo
from akidb_embed.host_client._worker import Spawner

__all__ = ["ClientBase", "embed_request", "ranges_of"]


def ranges_of(reply: Mapping[str, Any]) -> npt.NDArray[np.float32]:
    """The (2, dimensions) array of a ``quantization_ranges`` reply."""
    shape = reply.get("shape")
    data = reply.get("ranges")
    if not (isinstance(shape, list) and len(shape) == 2 and isinstance(data, bytes)):
        raise ProtocolError(f"malformed quantization_ranges reply: {sorted(reply)}")
    ranges: npt.NDArray[np.float32] = wire.embeddings_from_bytes(data, (shape[0], shape[1]))
    return ranges


def embed_request(
    texts: Sequence[str],
    normalize: bool | None,
    model: str | None,
    prompt_name: str | None,
    dimensions: int | None,
    truncate: bool,
    truncation_side: str,
) -> BatchEmbeddingRequest:
    """The request of the twins' ``embed`` arguments."""
    return BatchEmbeddingRequest(
        model,
        texts,
        normalize,
        truncate=truncate,
        prompt_name=prompt_name,
        dimensions=dimensions,
        truncation_side=truncation_side,
    )


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

    def _model_info(self, model: str | None) -> ModelInfo:
        return self._ready_hello().served(model)

    def _models(self) -> list[ModelInfo]:
        return list(self._ready_hello().models)

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
