"""OpenAI's embeddings schema for ``akidb-embed serve``: a request body checked into an
``EmbeddingsQuery``, a reply encoded, every error in OpenAI's shape.

Nothing here touches the network or the workers: a body goes in, a query or an ``ApiError``
comes out; vectors go in, reply bytes come out. The facts a check needs (served models, their
dimensions and prompts) come from the workers' hello, never from literals.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from akidb_embed.errors import (
    EmbeddingError,
    InvalidInput,
    ModelNotFound,
    ServiceUnavailable,
)
from akidb_embed.host_client import BatchEmbeddingRequest, ModelInfo

__all__ = [
    "ENCODING_FORMATS",
    "ApiError",
    "EmbeddingsQuery",
    "api_error",
    "client_truncates_dimensions",
    "encode_reply",
    "json_bytes",
    "parse_query",
    "truncate_dimensions",
]

ENCODING_FORMATS = ("float", "base64")
"""``float``: JSON numbers; ``base64``: each vector's little-endian float32 bytes, base64."""

_NORM_EPSILON = 1e-12
"""As torch.nn.functional.normalize, which sentence-transformers' Normalize module uses."""


def json_bytes(document: Any) -> bytes:
    """``document`` as JSON (numpy arrays as lists of numbers)."""
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


class ApiError(Exception):
    """An HTTP error reply in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers

    @property
    def error_type(self) -> str:
        """OpenAI's ``type``: what the caller got wrong, or that the server failed."""
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> bytes:
        error = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        return json_bytes({"error": error})


