"""Request validation: a decoded frame in, a typed request or a ``RejectedRequest`` out.

Pure functions of the message and the worker's limits (protocol.md sections 4 and 5), so that
a property test can throw arbitrary maps at them. The envelope (``id``, ``op``) failing is a
``protocol_error``; an embed's fields failing is ``invalid_input``, or ``model_not_found`` for a
model the worker has not loaded (the message lists the loaded ids). The error carries the
request's id whenever it could be read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from akidb_embed.errors import EmbeddingError, InvalidInput, ModelNotFound, ProtocolError

__all__ = [
    "MAX_REQUEST_ID",
    "OPS",
    "EmbedRequest",
    "OpRequest",
    "RejectedRequest",
    "Request",
    "RequestLimits",
    "parse_request",
]

MAX_REQUEST_ID = 2**64 - 1
OPS = ("embed", "info", "health", "ping", "shutdown")
_MAX_QUOTED = 60
"""Longest piece of a request quoted back in an error message."""


@dataclass(frozen=True)
class RequestLimits:
    max_texts_per_request: int
    max_text_bytes: int


@dataclass(frozen=True)
class OpRequest:
    """A request without fields of its own: info, health, ping or shutdown."""

    id: int
    op: str


@dataclass(frozen=True)
class EmbedRequest:
    id: int
    inputs: list[str]
    model: str
    """A loaded model's id (nil in the request: the default model's)."""
    normalize: bool | None
    """None: the model's default."""
    truncate: bool
    prompt_name: str | None = None
    """None: the model's default prompt, if it has one."""
    op: str = "embed"


Request = OpRequest | EmbedRequest


class RejectedRequest(Exception):
    """A request that gets an error reply: ``error`` for the request ``request_id`` (None when
    the id could not be read)."""

    def __init__(self, request_id: int | None, error: EmbeddingError) -> None:
        super().__init__(error.message)
        self.request_id = request_id
        self.error = error


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 3] + "..."


def _type_name(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def _is_request_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REQUEST_ID


def _optional_bool(message: dict[str, Any], name: str, default: bool | None) -> bool | None:
    value = message.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be a bool, not {_type_name(value)}")
    return value


def _optional_str(message: dict[str, Any], name: str) -> str | None:
    value = message.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string or nil, not {_type_name(value)}")
    return value


def _inputs(message: dict[str, Any], limits: RequestLimits) -> list[str]:
    inputs = message.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInput(f"inputs must be an array of strings, not {_type_name(inputs)}")
    if not inputs:
        raise InvalidInput("inputs is empty")
    if len(inputs) > limits.max_texts_per_request:
        raise InvalidInput(
            f"{len(inputs)} inputs, more than max_texts_per_request="
            f"{limits.max_texts_per_request}; split the batch"
        )
    for index, text in enumerate(inputs):
        if not isinstance(text, str):
            raise InvalidInput(f"inputs[{index}] is a {_type_name(text)}, not a string", index)
        # a str of n code points holds at most 4n UTF-8 bytes: encode only when it might be over
        if len(text) * 4 > limits.max_text_bytes:
            size = len(text.encode("utf-8"))
            if size > limits.max_text_bytes:
                raise InvalidInput(
                    f"inputs[{index}] holds {size} UTF-8 bytes, more than max_text_bytes="
                    f"{limits.max_text_bytes}",
                    index,
                )
    return inputs


def _embed(
    request_id: int, message: dict[str, Any], limits: RequestLimits, models: Sequence[str]
) -> Request:
    inputs = _inputs(message, limits)
    requested_model = _optional_str(message, "model")
    if requested_model is not None and requested_model not in models:
        served = ", ".join(repr(model) for model in models)
        raise ModelNotFound(
            f"model {_quote(requested_model)} is not loaded; this worker serves {served}"
        )
    truncate = _optional_bool(message, "truncate", True)
    return EmbedRequest(
        id=request_id,
        inputs=inputs,
        model=models[0] if requested_model is None else requested_model,
        normalize=_optional_bool(message, "normalize", None),
        truncate=bool(truncate),
        prompt_name=_optional_str(message, "prompt_name"),
    )


def parse_request(message: dict[str, Any], limits: RequestLimits, models: Sequence[str]) -> Request:
    """The request held by ``message`` (one decoded frame), or ``RejectedRequest``. ``models``
    are the ids of the loaded models, the default (answered for a nil ``model``) first."""
    request_id = message.get("id")
    if not _is_request_id(request_id):
        problem = "missing" if "id" not in message else f"not a uint64: {_quote(request_id)}"
        raise RejectedRequest(None, ProtocolError(f"request id {problem}"))
    assert isinstance(request_id, int)
    op = message.get("op")
    if not isinstance(op, str):
        problem = "missing" if "op" not in message else f"a {_type_name(op)}, not a string"
        raise RejectedRequest(request_id, ProtocolError(f"op {problem}"))
    if op not in OPS:
        raise RejectedRequest(request_id, ProtocolError(f"unknown op {_quote(op)}"))
    if op != "embed":
        return OpRequest(id=request_id, op=op)
    try:
        return _embed(request_id, message, limits, models)
    except EmbeddingError as error:
        raise RejectedRequest(request_id, error) from None
