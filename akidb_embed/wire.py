"""The wire codec: the only place where frames are built and parsed (contract: protocol.md).

A frame is a 4-byte unsigned big-endian length ``N`` followed by ``N`` bytes that hold exactly
one msgpack map. Both directions use the same framing. msgpack does all the parsing; this
module adds the length prefix, the size limit, and the two ways a stream can go wrong:

* ``MalformedMessage``: the frame was delimited correctly but its payload is not one msgpack
  map. The stream is still in step; the receiver answers with an error and reads on.
* ``FrameError``: the stream itself is broken (a length above the limit, EOF inside a frame).
  Nothing after it can be trusted; the receiver reports it and stops reading.

A payload that fails strict decoding may still be a map whose ``id`` can be read: ``salvage``
decodes it a second time, leniently (invalid UTF-8 kept as lone surrogates, any map keys, pair
by pair), so that the worker can answer that id and name the offending field.

Embeddings travel as one msgpack ``bin`` of little-endian values with a ``shape``, float32
unless the request asked for another ``encoding`` (encodings.py); ``embeddings_to_bytes`` and
``embeddings_from_bytes`` are the two ends of that.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack
import numpy as np
import numpy.typing as npt

from akidb_embed.encodings import DEFAULT_ENCODING, encoding_dtype
from akidb_embed.errors import EmbeddingError, ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "LENGTH_PREFIX",
    "MAX_NESTING",
    "PROTOCOL_VERSION",
    "TRUNCATE_HINT",
    "FrameEncoder",
    "FrameError",
    "FrameReader",
    "FrameTooLarge",
    "MalformedMessage",
    "SalvagedMap",
    "TruncatedFrame",
    "Undecodable",
    "embeddings_from_bytes",
    "embeddings_to_bytes",
    "error_reply",
    "is_valid_text",
    "msgpack_type",
    "pack",
    "salvage",
    "served_model_id",
    "unpack",
]

TRUNCATE_HINT = "send truncate: true"
"""How the message of an input over ``max_tokens`` with ``truncate: false`` ends (protocol.md,
section 5); a client puts its own API's words in its place."""

PROTOCOL_VERSION = 1
"""Major version of the wire contract; a client must refuse a worker announcing another one."""

LENGTH_PREFIX = struct.Struct(">I")
"""The 4-byte unsigned big-endian length that precedes every frame's payload."""

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
"""Largest payload either side accepts unless configured otherwise (announced in the hello)."""

MAX_NESTING = 1024
"""Deepest nesting of arrays and maps (the payload's own map counted) that msgpack decodes."""

EMBEDDING_DTYPE = np.dtype("<f4")

_LENIENT = {"raw": False, "strict_map_key": False, "unicode_errors": "surrogateescape"}
"""Decoding that accepts what strict decoding refuses: bad UTF-8 becomes lone surrogates
(U+DC80-U+DCFF, which valid UTF-8 can never produce), map keys may be of any scalar type."""
_SURROGATE = re.compile("[\ud800-\udfff]")


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


class FrameEncoder:
    """``pack`` for a writer that sends many frames: one msgpack ``Packer`` kept for all of them
    (``packb`` builds a new one, with a fresh buffer, per call), and the frame as its two parts
    (length prefix, payload) for a gathering write instead of a copy joining them. Not
    thread-safe: one per writer, used under its lock."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)

    def encode(self, message: Mapping[str, Any]) -> tuple[bytes, bytes]:
        """The length prefix and the payload of ``message``'s frame."""
        payload: bytes = self._packer.pack(message)
        return LENGTH_PREFIX.pack(len(payload)), payload


def served_model_id(name: str, served: Sequence[str]) -> str | None:
    """The served model id a request's ``model`` names (protocol.md, ``embed``): ``name``
    itself, or the one served id whose short name (the part after its last ``/``) is ``name``,
    so that ``all-MiniLM-L6-v2`` names ``sentence-transformers/all-MiniLM-L6-v2``; None when
    no id, or more than one, answers to it."""
    if name in served:
        return name
    matches = [model for model in served if model.rsplit("/", 1)[-1] == name]
    return matches[0] if len(matches) == 1 else None


