"""The values a host exchanges with the client: AkiDB's request, response, usage and model info.

They mirror AkiDB's Rust types field for field (``BatchEmbeddingRequest {model, inputs,
normalize}`` and so on); ``truncate`` is this project's addition (protocol.md, ``embed``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

__all__ = [
    "BatchEmbeddingRequest",
    "BatchEmbeddingResponse",
    "ClientStats",
    "ModelInfo",
    "RequestTrace",
    "Usage",
    "WorkerStats",
]


@dataclass(frozen=True)
class BatchEmbeddingRequest:
    """Texts to embed with one model.

    ``model`` must name a loaded model (``ModelInfo.model`` of ``client.models()``), or be
    ``None`` for the worker's default model; any other name fails with ``ModelNotFound``
    listing the loaded ids. ``inputs`` holds one or more texts (none fails with
    ``InvalidInput``, as AkiDB's providers answer an empty batch); the client splits what the
    worker's limits do not allow in one frame. ``normalize`` ``None`` means the model's own
    convention (``ModelInfo.normalize_default``: its sentence-transformers module chain ends in
    Normalize). ``prompt_name`` names one of the model's prompts (``ModelInfo.prompts``), put
    before every input as sentence-transformers does; ``None``: the model's default prompt, if
    it has one. With ``truncate=False`` an input longer than ``max_tokens`` fails the request
    with ``InvalidInput`` instead of being cut; ``truncation_side="left"`` cuts an over-long
    input's start instead of its end. ``dimensions`` keeps each vector's first components
    (re-normalised when normalising: sentence-transformers' ``truncate_dim``); ``None``: all.
    """

    model: str | None
    inputs: Sequence[str]
    normalize: bool | None = None
    truncate: bool = True
    prompt_name: str | None = None
    dimensions: int | None = None
    truncation_side: str = "right"


@dataclass(frozen=True)
class Usage:
    """What a call cost.

    ``total_tokens``: tokens the model ran over all inputs (special tokens included, after
    truncation, padding not counted), summed over the wire requests of the call.
    ``duration_ms``: wall time of the whole call as the caller saw it, from submission to the
    last reply (queueing, transport and any re-sending after a worker restart included).
    """

    total_tokens: int
    duration_ms: float
    queue_ms: float = 0.0
    """Of ``duration_ms``, how long the call's texts waited in the client before the last of
    them was admitted (``max_in_flight_texts`` full): the client's own queue, 0 for a call
    admitted at once. For monitoring (``akidb-embed serve`` exports it); the Rust client has
    no such field."""


@dataclass(frozen=True, eq=False)
class BatchEmbeddingResponse:
    """One vector per input, in input order: ``embeddings[i]`` belongs to ``inputs[i]``.

    ``embeddings`` is a C-contiguous float32 array of shape ``(len(inputs), dimension)``
    (``dimension``: the request's ``dimensions``, else the model's). ``EmbeddingClient.embed``
    with another ``encoding`` gives that encoding's array instead.
    """

    model: str
    embeddings: npt.NDArray[Any]
    usage: Usage


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model, as its worker announced it: AkiDB's ``ModelInfo`` (``model``,
    ``dimension``, ``max_tokens``) and, beside it, what a request may ask of the model."""

    model: str
    dimension: int
    max_tokens: int
    normalize_default: bool = True
    """Whether ``normalize=None`` gives L2-normalised vectors (the model's convention)."""
    pooling: str = "mean"
    """How token vectors become one vector: ``cls``, ``mean``, ``max`` or ``lasttoken``."""
    prompts: tuple[str, ...] = ()
    """The prompt names a request's ``prompt_name`` may take."""
    default_prompt_name: str | None = None
    """The prompt used when a request names none (``None``: no prompt)."""
    variant: str | None = None
    """``None``: the model as exported; ``"int8"``: a quantised variant of ``base_model``
    that passed the quality gate against it."""
    base_model: str | None = None
    """A variant's fp32 model id (``None`` for a model that is no variant)."""
    encodings: tuple[str, ...] = ("float32",)
    """The ``encoding`` values ``embed`` may take for this model (int8 and uint8 need its
    calibration vectors)."""
    matryoshka_dimensions: tuple[int, ...] = ()
    """The shorter ``dimensions`` the model was trained for, largest first, where its files
    list them."""


@dataclass(frozen=True)
class WorkerStats:
    """One worker slot of the client (``ClientStats.workers``)."""

    index: int
    """The slot's place in the pool, 0 to ``workers - 1``."""
    state: str
    """``starting``, ``ready``, ``restarting``, ``given up`` (its restart budget is spent),
    ``closing`` or ``closed``."""
    pid: int | None
    """The slot's serving worker process; ``None`` while none is ready."""
    spawns: int
    """Worker processes this slot started (the first one included)."""
    restarts: int
    """Workers of this slot that replaced a dead or hung one."""
    in_flight_texts: int
    """Texts written to this slot's worker and not yet answered."""
    in_flight_tokens: int
    """Their estimated tokens: requests go to the slot with the fewest."""
    answered_requests: int
    """Replies this slot's workers delivered (embed chunks and ops)."""


@dataclass(frozen=True)
class ClientStats:
    """A snapshot of the client's supervision counters, for monitoring and tests: totals over
    the pool, and each worker slot in ``workers``."""

    worker_pid: int | None
    """The first slot's serving worker process id (with one worker, the worker's);
    ``None`` while it has none ready. Every slot's pid is in ``workers``."""
    spawns: int
    """Worker processes started so far, over all slots (the first ones included)."""
    restarts: int
    """Workers that replaced a dead or hung one, over all slots."""
    resent_requests: int
    """Wire requests sent again, to any worker, after theirs died or hung."""
    in_flight_texts: int
    """Texts admitted and not yet answered: written to a worker, or held for re-sending."""
    peak_in_flight_texts: int
    """The most ``in_flight_texts`` ever reached; never above ``max_in_flight_texts``."""
    workers: tuple[WorkerStats, ...] = ()
    """Each worker slot, in slot order."""


@dataclass(frozen=True)
class RequestTrace:
    """When one embed wire request passed each stage, for measuring the client (the ``trace``
    option of ``EmbeddingClient``, ``AsyncEmbeddingClient`` and a pool).

    Every mark is ``time.monotonic_ns()`` of this process; ``worker`` holds the reply's own
    ``trace`` marks (protocol.md, ``embed``), on the same clock on Linux. A call cut into
    several wire requests gives one trace per request, all with the call's ``submitted``; a
    request sent again after its worker died or hung has the marks of its last attempt.
    """

    request_id: int
    texts: int
    """Texts the request carried."""
    submitted: int
    """The call entered the client."""
    encoding: int
    encoded: int
    """Its frame was encoded (msgpack) between these two marks."""
    writing: int
    written: int
    """Its frame was written to the worker's pipe (or queued for the writer thread) between
    these two marks."""
    read: int
    """The reply's frame was read whole off the pipe."""
    decoded: int
    """The reply was decoded (msgpack)."""
    delivered: int
    """The reply was handed over: its rows placed and, for a call's last reply, the call's
    result given to the waiting caller."""
    worker: Mapping[str, int]
    """The reply's ``trace``: ``read``, ``parsed``, ``tokenized``, ``queued`` (when it
    waited), ``started``, ``ran``, ``pooled`` and ``encode_ns``; empty for an error reply."""
