"""``AsyncEmbeddingClient``: the asyncio twin.

The same dispatcher and the same calls (``_base.ClientBase``) as ``EmbeddingClient`` (the
dispatcher's threads do the supervising and the pipe work); each method awaits the dispatcher's
``concurrent.futures.Future`` through ``asyncio.wrap_future``, so the event loop never blocks.
Cancelling a task cancels its call: texts not yet sent are dropped, and replies already on their
way are discarded when they arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from akidb_embed.host_client._base import ClientBase, Pending, twin, twin_method

__all__ = ["AsyncEmbeddingClient"]

P = ParamSpec("P")
T = TypeVar("T")


def awaiting(
    doc: str,
) -> Callable[
    [Callable[Concatenate[ClientBase, P], Pending[T]]],
    Callable[Concatenate[AsyncEmbeddingClient, P], Coroutine[Any, Any, T]],
]:
    """The async twin's method of an op, documented by ``doc``: it starts the workers if need
    be, then awaits the call's answer. (``doc`` comes first, alone: mypy keeps an overloaded
    op's overloads through a call of one argument.)"""

    def method_of(
        op: Callable[Concatenate[ClientBase, P], Pending[T]],
    ) -> Callable[Concatenate[AsyncEmbeddingClient, P], Coroutine[Any, Any, T]]:
        async def method(self: AsyncEmbeddingClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
            if self._dispatcher.hello is None:  # after the first hello the dispatcher refuses
                await self.start()
            pending = op(self, *args, **kwargs)
            return pending.answer(await asyncio.wrap_future(pending.reply))

        return twin_method(method, op, doc)

    return method_of


@twin
class AsyncEmbeddingClient(ClientBase):
    """The asyncio face of ``EmbeddingClient``: same arguments, same errors, awaitable methods.

    Constructing it spawns nothing; ``await client.start()``, ``async with`` or the first call
    starts the workers (a start failure raises the worker's own reason, like the sync client's
    constructor).
    """

    async def start(self) -> None:
        """Spawn the workers and wait for every hello (idempotent)."""
        await asyncio.wrap_future(self._dispatcher.start())

    embed_batch = awaiting(
        """One vector per input of ``request``, in order; see ``EmbeddingClient.embed_batch``."""
    )(ClientBase._embed_batch)
    embed = awaiting("""The vectors of ``texts``; see ``EmbeddingClient.embed``.""")(
        ClientBase._embed
    )
    embed_encoded = awaiting("""``embed_batch`` with the vectors in ``encoding``; see
        ``EmbeddingClient.embed_encoded``.""")(ClientBase._embed_encoded)
    quantization_ranges = awaiting(
        """The int8/uint8 ranges; see ``EmbeddingClient.quantization_ranges``."""
    )(ClientBase._quantization_ranges)
    tokenize = awaiting(
        """The token ids each text would run with; see ``EmbeddingClient.tokenize``."""
    )(ClientBase._tokenize)
    count_tokens = awaiting(
        """How many tokens each text would run with; see ``EmbeddingClient.tokenize``."""
    )(ClientBase._count_tokens)
    model_info = awaiting("""A loaded model (``None``: the default one) as the worker announced it;
        ``ModelNotFound`` listing the loaded ids for another name.""")(ClientBase._model_info)
    models = awaiting("""Every model the worker serves, the default first.""")(ClientBase._models)
    health_check = awaiting("""True when the worker's health op passed; raises otherwise.""")(
        ClientBase._health_check
    )
    ping = awaiting("""Seconds for one ``ping`` round trip.""")(ClientBase._ping)

    async def aclose(self) -> None:
        """Like ``EmbeddingClient.close``, without blocking the event loop. Idempotent."""
        self._finalizer.detach()
        await asyncio.to_thread(self._dispatcher.close)

    async def __aenter__(self) -> AsyncEmbeddingClient:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