def msgpack_type(value: object) -> str:
    """The msgpack name of a decoded value's type, for messages meant for people."""
    if value is None:
        return "nil"
    for kind, name in _TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return "extension"


_TYPE_NAMES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "boolean"),  # before int: a bool is an int in Python
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (bytes, "binary"),
    ((list, tuple), "array"),
    (dict, "map"),
)


def unpack(payload: bytes) -> dict[str, Any]:
    """The msgpack map held by one frame's payload, or ``MalformedMessage``."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedMessage(f"payload {_describe(exc)}") from None
    if not isinstance(message, dict):
        raise MalformedMessage(f"payload is a msgpack {msgpack_type(message)}, not a map")
    return message


def _describe(exc: Exception) -> str:
    """What a msgpack decoding exception says about the payload, as a clause that follows
    "payload" or a field's name (several of msgpack's exceptions have empty messages)."""
    if isinstance(exc, msgpack.exceptions.StackError):
        return f"is nested more than {MAX_NESTING} levels deep"
    if isinstance(exc, UnicodeDecodeError):
        return "holds a string that is not valid UTF-8"
    if isinstance(exc, TypeError):  # an unhashable key: an array or a map used as a map key
        return "has a map key that is an array or a map"
    if isinstance(exc, msgpack.exceptions.ExtraData):
        return "has bytes after its first msgpack value"
    if isinstance(exc, msgpack.exceptions.FormatError):
        return "holds bytes that are not msgpack"
    if isinstance(exc, msgpack.OutOfData) or "incomplete" in str(exc):
        return "ends inside a msgpack value"
    if "map key" in str(exc):
        return "has a map key that is not a string"
    return f"is not valid msgpack ({exc or type(exc).__name__})"


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a value that even lenient decoding could not read."""

    reason: str


@dataclass(frozen=True)
class SalvagedMap:
    """What lenient decoding could read of a payload that begins with a map.

    ``pairs`` are the map's key-value pairs in payload order, as far as they could be read:
    strings with invalid UTF-8 hold lone surrogates (``is_valid_text`` is false for them), keys
    may be of any type. A value that could not be decoded is an ``Undecodable``; when that value
    is an array, it is the array of the elements read before it, ending with the
    ``Undecodable`` element. Nothing after an undecodable value can be read (``complete`` is
    then false). ``problem`` says why the payload is not one complete msgpack map when that is
    the case (it ends early, holds bytes that are not msgpack, or has bytes after the map).
    """

    pairs: list[tuple[object, object]]
    complete: bool
    problem: str | None


def is_valid_text(text: str) -> bool:
    """False for a string that lenient decoding made from invalid UTF-8."""
    return text.isascii() or _SURROGATE.search(text) is None


def _lenient_unpacker(data: bytes) -> Any:
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1), **_LENIENT)
    unpacker.feed(data)
    return unpacker


def _content_failure(exc: Exception) -> bool:
    """True for a failure of one value (too deep, unhashable key), not of the framing."""
    return isinstance(exc, msgpack.exceptions.StackError | TypeError)


def _salvage_value(payload: bytes, start: int, exc: Exception) -> object:
    """The value at ``start`` that failed to decode: the readable head of an array ending with
    the element that failed, or ``Undecodable``."""
    unpacker = _lenient_unpacker(payload[start:])
    try:
        count = unpacker.read_array_header()
    except Exception:
        return Undecodable(_describe(exc))
    elements: list[object] = []
    for _ in range(count):
        try:
            elements.append(unpacker.unpack())
        except Exception as element_exc:
            elements.append(Undecodable(_describe(element_exc)))
            break
    return elements


