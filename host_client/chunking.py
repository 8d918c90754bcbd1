"""One ``embed_batch`` call cut into wire requests: its texts in sending order, its output
array, and how many texts each wire request may carry. Public, because the cut is part of the
contract (protocol.md section 10): tests/golden/chunking.json checks this module and the Rust
client's against the same cases.

::

    caller's texts ──sort by length──► EmbedCall.texts (shortest first; order[i] = caller's index)
        │ chunk_end(..., ChunkLimits.of(hello, ...)): texts until max_texts (the hello's
        │ max_texts_per_request, max_in_flight_texts, the rows a reply frame holds), the request
        │ frame's room or ~CHUNK_MICRO_BATCHES runs of max_batch_tokens (estimated) is hit
        ▼
    wire requests [start:stop) ──► the dispatcher ──► replies ──► embeddings[order[start:stop]]

protocol.md section 10 ("Cutting a call into requests") is the definition of the cut and of
every constant below; the Rust client's ``chunking.rs`` follows the same page, and both are
checked against the cases of ``tests/golden/chunking.json``.

Tokens are estimated without a tokenizer (``estimated_tokens``): chunk sizes and the
dispatcher's routing weigh them; nothing depends on the estimate being exact.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from akidb_embed.encodings import (
    DEFAULT_ENCODING,
    check_dimensions,
    check_truncation_side,
    encoding_dtype,
    row_width,
)
from akidb_embed.errors import InvalidInput
from akidb_embed.host_client._hello import Hello
from akidb_embed.host_client._types import BatchEmbeddingRequest, BatchEmbeddingResponse, ModelInfo

__all__ = [
    "TEXT_HEADER_BYTES",
    "ChunkLimits",
    "EmbedCall",
    "chunk_end",
    "estimated_tokens",
    "utf8_size",
]

# The constants of protocol.md section 10, "Cutting a call into requests": change them there
# and in host_client/rust/src/chunking.rs together (tests/golden/chunking.json checks both).
REQUEST_ENVELOPE_BYTES = 256
"""Room in an embed or tokenize request for everything but its texts, its model name and its
prompt name: id, op, flags and options take at most 145 bytes of msgpack."""
REPLY_ENVELOPE_BYTES = 256
"""Room in an embed reply for everything but its vectors, their bin header and its model id:
id, ok, shape, dtype, usage and trace take about 250 bytes of msgpack at most."""
TEXT_HEADER_BYTES = 5
"""Largest msgpack header of one str or bin (str 32, bin 32)."""
BYTES_PER_VALUE = 4
"""Bytes of one embedding value in the widest encoding (float32): a reply row's bound."""
SPECIAL_TOKENS = 2
"""[CLS] and [SEP] around every input (an estimate: only chunk sizes and routing depend on it)."""
CHUNK_MICRO_BATCHES = 4
"""An embed wire request carries about this many of the worker's ONNX Runtime runs
(``max_batch_tokens``) of estimated tokens: a busy worker then answers something every few
seconds, which is how ``request_timeout`` tells a busy worker from a hung one."""


