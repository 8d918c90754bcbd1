"""``EmbeddingClient``: the blocking twin, for threads.

Every method is a call of ``ClientBase`` (``_base``) that blocks on the
``concurrent.futures.Future`` the shared dispatcher (``_dispatch.Dispatcher``) gives back; any
number of threads may call at once and their requests are in flight together. See ``_dispatch``
for the data path and what happens on failure, ``_slot`` for the supervision of each worker.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Concatenate, ParamSpec, TypeVar

from akidb_embed.host_client._base import ClientBase, Pending, twin, twin_method

__all__ = ["EmbeddingClient"]

P = ParamSpec("P")
T = TypeVar("T")


def _wait(future: Future[T]) -> T:
    try:
        return future.result()
    except BaseException:
        future.cancel()  # interrupted (KeyboardInterrupt): what is not sent yet is dropped
        raise


def blocking(
    op: Callable[Concatenate[ClientBase, P], Pending[T]],
) -> Callable[Concatenate[EmbeddingClient, P], T]:
    """The sync twin's method of ``op``: the call's answer, once its reply is in."""

    def method(self: EmbeddingClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        pending = op(self, *args, **kwargs)
        return pending.answer(_wait(pending.reply))

    return twin_method(method, op, None)


@twin
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

    embed_batch = blocking(ClientBase._embed_batch)
    embed_encoded = blocking(ClientBase._embed_encoded)
    embed = blocking(ClientBase._embed)
    quantization_ranges = blocking(ClientBase._quantization_ranges)
    tokenize = blocking(ClientBase._tokenize)
    count_tokens = blocking(ClientBase._count_tokens)
    model_info = blocking(ClientBase._model_info)
    models = blocking(ClientBase._models)
    health_check = blocking(ClientBase._health_check)
    ping = blocking(ClientBase._ping)

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
