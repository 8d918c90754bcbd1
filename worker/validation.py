"""Request validation: a frame's payload in, a typed request or a ``RejectedRequest`` out.

Pure functions of the payload and the worker's limits (protocol.md sections 2, 4 and 5), so
that a property test can throw arbitrary maps at them. A missing ``id``, or an ``op`` missing,
mistyped or unknown, is a ``protocol_error``; an id that is not a uint64, and an embed's fields
failing, are ``invalid_input`` (``model_not_found`` for a model the worker has not loaded: the
message lists the loaded ids). The error carries the request's id whenever it could be read,
exactly as sent.

A payload that msgpack refuses to decode strictly (a string that is not UTF-8, a key that is
not a string, nesting too deep, a map cut short) is decoded again leniently
(``wire.salvage``) to find its id and the first offending field: an input's position there
becomes the error's ``index``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from akidb_embed.encodings import ENCODINGS, TRUNCATION_SIDES
from akidb_embed.errors import EmbeddingError, InvalidInput, ModelNotFound, ProtocolError
from akidb_embed.wire import (
    MAX_NESTING,
    MalformedMessage,
    SalvagedMap,
    Undecodable,
    is_valid_text,
    msgpack_type,
    salvage,
    served_model_id,
    unpack,
)

__all__ = [
    "MAX_REQUEST_ID",
    "OPS",
    "EmbedRequest",
    "OpRequest",
    "RangesRequest",
    "RejectedRequest",
    "Request",
    "RequestLimits",
    "TokenizeRequest",
    "parse_payload",
    "parse_request",
    "reply_id",
]

MAX_REQUEST_ID = 2**64 - 1
OPS = ("embed", "tokenize", "quantization_ranges", "info", "health", "ping", "shutdown")
_MAX_QUOTED = 60
"""Longest piece of a request quoted back in an error message."""
_MAX_PATH_DEPTH = 5
"""Deepest level a message names a value by its full path (``a.b[1].c``) before "..."."""
_FIELD = re.compile(r"inputs\[\d+\]|[^.\[]*")
"""The start of a value's path that names the request's field (or the input) it is in."""


@dataclass(frozen=True)
class RequestLimits:
    """The worker's limits that a request is checked against here (WorkerConfig's)."""

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
    trace: bool = False
    """Whether the reply carries the worker's stage marks (protocol.md, ``trace``)."""
    dimensions: int | None = None
    """Components kept (None: all); checked against the model by the engine."""
    encoding: str | None = None
    """None: float32, and the reply has no ``dtype`` (as before encodings existed)."""
    truncation_side: str = "right"
    op: str = "embed"


@dataclass(frozen=True)
class TokenizeRequest:
    id: int
    inputs: list[str]
    model: str
    truncate: bool
    prompt_name: str | None = None
    truncation_side: str = "right"
    op: str = "tokenize"


@dataclass(frozen=True)
class RangesRequest:
    """The int8/uint8 ranges an embed of the same ``model``, ``dimensions`` and ``normalize``
    quantises with."""

    id: int
    model: str
    normalize: bool | None
    dimensions: int | None = None
    op: str = "quantization_ranges"


Request = OpRequest | EmbedRequest | TokenizeRequest | RangesRequest


class RejectedRequest(Exception):
    """A request that gets an error reply: ``error`` for the request ``request_id``, the id as
    sent (None when it could not be read)."""

    def __init__(self, request_id: object, error: EmbeddingError) -> None:
        super().__init__(error.message)
        self.request_id = request_id
        self.error = error


def _quote(text: str) -> str:
    quoted = repr(text)
    return quoted if len(quoted) <= _MAX_QUOTED else quoted[: _MAX_QUOTED - 3] + "..."


def _a(value: object) -> str:
    """``value``'s msgpack type with its article, for messages: "an integer", "nil"."""
    name = msgpack_type(value)
    if name == "nil":
        return name
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _is_request_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REQUEST_ID


def reply_id(value: object) -> object:
    """The id a reply carries for a request whose ``id`` is ``value``: the value as sent when
    it is a scalar (a client can match it), nil for an array, a map or an extension."""
    if isinstance(value, str):
        return value if is_valid_text(value) else None
    if value is None or isinstance(value, int | float | bytes):
        return value
    return None