class EmbedCall:
    """One ``embed_batch`` call: its texts, how far they were admitted, and its output."""

    def __init__(
        self,
        request: BatchEmbeddingRequest,
        texts: list[str],
        sizes: list[int],
        served: ModelInfo,
        encoding: str = DEFAULT_ENCODING,
    ) -> None:
        self.future: Future[BatchEmbeddingResponse] = Future()
        # The texts go out shortest first: each wire request, and so each of the worker's
        # micro-batches, then holds texts of similar length and pads little (measured: +10%
        # texts/s on the mixed-length bench corpus). ``order[i]`` is the caller's index of the
        # i-th text sent; replies are written back to those rows. Texts already in that order
        # (one text, a lone query) keep the caller's list: no sorting on the latency path.
        self.order: npt.NDArray[np.intp] | None = None
        self.texts, self.sizes = texts, sizes
        """The texts and their UTF-8 bytes, in sending order."""
        if any(sizes[i] > sizes[i + 1] for i in range(len(sizes) - 1)):
            self.order = np.argsort(np.asarray(sizes, dtype=np.int64), kind="stable")
            self.texts = [texts[i] for i in self.order]
            self.sizes = [sizes[i] for i in self.order]
        self.served = served
        """The model the worker announced under that name (the default one for ``None``)."""
        self.model = None if request.model is None else served.model
        """What the wire request names: the full id (``request.model`` may be a short name)."""
        self.normalize = request.normalize
        self.truncate = request.truncate
        self.prompt_name = request.prompt_name
        self.truncation_side = check_truncation_side(request.truncation_side)
        self.encoding = encoding
        self.dimensions = request.dimensions
        kept = check_dimensions(request.dimensions, served.dimension, encoding, served.model)
        self.width = row_width(encoding, kept)
        """Values per row of the reply (``dimensions``, or its bytes when bit-packed)."""
        self.embeddings: npt.NDArray[Any] = np.empty(
            (len(texts), self.width), encoding_dtype(encoding).newbyteorder("=")
        )
        self.next_index = 0
        self.chunk_stop: int | None = None
        """End of the next chunk once computed (it waits for room in the in-flight bound)."""
        self.outstanding = 0
        self.total_tokens = 0
        self.reply_model = ""
        self.finished = False
        self.started_at = time.perf_counter()
        self.submitted_ns = 0
        """``time.monotonic_ns()`` of the submission, when the client traces (``RequestTrace``)."""
        self.admitted_at: float | None = None
        """When its last text was admitted (``Usage.queue_ms``)."""

    @property
    def fully_admitted(self) -> bool:
        return self.next_index >= len(self.texts)

    def caller_index(self, sent_index: int) -> int:
        """The caller's index of the text sent ``sent_index``-th."""
        return sent_index if self.order is None else int(self.order[sent_index])

    def place(self, start: int, stop: int, vectors: npt.NDArray[Any]) -> None:
        """Write the vectors of the texts sent ``start:stop`` to the caller's rows."""
        if self.order is None:
            self.embeddings[start:stop] = vectors
        else:
            self.embeddings[self.order[start:stop]] = vectors


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
    """How much one embed wire request may carry, from a worker's hello (protocol.md
    section 10)."""

    max_texts: int
    """Texts per request: the hello's ``max_texts_per_request``, the client's
    ``max_in_flight_texts`` and the rows a reply frame holds, at least 1."""
    max_payload_bytes: int
    """Room in a request frame for its texts, each counted with its str header."""
    max_tokens_per_text: int
    """The model's ``max_tokens``: no text is estimated above it (truncation)."""
    max_chunk_tokens: int
    """Estimated tokens per request (``CHUNK_MICRO_BATCHES`` runs of the worker)."""
    max_text_bytes: int
    """The longest text a request can carry, in UTF-8 bytes; a longer one is refused."""

    @classmethod
    def of(
        cls, hello: Hello, max_in_flight_texts: int, request: BatchEmbeddingRequest | EmbedCall
    ) -> ChunkLimits:
        served = hello.served(request.model)
        # a named model is sent as its full id (a short name is resolved here)
        sent_model = None if request.model is None else served.model
        return cls.compute(
            hello.limits, served, max_in_flight_texts, sent_model, request.prompt_name
        )

    @classmethod
    def compute(
        cls,
        limits: Mapping[str, int],
        served: ModelInfo,
        max_in_flight_texts: int,
        sent_model: str | None,
        prompt_name: str | None,
    ) -> ChunkLimits:
        """The limits of requests for ``served`` under a hello's ``limits`` whose ``model``
        field is ``sent_model`` (``None``: nil, the default model)."""
        max_frame_bytes = limits["max_frame_bytes"]
        named = _utf8_length(sent_model) + _utf8_length(prompt_name)
        max_payload_bytes = max(0, max_frame_bytes - REQUEST_ENVELOPE_BYTES - named)
        # the reply names the model by its full id, and its vectors are one bin
        reply_rest = REPLY_ENVELOPE_BYTES + _utf8_length(served.model) + TEXT_HEADER_BYTES
        reply_row_bytes = max(1, served.dimension * BYTES_PER_VALUE)
        max_reply_rows = max(0, max_frame_bytes - reply_rest) // reply_row_bytes
        max_texts = min(limits["max_texts_per_request"], max_in_flight_texts, max_reply_rows)
        max_tokens = served.max_tokens
        return cls(
            max_texts=max(1, max_texts),
            max_payload_bytes=max_payload_bytes,
            max_tokens_per_text=max_tokens,
            max_chunk_tokens=CHUNK_MICRO_BATCHES * max(limits["max_batch_tokens"], max_tokens),
            max_text_bytes=max(
                0, min(limits["max_text_bytes"], max_payload_bytes - TEXT_HEADER_BYTES)
            ),
        )


def _utf8_length(text: str | None) -> int:
    return 0 if text is None else len(text.encode("utf-8"))


def estimated_tokens(text: str, max_tokens: int) -> int:
    """Tokens of ``text`` without a tokenizer: WordPiece makes at most one token per
    character, plus the special tokens, and truncation caps the count at ``max_tokens``."""
    return min(len(text) + SPECIAL_TOKENS, max_tokens)


def chunk_end(texts: Sequence[str], sizes: Sequence[int], start: int, limits: ChunkLimits) -> int:
    """End of the chunk starting at ``start``: at most ``max_texts`` texts whose UTF-8 ``sizes``
    fit ``max_payload_bytes`` and whose estimated tokens fit ``max_chunk_tokens``; a single
    text always makes a chunk (its size was checked before). Tokens are
    ``estimated_tokens``.
    """
    stop_limit = min(len(texts), start + limits.max_texts)
    used_bytes = used_tokens = 0
    for index in range(start, stop_limit):
        text = texts[index]
        tokens = estimated_tokens(text, limits.max_tokens_per_text)
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
