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
    """The request is malformed or exceeds a documented limit. Not retryable.

    ``index`` is the position of the offending text in the caller's inputs when the error is
    about one text (its message then starts with ``inputs[index]``), else None.
    """

    code = "invalid_input"

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index

    def at(self, index: int) -> InvalidInput:
        """The same error about the text found at ``index`` of a larger batch (a client that
        split a batch, or reordered it, maps the worker's index back to its caller's)."""
        if self.index is None:
            return InvalidInput(self.message)
        prefix = f"inputs[{self.index}]"
        message = self.message
        if message.startswith(prefix):
            message = f"inputs[{index}]" + message[len(prefix) :]
        return InvalidInput(message, index)


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


def from_wire(code: object, message: object, index: object = None) -> EmbeddingError:
    """The exception for an error reply's ``code``, ``message`` and optional ``index``;
    unknown codes are Internal."""
    cls = _BY_CODE.get(code, Internal) if isinstance(code, str) else Internal
    text = message if isinstance(message, str) else repr(message)
    if cls is InvalidInput:
        valid_index = isinstance(index, int) and not isinstance(index, bool) and index >= 0
        return InvalidInput(text, index if valid_index else None)  # type: ignore[arg-type]
    if cls is Internal and code != Internal.code:
        text = f"[{code}] {text}"
    return cls(text)