def _id_problem(value: object) -> str:
    shown = ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        shown = f" ({value!r})"
    elif isinstance(value, str) and is_valid_text(value):
        shown = f" ({_quote(value)})"
    if isinstance(value, int) and not isinstance(value, bool):
        kind = "a negative integer" if value < 0 else "an integer above 2^64-1"
    else:
        kind = _a(value)
    return f"id must be an integer from 0 to 2^64-1, not {kind}{shown}"


def _optional_bool(message: dict[str, Any], name: str, default: bool | None) -> bool | None:
    value = message.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be a boolean or nil, not {_a(value)}")
    return value


def _optional_str(message: dict[str, Any], name: str) -> str | None:
    value = message.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string or nil, not {_a(value)}")
    return value


def _inputs(message: dict[str, Any], limits: RequestLimits) -> list[str]:
    inputs = message.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInput(f"inputs must be an array of strings, not {_a(inputs)}")
    if not inputs:
        raise InvalidInput("inputs is empty")
    if len(inputs) > limits.max_texts_per_request:
        raise InvalidInput(
            f"{len(inputs)} inputs, more than max_texts_per_request="
            f"{limits.max_texts_per_request}; split the batch"
        )
    for index, text in enumerate(inputs):
        if not isinstance(text, str):
            raise InvalidInput(f"inputs[{index}] is {_a(text)}, not a string", index)
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


def _model(message: dict[str, Any], models: Sequence[str]) -> str:
    requested_model = _optional_str(message, "model")
    model = models[0] if requested_model is None else served_model_id(requested_model, models)
    if model is None:
        served = ", ".join(repr(model) for model in models)
        raise ModelNotFound(
            f"model {_quote(str(requested_model))} is not loaded; this worker serves {served}"
        )
    return model


def _dimensions(message: dict[str, Any]) -> int | None:
    """``dimensions`` as sent (its upper bound is the model's: the engine checks it)."""
    value = message.get("dimensions")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"dimensions must be an integer or nil, not {_a(value)}")
    if value < 1:
        raise InvalidInput(f"dimensions must be 1 or more, not {value}")
    return value


def _choice(message: dict[str, Any], name: str, choices: Sequence[str]) -> str | None:
    value = message.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string or nil, not {_a(value)}")
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}, not {_quote(value)}")
    return value


def _embed(
    request_id: int, message: dict[str, Any], limits: RequestLimits, models: Sequence[str]
) -> Request:
    inputs = _inputs(message, limits)
    truncate = _optional_bool(message, "truncate", True)
    return EmbedRequest(
        id=request_id,
        inputs=inputs,
        model=_model(message, models),
        normalize=_optional_bool(message, "normalize", None),
        truncate=bool(truncate),
        prompt_name=_optional_str(message, "prompt_name"),
        trace=bool(_optional_bool(message, "trace", False)),
        dimensions=_dimensions(message),
        encoding=_choice(message, "encoding", tuple(ENCODINGS)),
        truncation_side=_choice(message, "truncation_side", TRUNCATION_SIDES) or "right",
    )


def _tokenize(
    request_id: int, message: dict[str, Any], limits: RequestLimits, models: Sequence[str]
) -> Request:
    inputs = _inputs(message, limits)
    return TokenizeRequest(
        id=request_id,
        inputs=inputs,
        model=_model(message, models),
        truncate=bool(_optional_bool(message, "truncate", True)),
        prompt_name=_optional_str(message, "prompt_name"),
        truncation_side=_choice(message, "truncation_side", TRUNCATION_SIDES) or "right",
    )


def parse_payload(payload: bytes, limits: RequestLimits, models: Sequence[str]) -> Request:
    """The request held by one frame's ``payload``, or ``RejectedRequest``. ``models`` are the
    ids of the loaded models, the default (answered for a nil ``model``) first."""
    try:
        message = unpack(payload)
    except MalformedMessage as malformed:
        raise _rejection_of_undecodable(payload, malformed) from None
    return parse_request(message, limits, models)


