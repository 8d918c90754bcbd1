"""The one error hierarchy of akidb-embed, shared by the worker, the host clients and the wire.

What to catch::

    EmbeddingError                 base of everything raised by akidb-embed
    ├── InvalidInput               the request itself is wrong (types, sizes, over-long text)
    ├── ModelNotFound              the model named is not the one loaded, or no model directory
    ├── ServiceUnavailable         no worker can answer now; retrying later may succeed
    │   └── RequestTimeout         a request outlived its budget (the worker was killed)
    └── Internal                   a bug or a broken invariant on either side
        └── ProtocolError          a frame broke the wire contract (protocol.md)

Each class carries the wire error code it travels as (``code``); ``from_wire`` turns a code and
message from an error reply back into the matching exception, so the mapping exists only here.
"""

from __future__ import annotations

__all__ = [
    "EmbeddingError",
    "Internal",
    "InvalidInput",
    "ModelNotFound",
    "ProtocolError",
    "RequestTimeout",
    "ServiceUnavailable",
    "from_wire",
]


class EmbeddingError(Exception):
    """Base class of every error akidb-embed raises."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(EmbeddingError):
    """The request is malformed or exceeds a documented limit. Not retryable."""

    code = "invalid_input"


class ModelNotFound(EmbeddingError):
    """The requested model is not the loaded one, or no usable model directory exists."""

    code = "model_not_found"


class ServiceUnavailable(EmbeddingError):
    """The worker cannot answer now (starting, dead, restart budget spent, shutting down)."""

    code = "service_unavailable"


class RequestTimeout(ServiceUnavailable):
    """A request outlived its time budget; the worker that held it was replaced."""


class Internal(EmbeddingError):
    """A bug or broken invariant: an unexpected exception, a wrong reply shape."""

    code = "internal"


class ProtocolError(Internal):
    """A frame violated the wire contract: undecodable, not a map, missing envelope fields."""

    code = "protocol_error"


_BY_CODE: dict[str, type[EmbeddingError]] = {
    cls.code: cls
    for cls in (InvalidInput, ModelNotFound, ServiceUnavailable, Internal, ProtocolError)
}


def from_wire(code: object, message: object) -> EmbeddingError:
    """The exception for an error reply's ``code`` and ``message``; unknown codes are Internal."""
    cls = _BY_CODE.get(code, Internal) if isinstance(code, str) else Internal
    text = message if isinstance(message, str) else repr(message)
    if cls is Internal and code != Internal.code:
        text = f"[{code}] {text}"
    return cls(text)
