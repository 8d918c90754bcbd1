"""The one raw-frame client of the worker: ``python -m akidb_embed.worker`` spawned and spoken to
with nothing but ``akidb_embed.wire`` (``pack``, ``unpack``, ``FrameReader``) over its pipes, the
way any host would, with no host client in between. The tests drive the protocol through it,
and the benchmarks measure with it the floor of any bridge (the "raw frames" column of
``bench --lone`` and ``--breakdown``).

::

    RawWorker.send(message) --pack--> stdin --> worker --> stdout --FrameReader--> recv()

Replies are read one of two ways:

* collected (``collect=True``, the default): a daemon thread reads every frame as it comes into
  a queue, so that the worker never waits on a full pipe while the caller is still sending,
  and every wait has a timeout: no test hangs on a silent worker.
* on the caller's thread (``collect=False``): nothing between the pipe and the caller, as the
  benchmarks need; with a ``reply_timeout`` each read first waits for the pipe with ``select``,
  without one (``start_worker``) it is a bare read.

A worker that ends, breaks the framing or stays silent past the timeout raises ``WorkerGone``
with its exit status and stderr (kept in a file, which nobody has to drain).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from io import BufferedReader
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import numpy.typing as npt

from akidb_embed import wire
from akidb_embed.errors import ServiceUnavailable, from_wire

__all__ = [
    "REPLY_TIMEOUT",
    "START_TIMEOUT",
    "WORKER_COMMAND",
    "RawWorker",
    "WorkerGone",
    "start_worker",
]

REPLY_TIMEOUT = 120.0
"""Generous: a loaded 2-core CI machine may be slow, but a hang must still end the wait."""
START_TIMEOUT = 120.0
WORKER_COMMAND = (sys.executable, "-m", "akidb_embed.worker")
MAX_REPLY_BYTES = 1 << 30


class WorkerGone(ServiceUnavailable):
    """The worker's stdout ended or broke, or no frame came within the timeout."""


class _Timeout(Exception):
    pass


class _PipeReads:
    """The worker's stdout as ``FrameReader`` reads it: at most one system call a read (the
    reader asks for more than the pipe's buffer holds, so nothing stays buffered), after
    waiting for the pipe until ``deadline`` (``time.monotonic()``; None: a bare read)."""

    def __init__(self, stdout: IO[bytes]) -> None:
        self._read1 = cast(BufferedReader, stdout).read1
        self._fd = stdout.fileno()
        self.deadline: float | None = None

    def read(self, size: int) -> bytes:
        if self.deadline is not None:
            remaining = max(self.deadline - time.monotonic(), 0.0)
            if not select.select([self._fd], [], [], remaining)[0]:
                raise _Timeout
        return self._read1(size)