def parse_request(message: dict[str, Any], limits: RequestLimits, models: Sequence[str]) -> Request:
    """The request held by ``message`` (one decoded frame), or ``RejectedRequest``."""
    if "id" not in message:
        raise RejectedRequest(None, ProtocolError("request id missing"))
    request_id = message["id"]
    if not _is_request_id(request_id):
        raise RejectedRequest(reply_id(request_id), InvalidInput(_id_problem(request_id)))
    assert isinstance(request_id, int)
    op = message.get("op")
    if not isinstance(op, str):
        problem = "missing" if "op" not in message else f"is {_a(op)}, not a string"
        raise RejectedRequest(request_id, ProtocolError(f"op {problem}"))
    if op not in OPS:
        raise RejectedRequest(request_id, ProtocolError(f"unknown op {_quote(op)}"))
    if op not in ("embed", "tokenize", "quantization_ranges"):
        return OpRequest(id=request_id, op=op)
    try:
        if op == "quantization_ranges":
            return RangesRequest(
                id=request_id,
                model=_model(message, models),
                normalize=_optional_bool(message, "normalize", None),
                dimensions=_dimensions(message),
            )
        parse = _embed if op == "embed" else _tokenize
        return parse(request_id, message, limits, models)
    except EmbeddingError as error:
        raise RejectedRequest(request_id, error) from None


# -- payloads that strict decoding refused -------------------------------------------------


def _rejection_of_undecodable(payload: bytes, malformed: MalformedMessage) -> RejectedRequest:
    """The error reply for a payload ``unpack`` refused: with the id when lenient decoding
    reaches it, ``invalid_input`` naming the first bad value inside the map (and its input's
    ``index``), ``protocol_error`` when the payload is not one complete map."""
    salvaged = salvage(payload)
    if salvaged is None:
        return RejectedRequest(None, malformed)
    fields = {key: value for key, value in salvaged.pairs if isinstance(key, str)}
    request_id = fields.get("id")
    if "id" in fields and not isinstance(request_id, Undecodable):
        if not _is_request_id(request_id):
            return RejectedRequest(reply_id(request_id), InvalidInput(_id_problem(request_id)))
        unread = ""
    else:
        request_id = None
        unread = "" if salvaged.complete else " (the request id could not be read)"
    bad_value = _first_bad_value(salvaged)
    if bad_value is not None:
        message, index = bad_value
        return RejectedRequest(request_id, InvalidInput(message + unread, index))
    problem = salvaged.problem or "is not valid msgpack"
    return RejectedRequest(request_id, ProtocolError(f"payload {problem}{unread}"))


def _first_bad_value(salvaged: SalvagedMap) -> tuple[str, int | None] | None:
    """The first value of the map, in payload order, that strict decoding refuses: a string
    that is not UTF-8, a key that is not a string, nesting deeper than ``MAX_NESTING``, an
    undecodable value. Returns the message and, for a value inside ``inputs[i]``, ``i``."""
    # Depth-first in payload order, without recursion (values may nest 1024 levels deep).
    # Entries: (path, value, index of the input it is in, depth: containers from the map down).
    stack: list[tuple[str, object, int | None, int]] = []
    for key, value in reversed(salvaged.pairs):
        if isinstance(key, str) and is_valid_text(key):
            stack.append((key, value, None, 2))
        else:
            problem = key if isinstance(key, Undecodable) else Undecodable(f"has {_key(key)}")
            stack.append(("the request map", problem, None, 1))
    while stack:
        path, value, index, depth = stack.pop()
        if isinstance(value, Undecodable):
            return f"{path} {value.reason}", index
        if isinstance(value, str) and not is_valid_text(value):
            return f"{path} is not valid UTF-8", index
        if not isinstance(value, list | tuple | dict):
            continue
        if depth > MAX_NESTING:
            field = _FIELD.match(path)
            name = field.group() if field else path
            return f"{name} is nested more than {MAX_NESTING} levels deep", index
        if isinstance(value, dict):
            items: list[tuple[str, object, int | None]] = []
            for key, item in value.items():
                if isinstance(key, str) and is_valid_text(key):
                    items.append((_extend(path, f".{key}", depth), item, index))
                else:
                    items.append((path, Undecodable(f"has {_key(key)}"), index))
        else:
            items = [
                (_extend(path, f"[{position}]", depth), item, index)
                for position, item in enumerate(value)
            ]
            if path == "inputs":
                items = [
                    (item_path, item, position)
                    for position, (item_path, item, _) in enumerate(items)
                ]
        stack.extend(
            (item_path, item, item_index, depth + 1)
            for item_path, item, item_index in reversed(items)
        )
    return None


def _extend(path: str, step: str, depth: int) -> str:
    """A value's path for messages: ``note.list[2]``, cut short ("...") below a few levels."""
    if depth < _MAX_PATH_DEPTH:
        return path + step
    return path if path.endswith("...") else path + "..."


def _key(key: object) -> str:
    if isinstance(key, str):
        return "a key that is not valid UTF-8"
    return f"a key that is {_a(key)}, not a string"
