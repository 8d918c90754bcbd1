"""What a bulk job embeds with: the ``Embedder`` protocol (a model's dimension, chunks submitted
in order, each answered by a future) and the local embedder, ``ClientEmbedder``, over an
``EmbeddingClient``. On Ray (akidb_embed.ray) the actors embed and the driver writes through
the same ``Output``."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy.typing as npt

from akidb_embed.bulk.options import IN_FLIGHT_CHUNKS
from akidb_embed.encodings import DEFAULT_ENCODING, check_dimensions, row_width

__all__ = ["ClientEmbedder", "Embedded", "Embedder", "Vectors"]

Vectors = npt.NDArray[Any]
"""float32 rows, or the job's ``encoding``'s."""


@dataclass(frozen=True)
class Embedded:
    vectors: Vectors
    tokens: int


class Embedder(Protocol):
    """What the job embeds with: a model's dimension, and chunks submitted in order."""

    dimension: int
    model: str

    def submit(self, texts: list[str]) -> Future[Embedded]: ...


class ClientEmbedder:
    """The local embedder: an ``EmbeddingClient`` called from a few threads, so that chunks are
    in flight together and the worker batches them while the job reads and writes."""

    def __init__(
        self,
        client: Any,
        model: str | None = None,
        normalize: bool | None = None,
        prompt_name: str | None = None,
        threads: int = IN_FLIGHT_CHUNKS,
        dimensions: int | None = None,
        encoding: str = DEFAULT_ENCODING,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from akidb_embed.host_client import BatchEmbeddingRequest

        info = client.model_info(model)
        kept = check_dimensions(dimensions, info.dimension, encoding, info.model)
        self.dimension: int = row_width(encoding, kept)
        """Values per row: the dimensions kept, or their bytes when bit-packed."""
        self.model: str = info.model
        self._client = client
        self._encoding = encoding
        self._request = partial(
            BatchEmbeddingRequest,
            info.model,
            normalize=normalize,
            prompt_name=prompt_name,
            dimensions=dimensions,
        )
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="akidb-embed-bulk")

    def _embed(self, texts: Sequence[str]) -> Embedded:
        response = self._client.embed_encoded(self._request(texts), self._encoding)
        return Embedded(response.embeddings, response.usage.total_tokens)

    def submit(self, texts: list[str]) -> Future[Embedded]:
        return self._pool.submit(self._embed, texts)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
