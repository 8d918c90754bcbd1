"""One worker process: spawn it, read its hello, and move its frames and stderr lines; and the
``Spawner`` seam through which a worker slot says what to spawn.

::

    slot ──send(frame)──► the caller's own non-blocking write ──► stdin ─┐
                   │ (pipe full, or frames already waiting)              │
                   └──► backlog ──► writer thread (waits until writable) ┤
                                                                         ▼
                                                       python -m akidb_embed.worker
                                                                         │
    slot ◄─on_frame(msg)── reader thread ◄── FrameReader ◄── stdout ◄────┘
    logger "akidb_embed.worker" + recent lines ◄── stderr thread ◄── stderr

The caller writes its own frame when nothing is waiting to be written: a lone request reaches
the worker without a hand-over to another thread. stdin is non-blocking, so a worker that stops
reading never blocks a caller: what the pipe does not take goes to the backlog, which the writer
thread alone drains, in order (a frame is never interleaved with another). The reader alone
reads stdout (so the worker can always write its replies), and stderr is drained all the time (a
full stderr pipe would block the worker).

When stdout ends (the worker exited, crashed or was killed) or turns to garbage, the reader
reaps the process (no zombie), lets stderr finish so its last lines explain the exit, stops
the writer, and reports the exit exactly once through ``on_exit``. A worker that ends before
its hello fails ``hello`` with ``ServiceUnavailable`` carrying its exit status and last stderr
lines. Until a worker is ready its error lines are logged at DEBUG: why it could not start
reaches the caller once, as the start's error.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Protocol, cast

from akidb_embed import wire
from akidb_embed.errors import EmbeddingError, ServiceUnavailable
from akidb_embed.host_client._config import ClientConfig

__all__ = ["CommandSpawner", "Spawner", "WorkerCommand", "WorkerProcess", "describe_returncode"]

worker_logger = logging.getLogger("akidb_embed.worker")
"""Where every line the worker writes to stderr ends up (it logs there, and only there)."""

logger = logging.getLogger("akidb_embed.host_client")

STDERR_LINES_KEPT = 40
"""Recent stderr lines kept per worker to explain a failed start or a crash."""
REAP_TIMEOUT = 5.0
"""How long a worker whose stdout ended may take to exit before it is killed."""
STDERR_DRAIN_TIMEOUT = 2.0
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}


@dataclass(frozen=True)
class WorkerCommand:
    """What one worker process is started as: its argv and its whole environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str]


class Spawner(Protocol):
    """How a worker slot starts its workers: the command of each spawn, asked once per spawn
    (the first one and every restart). The default (``CommandSpawner``) runs the client's
    ``worker_command``; a test passes one that runs misbehaving stand-ins."""

    def command(self, slot: int) -> WorkerCommand:
        """The command of the next worker of slot ``slot`` (0 to ``workers - 1``)."""
        ...


class CommandSpawner:
    """Every spawn runs the configured worker command (``ClientConfig.worker_argv``) in the
    configured environment."""

    def __init__(self, config: ClientConfig) -> None:
        self._config = config

    def command(self, slot: int) -> WorkerCommand:
        return WorkerCommand(tuple(self._config.worker_argv()), self._config.worker_env())


