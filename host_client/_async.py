"""``AsyncEmbeddingClient``: the asyncio twin.

The same dispatcher as ``EmbeddingClient`` (its threads do the supervising and the pipe work); each
method awaits the dispatcher's ``concurrent.futures.Future`` through ``asyncio.wrap_future``, so the
event loop never blocks. Cancelling a task cancels its call: texts not yet sent are dropped,
and replies already on their way are discarded when they arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, overload

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

__all__ = ["AsyncEmbeddingClient"]


class AsyncEmbeddingClient(ClientBase):
    """The asyncio face of ``EmbeddingClient``: same arguments, same errors, awaitable methods.

    Constructing it spawns nothing; ``await client.start()``, ``async with`` or the first call
    starts the workers (a start failure raises the worker's own reason, like the sync client's
    constructor).
    """

    async def start(self) -> None:
        """Spawn the workers and wait for every hello (idempotent)."""
        await asyncio.wrap_future(self._dispatcher.start())

    async def embed_batch(self, request: BatchEmbeddingRequest) -> BatchEmbeddingResponse:
        """One vector per input of ``request``, in order; see ``EmbeddingClient.embed_batch``."""
        if (
            self._dispatcher.hello is None
        ):  # after the first hello the dispatcher refuses if need be
            await self.start()
        return await asyncio.wrap_future(self._dispatcher.submit_embed(request))

    @overload
    async def embed(
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
    async def embed(
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

    async def embed(
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
        """The vectors of ``texts``; see ``EmbeddingClient.embed``."""
        request = _request(
            texts, normalize, model, prompt_name, dimensions, truncate, truncation_side
        )
        return (await self.embed_encoded(request, encoding)).embeddings

    async def embed_encoded(
        self, request: BatchEmbeddingRequest, encoding: str
    ) -> BatchEmbeddingResponse:
        """``embed_batch`` with the vectors in ``encoding``; see
        ``EmbeddingClient.embed_encoded``."""
        await self._ensure_started()
        return await asyncio.wrap_future(self._dispatcher.submit_embed(request, encoding))

    async def quantization_ranges(
        self,
        *,
        model: str | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
    ) -> npt.NDArray[np.float32]:
        """The int8/uint8 ranges; see ``EmbeddingClient.quantization_ranges``."""
        await self._ensure_started()
        future = self._dispatcher.submit_ranges(model, dimensions, normalize)
        reply: dict[str, Any] = await asyncio.wrap_future(future)
        return ranges_of(reply)

    async def tokenize(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        prompt_name: str | None = None,
        truncate: bool = True,
        truncation_side: str = "right",
    ) -> list[list[int]]:
        """The token ids each text would run with; see ``EmbeddingClient.tokenize``."""
        await self._ensure_started()
        future = self._dispatcher.submit_tokenize(
            texts, model, prompt_name, truncate, truncation_side
        )
        return await asyncio.wrap_future(future)

    async def count_tokens(
        self,
        texts: Sequence[str],
        *,
        model: str | None = None,
        prompt_name: str | None = None,
        truncate: bool = True,
        truncation_side: str = "right",
    ) -> list[int]:
        """How many tokens each text would run with; see ``EmbeddingClient.tokenize``."""
        ids = await self.tokenize(
            texts,
            model=model,
            prompt_name=prompt_name,
            truncate=truncate,
            truncation_side=truncation_side,
        )
        return [len(row) for row in ids]

    async def _ensure_started(self) -> None:
        if self._dispatcher.hello is None:  # after the first hello the dispatcher refuses
            await self.start()

    async def model_info(self, model: str | None = None) -> ModelInfo:
        """A loaded model (``None``: the default one) as the worker announced it;
        ``ModelNotFound`` listing the loaded ids for another name."""
        await self.start()
        return self._model_info(model)

    async def models(self) -> list[ModelInfo]:
        """Every model the worker serves, the default first."""
        await self.start()
        return self._models()

    async def health_check(self) -> bool:
        """True when the worker's health op passed; raises otherwise."""
        await self.start()
        await asyncio.wrap_future(self._dispatcher.submit_op("health"))
        return True

    async def ping(self) -> float:
        """Seconds for one ``ping`` round trip."""
        await self.start()
        started = time.perf_counter()
        await asyncio.wrap_future(self._dispatcher.submit_op("ping"))
        return time.perf_counter() - started

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