def salvage(payload: bytes) -> SalvagedMap | None:
    """The pairs that can be read of a payload that failed ``unpack``; None when the payload
    does not even begin with a map (then no id can be found in it)."""
    unpacker = _lenient_unpacker(payload)
    try:
        count = unpacker.read_map_header()
    except Exception:
        return None
    pairs: list[tuple[object, object]] = []
    for _ in range(count):
        try:
            key = unpacker.unpack()
        except Exception as exc:
            if _content_failure(exc):
                pairs.append((Undecodable(_describe(exc)), None))
                return SalvagedMap(pairs, complete=False, problem=None)
            return SalvagedMap(pairs, complete=False, problem=_describe(exc))
        start = unpacker.tell()
        try:
            value = unpacker.unpack()
        except Exception as exc:
            if _content_failure(exc):
                pairs.append((key, _salvage_value(payload, start, exc)))
                return SalvagedMap(pairs, complete=False, problem=None)
            return SalvagedMap(pairs, complete=False, problem=_describe(exc))
        pairs.append((key, value))
    if unpacker.tell() != len(payload):
        return SalvagedMap(pairs, complete=True, problem="has bytes after the map")
    return SalvagedMap(pairs, complete=True, problem=None)


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
    """Reads whole frame payloads from a blocking binary stream (a pipe or file).

    It keeps its own buffer and asks the stream for whatever is there (one system call for
    several small frames), so ``buffered`` can tell whether another frame's bytes have already
    arrived without blocking: the worker runs a lone request at once when nothing follows it.
    """

    READ_SIZE = 64 * 1024

    def __init__(self, stream: BinaryIO, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._stream = stream
        # read1: at most one system call (a buffered stream); a raw stream's read is one already
        self._read_some = getattr(stream, "read1", stream.read)
        self._buffer = bytearray()
        self.max_frame_bytes = max_frame_bytes

    @property
    def buffered(self) -> int:
        """Bytes already read from the stream and not yet returned as a frame."""
        return len(self._buffer)

    def _fill(self, size: int) -> bool:
        """Read until the buffer holds ``size`` bytes; False if the stream ended first."""
        while len(self._buffer) < size:
            chunk = self._read_some(max(self.READ_SIZE, size - len(self._buffer)))
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def read(self) -> bytes | None:
        """The next payload; ``None`` at a clean end of stream (between frames)."""
        buffer, prefix = self._buffer, LENGTH_PREFIX.size
        if not self._fill(prefix):
            if not buffer:
                return None
            _payload_length(bytes(buffer), self.max_frame_bytes)  # raises TruncatedFrame
        length = _payload_length(bytes(buffer[:prefix]), self.max_frame_bytes)
        end = prefix + length
        if not self._fill(end):
            raise TruncatedFrame(
                f"stream ended inside a frame ({len(buffer) - prefix} of {length} payload bytes)"
            )
        # one copy and one cut (a frame is usually whole after the first read)
        payload = bytes(buffer[prefix:end])
        del buffer[:end]
        return payload


def error_reply(request_id: object, error: EmbeddingError) -> dict[str, Any]:
    """The reply that carries ``error`` back to the sender of request ``request_id``."""
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    index = getattr(error, "index", None)
    if index is not None:
        body["index"] = index
    return {"id": request_id, "ok": False, "error": body}


def embeddings_to_bytes(embeddings: npt.NDArray[Any]) -> bytes:
    """Row-major little-endian bytes of a (count, width) array: float32 for float input, or the
    array's own dtype when it holds an ``encoding``'s values (float16, int8, uint8)."""
    if embeddings.dtype.kind == "f" and embeddings.dtype.itemsize != 2:
        dtype = EMBEDDING_DTYPE
    else:
        dtype = embeddings.dtype.newbyteorder("<")
    return np.ascontiguousarray(embeddings, dtype=dtype).tobytes()


def embeddings_from_bytes(
    data: bytes, shape: tuple[int, int], encoding: str = DEFAULT_ENCODING
) -> npt.NDArray[Any]:
    """The (count, width) array held by ``data`` in ``encoding`` (float32 by default, the
    reply's ``dtype``), checked against ``shape``."""
    count, width = shape
    dtype = encoding_dtype(encoding)
    expected = count * width * dtype.itemsize
    if len(data) != expected:
        raise ProtocolError(
            f"embeddings hold {len(data)} bytes, shape {count}x{width} of {encoding} needs "
            f"{expected}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(count, width)
    return array.astype(dtype.newbyteorder("="), copy=False)