class RawWorker:
    """One real worker process, driven through raw frames on its stdin and stdout.

    ``args`` follow the worker's command (``command``, by default ``python -m
    akidb_embed.worker``); ``env`` is added to this process's environment. The hello is read
    at start (``hello``, and ``ready_seconds`` from spawn to it) unless ``read_hello`` is
    False. ``reply_timeout`` bounds every wait (None: none, with ``collect=False`` only).
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        read_hello: bool = True,
        *,
        collect: bool = True,
        reply_timeout: float | None = REPLY_TIMEOUT,
    ) -> None:
        if collect and reply_timeout is None:
            raise ValueError("collected replies are always waited for with a timeout")
        self.reply_timeout = reply_timeout
        # a file, not a pipe: nobody has to drain it for the worker to go on
        self._stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by kill/close)
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [*(command or WORKER_COMMAND), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            env={**os.environ, **(env or {})},
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin = self.process.stdin
        self._pipe = _PipeReads(self.process.stdout)
        self._reader = wire.FrameReader(cast(BinaryIO, self._pipe), MAX_REPLY_BYTES)
        self._ended: str | None = None
        """Why no more frames will come, once known: every later wait says it again."""
        self._collected: queue.Queue[bytes | None] | None = None
        if collect:
            self._collected = queue.Queue()
            threading.Thread(target=self._collect, daemon=True).start()
        self._ids = itertools.count(1)
        self.hello: dict[str, Any] = self.recv(START_TIMEOUT) if read_hello else {}
        self.ready_seconds = time.perf_counter() - started

    # -- receiving ------------------------------------------------------------------------

    def _next_frame(self) -> bytes | None:
        """The next payload from the pipe; None, with ``_ended`` set, once none will come."""
        try:
            payload = self._reader.read()
        except wire.FrameError as exc:
            self._ended = f"broken reply stream: {exc}"
            return None
        except (OSError, ValueError):  # closed by kill() while the collector waited
            self._ended = "end of stdout"
            return None
        if payload is None:
            self._ended = "end of stdout"
        return payload

    def _collect(self) -> None:
        assert self._collected is not None
        while True:
            payload = self._next_frame()
            self._collected.put(payload)
            if payload is None:
                return

    def _gone(self, reason: str) -> WorkerGone:
        return WorkerGone(f"{reason}; exit {self.process.poll()}; stderr:\n{self.stderr()}")

    def recv_payload(self, timeout: float | None = None) -> bytes:
        """The next frame's payload, exactly as the worker wrote it; ``timeout``: this wait's
        limit instead of ``reply_timeout``."""
        limit = timeout if timeout is not None else self.reply_timeout
        if self._ended is not None and (self._collected is None or self._collected.empty()):
            raise self._gone(self._ended)
        if self._collected is not None:
            try:
                payload = self._collected.get(timeout=limit)
            except queue.Empty:
                raise WorkerGone(f"no frame within {limit} s; stderr:\n{self.stderr()}") from None
        else:
            self._pipe.deadline = None if limit is None else time.monotonic() + limit
            try:
                payload = self._next_frame()
            except _Timeout:
                raise WorkerGone(f"no frame within {limit} s; stderr:\n{self.stderr()}") from None
        if payload is None:
            raise self._gone(self._ended or "end of stdout")
        return payload

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        return wire.unpack(self.recv_payload(timeout))

    def recv_many(self, count: int) -> list[dict[str, Any]]:
        return [self.recv() for _ in range(count)]

    def frames_until_end(self) -> list[dict[str, Any]]:
        """Every remaining frame until the worker closes its stdout."""
        frames = []
        while True:
            try:
                frames.append(self.recv())
            except WorkerGone as gone:
                if "end of stdout" not in str(gone):
                    raise
                return frames

    # -- sending --------------------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        self._stdin.write(data)
        self._stdin.flush()

    def send(self, *messages: dict[str, Any]) -> None:
        self.send_bytes(b"".join(wire.pack(message) for message in messages))

    def close_stdin(self) -> None:
        self._stdin.close()

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its reply (nothing else may be in flight)."""
        self.send(message)
        return self.recv()

    def embed(self, texts: Sequence[str], **fields: Any) -> npt.NDArray[Any]:
        """The vectors of ``texts`` (one embed request, ``fields`` added to it); an error reply
        raises its error."""
        reply = self.request({"id": next(self._ids), "op": "embed", "inputs": list(texts),
                              **fields})  # fmt: skip
        if reply.get("ok") is not True:
            error = reply.get("error") or {}
            raise from_wire(error.get("code"), error.get("message"), error.get("index"))
        return wire.embeddings_from_bytes(reply["embeddings"], tuple(reply["shape"]))

    def pipelined(self, batches: Sequence[Sequence[str]], depth: int) -> int:
        """Send ``batches`` as embed requests with up to ``depth`` in flight; the texts
        answered."""
        answered = in_flight = 0
        for batch in batches:
            if in_flight == depth:
                answered += self.recv()["shape"][0]
                in_flight -= 1
            self.send({"id": next(self._ids), "op": "embed", "inputs": list(batch)})
            in_flight += 1
        for _ in range(in_flight):
            answered += self.recv()["shape"][0]
        return answered

    # -- process --------------------------------------------------------------------------

    def wait(self, timeout: float = REPLY_TIMEOUT) -> int:
        return self.process.wait(timeout)

    def stderr(self) -> str:
        self._stderr_file.seek(0)
        return self._stderr_file.read().decode("utf-8", "replace")

    def close(self, timeout: float = 30.0) -> None:
        """End the worker the way a host does: close its stdin, wait for it to exit."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        self.process.wait(timeout)
        self._release()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(REPLY_TIMEOUT)
        self._release()

    def _release(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr_file.close()


def start_worker(model_dir: Path, threads: int, spin_wait: bool = False) -> RawWorker:
    """A worker of the model in ``model_dir`` with ``threads`` intra-op threads, ready to embed,
    its replies read on the caller's thread with no timeout: what the benchmarks time."""
    args = ["--model-dir", str(model_dir), "--threads", str(threads)]
    worker = RawWorker(
        [*args, *(["--spin-wait"] if spin_wait else [])], collect=False, reply_timeout=None
    )
    if worker.hello.get("ok") is not True:
        worker.kill()
        raise WorkerGone(f"the worker did not start: {worker.hello}")
    return worker
