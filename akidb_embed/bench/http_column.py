"""The ``http`` columns of ``akidb-embed bench``: ``akidb-embed serve`` in a child process, over
the same model and thread count, called with OpenAI's body.

Each calling thread keeps one keep-alive connection and posts ``{"input": [...],
"encoding_format": "base64"}`` (what OpenAI's SDKs ask for by default), then decodes the vectors
with numpy. Two callers take turns on the same server:

``http``         ``LeanCaller``: the request written whole, the reply read by its Content-Length,
                 as HTTP load generators (wrk, ab, hey) call a server: the column is the server's
                 cost (one HTTP round trip, its JSON, the bridge behind it) with the least of the
                 caller's own.
``http.client``  ``StdlibCaller``: Python's ``http.client``, what a plain Python program pays. It
                 parses every reply's headers with the ``email`` package: on the 2-core VM that
                 alone put 0.3 ms on a lone query, more than the server's own Python.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["HttpServer", "LeanCaller", "StdlibCaller", "missing_extra"]

START_TIMEOUT = 120.0
_HEADERS = {"Content-Type": "application/json"}
_READY = re.compile(r"ready: .* POST (http://[^ ]+):(\d+)/v1/embeddings")


def missing_extra() -> str | None:
    """Why the columns cannot run here (the ``serve`` extra is not installed), or None."""
    try:
        import orjson  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return f"http columns omitted: the serve extra is not installed ({exc.name})"
    return None


class HttpServer(contextlib.AbstractContextManager["HttpServer"]):
    """``akidb-embed serve --port 0`` until ``close``; its callers connect to ``port``."""

    def __init__(self, model_dir: Path, provider: str, threads: int) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "akidb_embed.cli", "serve", "--port", "0",
             "--model-dir", str(model_dir), "--provider", provider, "--threads", str(threads)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self._ready = threading.Event()
        self.port = 0
        self._lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT) or not self.port:
            self.close()
            raise RuntimeError("akidb-embed serve did not start:\n" + "".join(self._lines))

    def _drain(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self._lines.append(line)
            found = _READY.search(line)
            if found:
                self.port = int(found.group(2))
                self._ready.set()
        self._ready.set()

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()  # SIGTERM: answers what is in flight, stops the workers
        self._process.wait(START_TIMEOUT)

    def __exit__(self, *exc_info: object) -> None:
        self.close()


Post = Callable[[bytes], tuple[int, bytes]]
"""One POST of a body to /v1/embeddings on the calling thread's connection: status, reply."""
Connection = tuple[Post, Callable[[], None]]
"""A connection's ``post``, and what closes it."""


class _Caller:
    """Embeds through the server on ``port`` from any thread, each thread on its own
    connection, made again once when the server had closed it (idle past its keep-alive
    timeout)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._local = threading.local()

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        body = json.dumps({"input": list(texts), "encoding_format": "base64"}).encode()
        status, raw = self._post(body)
        if status != 200:
            raise RuntimeError(f"akidb-embed serve answered {status}: {raw[:500]!r}")
        reply: dict[str, Any] = json.loads(raw)
        rows = [base64.b64decode(item["embedding"]) for item in reply["data"]]
        return np.frombuffer(b"".join(rows), "<f4").reshape(len(rows), -1)

    def _post(self, body: bytes) -> tuple[int, bytes]:
        connection: Connection | None = getattr(self._local, "connection", None)
        for fresh in (connection is None, True):
            if fresh:
                if connection is not None:
                    connection[1]()
                connection = self._local.connection = self._connect()
            assert connection is not None
            try:
                return connection[0](body)
            except (ConnectionError, http.client.RemoteDisconnected):
                if fresh:
                    raise
        raise AssertionError("unreachable")

    def _connect(self) -> Connection:
        raise NotImplementedError


class StdlibCaller(_Caller):
    """Python's ``http.client``."""

    def _connect(self) -> Connection:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=START_TIMEOUT)

        def post(body: bytes) -> tuple[int, bytes]:
            connection.request("POST", "/v1/embeddings", body, _HEADERS)
            response = connection.getresponse()
            return response.status, response.read()

        return post, connection.close


_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


class LeanCaller(_Caller):
    """HTTP/1.1 as a load generator speaks it: one write of the request, the reply's head read
    up to its blank line and its body by Content-Length (which the server always sends)."""

    def _connect(self) -> Connection:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=START_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        pending = bytearray()  # read past the reply: nothing, as one request is out at a time

        def receive() -> None:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            pending.extend(chunk)

        def post(body: bytes) -> tuple[int, bytes]:
            sock.sendall(b"%s%d\r\n\r\n%s" % (head, len(body), body))
            while (end := pending.find(b"\r\n\r\n")) < 0:
                receive()
            reply_head = bytes(pending[: end + 2])
            status, length = _STATUS.match(reply_head), _LENGTH.search(reply_head)
            if status is None or length is None:
                raise RuntimeError(f"not a reply with a Content-Length: {reply_head!r}")
            stop = end + 4 + int(length[1])
            while len(pending) < stop:
                receive()
            reply = bytes(pending[end + 4 : stop])
            del pending[:stop]
            return int(status[1]), reply

        return post, sock.close
