"""The ``http`` column of ``akidb-embed bench``: ``akidb-embed serve`` in a child process, over
the same model and thread count, called as an OpenAI client calls it.

Each calling thread keeps one keep-alive connection (``http.client``) and posts OpenAI's body
with ``encoding_format: base64``, which OpenAI's SDKs ask for by default, then decodes the
vectors with numpy; so the column is the bridge plus one HTTP round trip, the server's JSON and
the caller's decoding.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["HttpServer", "missing_extra"]

START_TIMEOUT = 120.0
_HEADERS = {"Content-Type": "application/json"}
_READY = re.compile(r"ready: .* POST (http://[^ ]+):(\d+)/v1/embeddings")


def missing_extra() -> str | None:
    """Why the column cannot run here (the ``serve`` extra is not installed), or None."""
    try:
        import orjson  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return f"http column omitted: the serve extra is not installed ({exc.name})"
    return None


class HttpServer(contextlib.AbstractContextManager["HttpServer"]):
    """``akidb-embed serve --port 0`` until ``close``; ``embed`` is safe from many threads."""

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
        self._local = threading.local()

    def _drain(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self._lines.append(line)
            found = _READY.search(line)
            if found:
                self.port = int(found.group(2))
                self._ready.set()
        self._ready.set()

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        body = json.dumps({"input": list(texts), "encoding_format": "base64"})
        status, reply = self._post(body)
        if status != 200:
            raise RuntimeError(f"akidb-embed serve answered {status}: {reply}")
        rows = [base64.b64decode(item["embedding"]) for item in reply["data"]]
        return np.frombuffer(b"".join(rows), "<f4").reshape(len(rows), -1)

    def _post(self, body: str) -> tuple[int, dict[str, Any]]:
        """POST on this thread's connection; once more on a new one when the server had
        closed it (idle past its keep-alive timeout), as HTTP clients' pools do."""
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        for fresh in (connection is None, True):
            if fresh:
                if connection is not None:
                    connection.close()
                connection = self._local.connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=START_TIMEOUT
                )
            assert connection is not None
            try:
                connection.request("POST", "/v1/embeddings", body, _HEADERS)
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            except (ConnectionError, http.client.RemoteDisconnected):
                if fresh:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()  # SIGTERM: answers what is in flight, stops the workers
        self._process.wait(START_TIMEOUT)

    def __exit__(self, *exc_info: object) -> None:
        self.close()
