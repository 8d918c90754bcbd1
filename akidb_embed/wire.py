"""The wire codec: the only place where frames are built and parsed (contract: protocol.md).

A frame is a 4-byte unsigned big-endian length ``N`` followed by ``N`` bytes that hold exactly
one msgpack map. Both directions use the same framing. msgpack does all the parsing; this
module adds the length prefix, the size limit, and the two ways a stream can go wrong:

* ``MalformedMessage``: the frame was delimited correctly but its payload is not one msgpack
  map. The stream is still in step; the receiver answers with an error and reads on.
* ``FrameError``: the stream itself is broken (a length above the limit, EOF inside a frame).
  Nothing after it can be trusted; the receiver reports it and stops reading.

Embeddings travel as one msgpack ``bin`` of little-endian float32 values with a ``shape``;
``embeddings_to_bytes`` and ``embeddings_from_bytes`` are the two ends of that.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import msgpack
import numpy as np
import numpy.typing as npt

from akidb_embed.errors import EmbeddingError, ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "LENGTH_PREFIX",
    "PROTOCOL_VERSION",
    "FrameError",
    "FrameReader",
    "FrameTooLarge",
    "MalformedMessage",
    "TruncatedFrame",
    "embeddings_from_bytes",
    "embeddings_to_bytes",
    "error_reply",
    "pack",
    "read_frame_async",
    "unpack",
]

PROTOCOL_VERSION = 1
"""Major version of the wire contract; a client must refuse a worker announcing another one."""

LENGTH_PREFIX = struct.Struct(">I")
"""The 4-byte unsigned big-endian length that precedes every frame's payload."""

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
"""Largest payload either side accepts unless configured otherwise (announced in the hello)."""

EMBEDDING_DTYPE = np.dtype("<f4")


class FrameError(ProtocolError):
    """The byte stream is out of step or cut short; no further frame can be read from it."""


class FrameTooLarge(FrameError):
    """A length prefix announced more bytes than the receiver's ``max_frame_bytes``."""


class TruncatedFrame(FrameError):
    """The stream ended inside a length prefix or a payload."""


class MalformedMessage(ProtocolError):
    """A correctly delimited payload that is not a single msgpack map."""


def pack(message: Mapping[str, Any]) -> bytes:
    """One frame: the length prefix followed by ``message`` as msgpack."""
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    return LENGTH_PREFIX.pack(len(payload)) + payload


def unpack(payload: bytes) -> dict[str, Any]:
    """The msgpack map held by one frame's payload, or ``MalformedMessage``."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedMessage(f"payload is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise MalformedMessage(f"payload is a msgpack {type(message).__name__}, not a map")
    return message


def _payload_length(prefix: bytes, max_frame_bytes: int) -> int:
    if len(prefix) < LENGTH_PREFIX.size:
        raise TruncatedFrame(
            f"stream ended inside a length prefix ({len(prefix)} of {LENGTH_PREFIX.size} bytes)"
        )
    (length,) = LENGTH_PREFIX.unpack(prefix)
    if length > max_frame_bytes:
        raise FrameTooLarge(f"frame of {length} bytes exceeds max_frame_bytes={max_frame_bytes}")
    return int(length)


class FrameReader:
    """Reads whole frame payloads from a blocking binary stream (a pipe or file)."""

    def __init__(self, stream: BinaryIO, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._stream = stream
        self.max_frame_bytes = max_frame_bytes

    def _read_exactly(self, size: int) -> bytes:
        chunks = []
        remaining = size
        while remaining:
            chunk = self._stream.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def read(self) -> bytes | None:
        """The next payload; ``None`` at a clean end of stream (between frames)."""
        prefix = self._read_exactly(LENGTH_PREFIX.size)
        if not prefix:
            return None
        length = _payload_length(prefix, self.max_frame_bytes)
        payload = self._read_exactly(length)
        if len(payload) < length:
            raise TruncatedFrame(
                f"stream ended inside a frame ({len(payload)} of {length} payload bytes)"
            )
        return payload


async def read_frame_async(
    reader: asyncio.StreamReader, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> bytes | None:
    """The asyncio twin of ``FrameReader.read``."""
    try:
        prefix = await reader.readexactly(LENGTH_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        prefix = exc.partial
    length = _payload_length(prefix, max_frame_bytes)
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise TruncatedFrame(
            f"stream ended inside a frame ({len(exc.partial)} of {length} payload bytes)"
        ) from None


def error_reply(request_id: object, error: EmbeddingError) -> dict[str, Any]:
    """The reply that carries ``error`` back to the sender of request ``request_id``."""
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    index = getattr(error, "index", None)
    if index is not None:
        body["index"] = index
    return {"id": request_id, "ok": False, "error": body}


def embeddings_to_bytes(embeddings: npt.NDArray[np.floating[Any]]) -> bytes:
    """Row-major little-endian float32 bytes of a (count, dimension) array."""
    return np.ascontiguousarray(embeddings, dtype=EMBEDDING_DTYPE).tobytes()


def embeddings_from_bytes(data: bytes, shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """The (count, dimension) float32 array held by ``data``, checked against ``shape``."""
    count, dimension = shape
    expected = count * dimension * EMBEDDING_DTYPE.itemsize
    if len(data) != expected:
        raise ProtocolError(
            f"embeddings hold {len(data)} bytes, shape {count}x{dimension} needs {expected}"
        )
    array = np.frombuffer(data, dtype=EMBEDDING_DTYPE).reshape(count, dimension)
    return array.astype(np.float32, copy=False)