def describe_returncode(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class WorkerProcess:
    """One spawned worker and the three threads that serve its pipes.

    ``on_frame(worker, message)`` gets every frame after the hello, in the reader thread.
    ``on_exit(worker)`` is called once, in the reader thread, after the process was reaped;
    ``exit_description`` is set before it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        on_frame: Callable[[WorkerProcess, dict[str, Any]], None],
        on_exit: Callable[[WorkerProcess], None],
    ) -> None:
        self.argv = list(argv)
        self.hello: Future[dict[str, Any]] = Future()
        self.exit_description: str | None = None
        """How the process ended ("was killed by SIGKILL"); ``None`` while it runs."""
        self.kill_reason: str | None = None
        """Why the client killed it, if it did (set before the kill)."""
        self.hung = False
        """Killed for answering nothing for ``request_timeout`` (its requests timed out)."""
        self.ready_at: float | None = None
        self.last_reply_at = 0.0
        self.mark_frames = False
        """Whether the reader notes ``frame_marks`` for every frame (the client's trace)."""
        self.frame_marks = (0, 0)
        """``time.monotonic_ns()`` when the frame being handed to ``on_frame`` was read whole
        off the pipe, and when it was decoded."""
        self._env = dict(env)
        self._on_frame = on_frame
        self._on_exit = on_exit
        self._write_lock = threading.Condition()
        self._backlog: collections.deque[memoryview] = collections.deque()
        """Frames (or the rest of one) the pipe did not take at once; the writer drains it."""
        self._input_closed = False
        """No frame is accepted any more; the writer closes stdin once the backlog is out."""
        self._stdin_fd = -1
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._exited = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._frame_reader: wire.FrameReader | None = None
        self._threads: list[threading.Thread] = []

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    def start(self) -> None:
        """Spawn the process and its threads; ``ServiceUnavailable`` if it cannot be spawned."""
        try:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                close_fds=True,
                # Its own session: a terminal's Ctrl-C reaches the host, which then closes the
                # worker in order, instead of killing the worker under it. The worker still
                # exits when its parent dies (protocol.md section 6), so it cannot be orphaned.
                start_new_session=True,
            )
        except OSError as exc:
            self.exit_description = f"could not be started: {exc}"
            self._exited.set()
            raise ServiceUnavailable(f"cannot start the worker {self.argv!r}: {exc}") from None
        self._frame_reader = wire.FrameReader(_stream(self._process.stdout))
        self._stdin_fd = _stream(self._process.stdin).fileno()
        os.set_blocking(self._stdin_fd, False)
        name = f"akidb-embed-worker-{self._process.pid}"
        self._threads = [
            threading.Thread(target=self._drain_stderr, name=f"{name}-stderr", daemon=True),
            threading.Thread(target=self._write_frames, name=f"{name}-writer", daemon=True),
            threading.Thread(target=self._read_frames, name=f"{name}-reader", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def accept_replies_up_to(self, max_reply_bytes: int) -> None:
        if self._frame_reader is not None:
            self._frame_reader.max_frame_bytes = max_reply_bytes

    def send(self, frame: bytes) -> None:
        """Write one whole frame now if the pipe takes it, else queue it for the writer thread;
        never blocks."""
        with self._write_lock:
            if self._input_closed:
                return  # the worker is being stopped or is gone: the reader reports its end
            rest = memoryview(frame)
            if not self._backlog:
                try:
                    rest = rest[os.write(self._stdin_fd, rest) :]
                except BlockingIOError:
                    pass
                except OSError:
                    return  # the worker is gone (broken pipe): the reader sees EOF
                if not rest:
                    return
            self._backlog.append(rest)
            self._write_lock.notify()

    def close_input(self) -> None:
        """Close stdin once the queued frames are written: the worker answers what it has read
        and exits (protocol.md section 6)."""
        with self._write_lock:
            self._input_closed = True
            self._write_lock.notify()

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL (it also ends a stopped process); the reader then reports the exit."""
        if reason is not None and self.kill_reason is None:
            self.kill_reason = reason
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(OSError):  # already gone: the reader reports it
                process.kill()

    def wait_exited(self, timeout: float | None) -> bool:
        """Whether the process was reaped and reported within ``timeout`` seconds."""
        return self._exited.wait(timeout)

    def join_threads(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.0))

    def stderr_tail(self, lines: int = 10) -> str:
        """The last ``lines`` lines the worker wrote to stderr, oldest first."""
        recent = list(self._stderr_tail)[-lines:]
        return "\n".join(recent)

    def describe(self) -> str:
        """'worker 4242 was killed by SIGKILL' and the like."""
        state = self.exit_description or "is running"
        return f"worker {self.pid} {state}"

    def _read_frames(self) -> None:
        assert self._process is not None and self._frame_reader is not None
        problem: str | None = None
        hello_read = False
        try:
            while True:
                payload = self._frame_reader.read()
                if payload is None:
                    break
                read_at = time.monotonic_ns() if self.mark_frames else 0
                try:
                    message = wire.unpack(payload)
                except wire.MalformedMessage as exc:
                    # Still in step (the frame was delimited): report it and read on.
                    logger.error("worker %s sent a malformed frame: %s", self.pid, exc)
                    continue
                if read_at:
                    self.frame_marks = (read_at, time.monotonic_ns())
                if not hello_read:
                    hello_read = True
                    self.hello.set_result(message)
                    continue
                try:
                    self._on_frame(self, message)
                except Exception:  # a bug in the client must not stop the reader
                    logger.exception("handling a frame from worker %s failed", self.pid)
        except wire.FrameError as exc:
            problem = f"broken stream from the worker: {exc}"
        except OSError as exc:
            problem = f"reading the worker's stdout failed: {exc}"
        finally:
            if problem is not None:
                logger.error("worker %s: %s", self.pid, problem)
                self.kill(problem)
            self._reap()

    def _reap(self) -> None:
        assert self._process is not None
        try:
            self._process.wait(REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # stdout closed yet still alive: it cannot serve any more; make sure it ends.
            self.kill("closed its stdout without exiting")
            self._process.wait()
        self._threads[0].join(STDERR_DRAIN_TIMEOUT)  # its last words explain the exit
        self.exit_description = describe_returncode(self._process.returncode)
        if self.kill_reason is not None:
            self.exit_description += f" ({self.kill_reason})"
        with self._write_lock:  # the writer may be waiting for a frame that will never come
            self._input_closed = True
            self._backlog.clear()
            self._write_lock.notify()
        for stream in (self._process.stdout, self._process.stderr):
            if stream is not None:
                stream.close()
        if not self.hello.done():
            tail = self.stderr_tail()
            reason = f"; its stderr ends with:\n{tail}" if tail else " and wrote nothing to stderr"
            self.hello.set_exception(
                ServiceUnavailable(
                    f"worker {self.pid} {self.exit_description} before its hello{reason}"
                )
            )
        self._exited.set()
        try:
            self._on_exit(self)
        except Exception:
            logger.exception("handling the exit of worker %s failed", self.pid)

    def _write_frames(self) -> None:
        """Drain the backlog in order, waiting for the pipe to be writable; close stdin at the
        end."""
        assert self._process is not None
        fd = self._stdin_fd
        writable = select.poll()  # poll, not select: a host may hold more than 1024 fds
        writable.register(fd, select.POLLOUT)
        try:
            while True:
                with self._write_lock:
                    while not self._backlog and not self._input_closed:
                        self._write_lock.wait()
                    if not self._backlog:
                        break  # closed, and everything before that was written
                writable.poll()  # the lock is free meanwhile: send() only appends
                with self._write_lock:
                    if not self._backlog:
                        continue  # cleared: the process is gone
                    head = self._backlog[0]
                    try:
                        written = os.write(fd, head)
                    except BlockingIOError:
                        continue
                    if written == len(head):
                        self._backlog.popleft()
                    else:
                        self._backlog[0] = head[written:]
        except (OSError, ValueError):
            pass  # the worker is gone (broken pipe): the reader sees EOF and reports it
        finally:
            with self._write_lock:
                self._input_closed = True
                self._backlog.clear()
            with contextlib.suppress(OSError, ValueError):
                _stream(self._process.stdin).close()

    def _drain_stderr(self) -> None:
        assert self._process is not None
        stderr = _stream(self._process.stderr)
        pid = self._process.pid
        try:
            for raw in stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                self._stderr_tail.append(line)
                level = _level_of(line)
                if self.ready_at is None and level >= logging.ERROR:
                    # why it cannot start: the caller gets that as the start's error; here it
                    # is kept for a host that captures debug logs
                    level = logging.DEBUG
                if f"[{pid}]" in line:  # the worker's own log format names its pid already
                    worker_logger.log(level, "%s", line)
                else:
                    worker_logger.log(level, "[worker %d] %s", pid, line)
        except (OSError, ValueError):
            pass  # closed under us after the process was reaped


def _level_of(line: str) -> int:
    """The logging level a worker line announces ("WARNING ...", "[ERROR] ..."), else INFO."""
    for word in line.replace("[", " ").replace("]", " ").replace(":", " ").split()[:4]:
        level = _LEVELS.get(word.upper())
        if level is not None:
            return level
    if line.startswith("Traceback"):
        return logging.ERROR
    return logging.INFO


def _stream(stream: IO[bytes] | None) -> BinaryIO:
    if stream is None:  # cannot happen with PIPE; keeps the types honest
        raise EmbeddingError("worker pipe missing")
    return cast(BinaryIO, stream)
