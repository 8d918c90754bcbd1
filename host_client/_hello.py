"""The worker's hello (protocol.md section 3): what a ready worker announces about itself, and
how a client reads it from the worker's first frame.

Beside the other values of the wire (``_types.py``): the process module spawns workers and
moves frames; what a hello means is decided here, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from akidb_embed import wire
from akidb_embed.errors import ModelNotFound, ProtocolError, from_wire
from akidb_embed.host_client._types import ModelInfo

__all__ = ["Hello", "parse_hello"]

REPLY_HEADROOM_BYTES = 64 * 1024
"""Allowance for a reply's fields beyond its embedding bytes (protocol.md: a few hundred)."""

REQUIRED_LIMITS = ("max_frame_bytes", "max_texts_per_request", "max_text_bytes", "max_batch_tokens")
"""The hello's limits a client needs to split requests (protocol.md section 7)."""


@dataclass(frozen=True)
class Hello:
    """What a ready worker announced about itself (protocol.md section 3)."""

    protocol: int
    pid: int
    model: str
    dimension: int
    max_tokens: int
    normalize_default: bool
    providers: tuple[str, ...]
    limits: Mapping[str, int]
    worker_version: str
    models: tuple[ModelInfo, ...] = ()
    """Every model the worker serves, the default (``model``) first."""
    lanes: int = 1
    """ONNX Runtime runs the worker makes at once (1 from a worker that does not say)."""
    threads: int = 0
    """Intra-op threads of the worker's sessions (0: ONNX Runtime's choice, or not said)."""

    def served(self, model: str | None) -> ModelInfo:
        """The served model named ``model`` (``None``: the default one; a short name such as
        ``all-MiniLM-L6-v2`` when only one id ends with it); ``ModelNotFound`` listing the
        loaded ids otherwise."""
        if model is None:
            return self.models[0]
        found = wire.served_model_id(model, [info.model for info in self.models])
        for info in self.models:
            if info.model == found:
                return info
        loaded = ", ".join(repr(info.model) for info in self.models)
        raise ModelNotFound(f"model {model!r} is not loaded; the worker serves {loaded}")

    def max_reply_bytes(self) -> int:
        """The largest reply this worker can send: its frame limit or a full embed reply."""
        full_reply = self.limits["max_texts_per_request"] * self.dimension * 4
        return max(self.limits["max_frame_bytes"], full_reply + REPLY_HEADROOM_BYTES)


def parse_hello(message: Mapping[str, Any]) -> Hello:
    """The ``Hello`` of a worker's first frame.

    Raises the worker's own error for ``ok: false`` (``ModelNotFound``, ``ServiceUnavailable``
    ...), and ``ProtocolError`` for another protocol version or a frame that is no hello.
    """
    if message.get("op") != "hello":
        raise ProtocolError(f"the worker's first frame is not a hello: {_summary(message)}")
    protocol = message.get("protocol")
    if protocol != wire.PROTOCOL_VERSION:
        raise ProtocolError(
            f"the worker speaks protocol {protocol!r}, this client speaks "
            f"{wire.PROTOCOL_VERSION}: install matching versions of the worker and the client"
        )
    if message.get("ok") is not True:
        error = message.get("error")
        if not isinstance(error, Mapping):
            raise ProtocolError(f"failed hello without an error: {_summary(message)}")
        raise from_wire(error.get("code"), error.get("message"))
    try:
        model = message["model"]
        limits = message["limits"]
        default = ModelInfo(
            model=str(model["model"]),
            dimension=int(model["dimension"]),
            max_tokens=int(model["max_tokens"]),
            normalize_default=bool(message.get("normalize_default", True)),
        )
        # a worker of protocol 1's first release announces only its one model
        served = [_model_info(entry) for entry in message.get("models") or ()] or [default]
        hello = Hello(
            protocol=int(protocol),
            pid=int(message["pid"]),
            model=str(model["model"]),
            dimension=int(model["dimension"]),
            max_tokens=int(model["max_tokens"]),
            normalize_default=bool(message.get("normalize_default", True)),
            providers=tuple(str(name) for name in message.get("providers", ())),
            limits={str(name): int(value) for name, value in limits.items()},
            worker_version=str(message.get("worker_version", "")),
            models=tuple(served),
            lanes=int(message.get("lanes", 1)),
            threads=int(message.get("threads", 0)),
        )
        for name in REQUIRED_LIMITS:
            if name not in hello.limits:
                raise KeyError(f"limits.{name}")
        return hello
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"malformed hello ({exc!r}): {_summary(message)}") from None


def _model_info(entry: Mapping[str, Any]) -> ModelInfo:
    """One entry of the hello's ``models`` list."""
    default_prompt = entry.get("default_prompt_name")
    variant, base_model = entry.get("variant"), entry.get("base_model")
    return ModelInfo(
        model=str(entry["model"]),
        dimension=int(entry["dimension"]),
        max_tokens=int(entry["max_tokens"]),
        normalize_default=bool(entry.get("normalize_default", True)),
        pooling=str(entry.get("pooling", "mean")),
        prompts=tuple(str(name) for name in entry.get("prompts") or ()),
        default_prompt_name=None if default_prompt is None else str(default_prompt),
        variant=None if variant is None else str(variant),
        base_model=None if base_model is None else str(base_model),
        encodings=tuple(str(name) for name in entry.get("encodings") or ("float32",)),
        matryoshka_dimensions=tuple(int(d) for d in entry.get("matryoshka_dimensions") or ()),
    )


def _summary(message: Mapping[str, Any]) -> str:
    text = repr(dict(message))
    return text if len(text) <= 300 else text[:300] + "..."
