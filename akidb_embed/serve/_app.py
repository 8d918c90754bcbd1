"""The ASGI application of ``akidb-embed serve``: four routes over one ``AsyncEmbeddingClient``.

A plain ASGI callable rather than a framework's router: there are four fixed routes, and on a
lone query every Python step between the socket and the workers is latency (see the package's
docstring for the path and the measurements behind the choice). Each request is answered with
one ``http.response.start`` and one ``http.response.body``; every failure, wherever it happens,
becomes an ``ApiError`` reply in OpenAI's shape and is counted in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from akidb_embed.errors import EmbeddingError, ServiceUnavailable
from akidb_embed.host_client import AsyncEmbeddingClient, ModelInfo
from akidb_embed.serve._metrics import CONTENT_TYPE, Metrics
from akidb_embed.serve._schema import (
    ApiError,
    api_error,
    client_truncates_dimensions,
    encode_reply,
    json_bytes,
    parse_query,
    truncate_dimensions,
)

__all__ = ["EmbeddingsApp"]

logger = logging.getLogger("akidb_embed.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]
Handler = Callable[[Scope, Receive], Awaitable[Reply]]

JSON = b"application/json"
ENDPOINTS = "POST /v1/embeddings, GET /v1/models, GET /health, GET /metrics"
OPEN_PATHS = frozenset({"/health"})
"""Answered without the API key: a load balancer's probe carries none, and says only ready or
not."""


def _reply(
    status: int, body: bytes, content_type: bytes = JSON, extra: Headers | None = None
) -> Reply:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    return status, headers + (extra or []), body


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"the body is over the limit of {limit} bytes (--max-body-bytes)", "request_too_large"
    )


class EmbeddingsApp:
    """``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health`` and ``GET /metrics``.

    The lifespan's startup starts the client's workers in the background (``/health`` says 503
    until every one is ready; embedding requests wait for them); ``on_fatal`` is told when they
    cannot start at all. The lifespan's shutdown closes the client: the server calls it once
    the requests in flight are answered.
    """

    def __init__(
        self,
        client: AsyncEmbeddingClient,
        *,
        max_body_bytes: int,
        api_key: str | None = None,
        on_ready: Callable[[list[ModelInfo]], None] | None = None,
        on_fatal: Callable[[EmbeddingError], None] | None = None,
    ) -> None:
        self._client = client
        self._max_body_bytes = max_body_bytes
        self._bearer = None if api_key is None else b"Bearer " + api_key.encode("utf-8")
        self._on_ready = on_ready
        self._on_fatal = on_fatal
        self.metrics = Metrics(client.stats)
        self._models: dict[str, ModelInfo] = {}
        self._default: ModelInfo | None = None
        self._failure: EmbeddingError | None = None
        self._started = asyncio.Event()
        self._starting: asyncio.Task[None] | None = None
        self._worker_truncates = client_truncates_dimensions()
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/embeddings": {"POST": self._embeddings},
            "/v1/models": {"GET": self._list_models},
            "/health": {"GET": self._health},
            "/metrics": {"GET": self._metrics},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            status, headers, body = await self._answer(scope, receive)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _answer(self, scope: Scope, receive: Receive) -> Reply:
        path = scope["path"]
        try:
            methods = self._routes.get(path)
            if methods is None:
                raise ApiError(404, f"no such endpoint; the endpoints: {ENDPOINTS}", "not_found")
            handler = methods.get(scope["method"])
            if handler is None:
                allowed = ", ".join(methods).encode()
                raise ApiError(
                    405,
                    f"use {', '.join(methods)}",
                    "method_not_allowed",
                    None,
                    ((b"allow", allowed),),
                )
            if self._bearer is not None and path not in OPEN_PATHS:
                self._authorize(scope)
            return await handler(scope, receive)
        except ApiError as error:
            return self._error_reply(error)
        except Exception:
            logger.exception("internal error answering %s", path)
            return self._error_reply(
                ApiError(500, "internal error (logged by the server)", "internal")
            )

    def _error_reply(self, error: ApiError) -> Reply:
        self.metrics.error(error.status, error.code)
        extra = list(error.headers)
        if error.status == 413:  # the rest of the body was not read: the connection cannot go on
            extra.append((b"connection", b"close"))
        return _reply(error.status, error.body(), extra=extra)

    def _authorize(self, scope: Scope) -> None:
        assert self._bearer is not None
        for name, value in scope["headers"]:
            if name == b"authorization" and hmac.compare_digest(value, self._bearer):
                return
        raise ApiError(
            401,
            "a valid API key is required: send the header Authorization: Bearer KEY",
            "invalid_api_key",
            None,
            ((b"www-authenticate", b"Bearer"),),
        )

    # ------------------------------------------------------------------------------ routes

    async def _embeddings(self, scope: Scope, receive: Receive) -> Reply:
        metrics = self.metrics
        metrics.in_flight += 1
        try:
            body = await self._read_body(scope, receive)
            started = time.perf_counter()
            default = await self._ready_default()
            query = parse_query(body, self._models, default)
            try:
                response = await self._client.embed_batch(
                    query.client_request(self._worker_truncates)
                )
            except EmbeddingError as error:
                raise api_error(error) from None
            vectors = response.embeddings
            if query.dimensions is not None and not self._worker_truncates:
                vectors = truncate_dimensions(vectors, query.dimensions, query.normalized)
            tokens = response.usage.total_tokens
            reply = encode_reply(vectors, response.model, tokens, query.encoding_format)
            metrics.model(query.model.model).observe(
                len(query.texts),
                tokens,
                time.perf_counter() - started,
                response.usage.queue_ms / 1000.0,
            )
            return _reply(200, reply)
        finally:
            metrics.in_flight -= 1

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The request body, refused with 413 as soon as it is known to pass the limit: a
        declared length at once, a chunked body at the first chunk past it."""
        limit = self._max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise _too_large(limit)
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client went away before sending the body", "disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _list_models(self, scope: Scope, receive: Receive) -> Reply:
        await self._ready_default()
        data = [
            {
                "id": model.model,
                "object": "model",
                "created": 0,
                "owned_by": "akidb-embed",
                "dimension": model.dimension,
                "max_tokens": model.max_tokens,
                "pooling": model.pooling,
                "normalize_default": model.normalize_default,
                "prompts": list(model.prompts),
            }
            for model in self._models.values()
        ]
        return _reply(200, json_bytes({"object": "list", "data": data}))

    async def _health(self, scope: Scope, receive: Receive) -> Reply:
        if not self._started.is_set():
            return _reply(
                503, json_bytes({"status": "starting", "reason": "the workers are starting"})
            )
        if self._failure is not None:
            return _reply(503, json_bytes({"status": "failed", "reason": self._failure.message}))
        stats = self._client.stats()
        workers = [
            {
                "index": worker.index,
                "state": worker.state,
                "pid": worker.pid,
                "restarts": worker.restarts,
            }
            for worker in stats.workers
        ]
        not_ready = [
            f"worker {worker.index} is {worker.state}"
            for worker in stats.workers
            if worker.state != "ready"
        ]
        document: dict[str, Any] = {
            "status": "ok",
            "workers": workers,
            "models": list(self._models),
        }
        if not_ready:
            document.update(status="unavailable", reason="; ".join(not_ready))
            return _reply(503, json_bytes(document))
        return _reply(200, json_bytes(document))

    async def _metrics(self, scope: Scope, receive: Receive) -> Reply:
        return _reply(200, self.metrics.exposition(), CONTENT_TYPE)

    # ---------------------------------------------------------------------------- lifespan

    async def _ready_default(self) -> ModelInfo:
        """The default model once the workers are up (waiting for their start); 503 when
        they could not start."""
        if self._default is None:
            await self._started.wait()
        if self._default is None:
            reason = self._failure.message if self._failure else "the workers did not start"
            raise api_error(ServiceUnavailable(reason))
        return self._default

    async def _start_workers(self) -> None:
        try:
            await self._client.start()
            models = await self._client.models()
        except EmbeddingError as error:
            self._failure = error
            if self._on_fatal is not None:
                self._on_fatal(error)
        else:
            self._models = {model.model: model for model in models}
            self._default = models[0]
            if self._on_ready is not None:
                self._on_ready(models)
        finally:
            self._started.set()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._starting = asyncio.create_task(self._start_workers())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._client.aclose()
                if self._starting is not None:
                    await asyncio.gather(self._starting, return_exceptions=True)
                await send({"type": "lifespan.shutdown.complete"})
                return