def api_error(error: EmbeddingError) -> ApiError:
    """The HTTP reply for an error of the client or the workers (``akidb_embed.errors``)."""
    if isinstance(error, InvalidInput):
        return ApiError(400, error.message, error.code, "input")
    if isinstance(error, ModelNotFound):
        return ApiError(404, error.message, error.code, "model")
    if isinstance(error, ServiceUnavailable):
        return ApiError(503, error.message, error.code)
    return ApiError(500, error.message, error.code)


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(400, message, InvalidInput.code, param)


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _json_type(value: object) -> str:
    """How a JSON value's type reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class EmbeddingsQuery:
    """A checked ``POST /v1/embeddings`` body."""

    texts: list[str]
    model: ModelInfo
    """The served model it names (the default one when ``model`` was absent or null)."""
    encoding_format: str = "float"
    dimensions: int | None = None
    """Keep the first ``dimensions`` components (1 to the model's dimension), renormalised."""
    normalize: bool | None = None
    """``None``: the model's own convention (``ModelInfo.normalize_default``)."""
    prompt_name: str | None = None
    truncate: bool = True

    @property
    def normalized(self) -> bool:
        """Whether the vectors come out L2-normalised."""
        return self.model.normalize_default if self.normalize is None else self.normalize

    def client_request(self, worker_truncates: bool) -> BatchEmbeddingRequest:
        """The host client's request; ``dimensions`` goes along when the workers take it."""
        options: dict[str, Any] = {}
        if worker_truncates and self.dimensions is not None:
            options["dimensions"] = self.dimensions
        return BatchEmbeddingRequest(
            model=self.model.model,
            inputs=self.texts,
            normalize=self.normalize,
            truncate=self.truncate,
            prompt_name=self.prompt_name,
            **options,
        )


def parse_query(
    body: bytes, models: Mapping[str, ModelInfo], default: ModelInfo
) -> EmbeddingsQuery:
    """The query in ``body``, or the ``ApiError`` (400, 404) that names the bad field."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"the body is not valid JSON: {exc}", "body") from None
    if not isinstance(document, dict):
        raise _invalid(f"the body must be a JSON object, not {_json_type(document)}", "body")
    texts = _texts(document.get("input"), "input" in document)
    model = _model(document.get("model"), models, default)
    encoding_format = document.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    elif encoding_format not in ENCODING_FORMATS:
        raise _invalid(
            f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}, got "
            f"{encoding_format!r}",
            "encoding_format",
        )
    return EmbeddingsQuery(
        texts=texts,
        model=model,
        encoding_format=encoding_format,
        dimensions=_dimensions(document.get("dimensions"), model),
        normalize=_optional_bool(document, "normalize", None),
        prompt_name=_prompt_name(document.get("prompt_name"), model),
        truncate=bool(_optional_bool(document, "truncate", True)),
    )


def _texts(value: object, given: bool) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not given:
        raise _invalid("'input' is required: a string or a list of strings", "input")
    if not isinstance(value, list):
        raise _invalid(
            f"'input' must be a string or a list of strings, not {_json_type(value)}", "input"
        )
    if not value:
        raise _invalid("'input' is an empty list: send at least one text", "input")
    for index, text in enumerate(value):
        if not isinstance(text, str):
            hint = (
                ": token arrays are not accepted, send the text"
                if isinstance(text, (int, list))
                else ""
            )
            raise _invalid(
                f"input[{index}] is {_json_type(text)}, not a string{hint}",
                "input",
            )
    return value


def _model(value: object, models: Mapping[str, ModelInfo], default: ModelInfo) -> ModelInfo:
    if value is None:
        return default
    if not isinstance(value, str):
        raise _invalid(f"'model' must be a string, not {_json_type(value)}", "model")
    served = models.get(value)
    if served is None:
        raise ApiError(
            404,
            f"the model {value!r} is not served here; served: {', '.join(models)}",
            ModelNotFound.code,
            "model",
        )
    return served


def _dimensions(value: object, model: ModelInfo) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= model.dimension:
        raise _invalid(
            f"'dimensions' must be an integer from 1 to {model.dimension} (the dimension of "
            f"{model.model}), got {value!r}",
            "dimensions",
        )
    return value


def _optional_bool(document: Mapping[str, object], name: str, default: bool | None) -> bool | None:
    value = document.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(f"'{name}' must be true, false or null, not {_json_type(value)}", name)
    return value


def _prompt_name(value: object, model: ModelInfo) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(f"'prompt_name' must be a string, not {_json_type(value)}", "prompt_name")
    if value not in model.prompts:
        offered = ", ".join(model.prompts) if model.prompts else "none"
        raise _invalid(
            f"the model {model.model} has no prompt {value!r}; its prompts: {offered}",
            "prompt_name",
        )
    return value


def client_truncates_dimensions() -> bool:
    """Whether the host client passes ``dimensions`` to the workers (which then truncate and
    renormalise); without it, ``truncate_dimensions`` does the same here."""
    return any(field.name == "dimensions" for field in dataclasses.fields(BatchEmbeddingRequest))


def truncate_dimensions(
    vectors: npt.NDArray[np.float32], dimensions: int, normalize: bool
) -> npt.NDArray[np.float32]:
    """The first ``dimensions`` components of each vector, L2-normalised again when
    ``normalize`` (sentence-transformers' ``truncate_dim`` then ``normalize_embeddings``).

    Used only while the workers cannot do it (``client_truncates_dimensions``): the worker's
    own ``dimensions`` option replaces this function where the client has it."""
    cut = vectors[:, :dimensions]
    if not normalize:
        return np.ascontiguousarray(cut)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return np.ascontiguousarray(cut / np.maximum(norms, _NORM_EPSILON), dtype=np.float32)


def encode_reply(
    vectors: npt.NDArray[np.float32], model: str, tokens: int, encoding_format: str
) -> bytes:
    """OpenAI's reply: ``object``, ``data[{object, index, embedding}]``, ``model``, ``usage``."""
    if encoding_format == "base64":
        little_endian = vectors.astype("<f4", copy=False)
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": base64.b64encode(row.tobytes()).decode("ascii"),
            }
            for index, row in enumerate(little_endian)
        ]
    else:
        data = [
            {"object": "embedding", "index": index, "embedding": row}
            for index, row in enumerate(vectors)
        ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return json_bytes({"object": "list", "data": data, "model": model, "usage": usage})
