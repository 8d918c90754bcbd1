"""Running ``akidb-embed serve``: the listening socket, uvicorn, signals, and the exit status.

The socket is bound here, before uvicorn starts, so that ``--port 0`` (an ephemeral port) can be
announced with the port the system chose. uvicorn (uvloop and httptools where installed, which
the ``serve`` extra installs) runs the ASGI app on one event loop in this process, each reply
leaving in one write (_protocol.py); the workers are the host client's processes.

SIGTERM or SIGINT: uvicorn stops accepting connections, answers the requests in flight, then
runs the lifespan's shutdown, which closes the client (the workers answer what they hold and
exit). uvicorn then raises the signal again, so the process ends as one stopped by it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from akidb_embed.errors import EmbeddingError
from akidb_embed.host_client import AsyncEmbeddingClient, ModelInfo
from akidb_embed.serve._app import EmbeddingsApp
from akidb_embed.serve._protocol import OneWriteHttpProtocol

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PORT",
    "ServeOptions",
    "run_server",
]

DEFAULT_HOST = "127.0.0.1"
"""Loopback only: another machine reaches the server only when ``--host`` says so."""
DEFAULT_PORT = 8081
"""Where AkiDB's HTTP embedder looks by default (``http://127.0.0.1:8081/v1/embeddings``)."""
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
"""A larger request body is refused (413) before it is read whole: 16 MiB holds thousands of
texts, far more than one request of any OpenAI client."""
API_KEY_ENV = "AKIDB_EMBED_API_KEY"
"""The environment variable read when ``--api-key`` is not given (keeps the key out of ``ps``)."""


@dataclass(frozen=True)
class ServeOptions:
    """The HTTP side of ``akidb-embed serve`` (the workers' settings are the client's)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    """When set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "warning"
    """uvicorn's log level (access logs are off: ``/metrics`` counts the requests)."""


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, reuse_port=False)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(
    client: AsyncEmbeddingClient, options: ServeOptions, announce: Callable[[str], None]
) -> int:
    """Serve until a signal; ``announce`` gets the listening line, then the ready line. Raises
    the workers' own error when they cannot start."""
    sock = _listening_socket(options.host, options.port)
    url = _url(sock)
    fatal: list[EmbeddingError] = []

    def on_ready(models: list[ModelInfo]) -> None:
        workers = client.config.workers
        ids = ", ".join(model.model for model in models)
        announce(f"ready: {workers} worker(s), models {ids}; POST {url}/v1/embeddings")

    def on_fatal(error: EmbeddingError) -> None:
        fatal.append(error)
        server.should_exit = True

    app = EmbeddingsApp(
        client,
        max_body_bytes=options.max_body_bytes,
        api_key=options.api_key,
        on_ready=on_ready,
        on_fatal=on_fatal,
    )
    config = uvicorn.Config(
        app,
        http=OneWriteHttpProtocol,
        lifespan="on",
        ws="none",
        proxy_headers=False,  # nothing reads the client's address: one wrapper less per request
        access_log=False,
        log_level=options.log_level,
        server_header=False,
    )
    server = uvicorn.Server(config)
    announce(f"listening on {url} (the workers are starting)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if fatal:
        raise fatal[0]
    return 0
