"""Shared fixtures: the provisioned model and a raw-frame harness around a real worker process.

``RawWorker`` speaks to ``python -m akidb_embed.worker`` with nothing but ``wire.pack``,
``wire.unpack`` and ``wire.FrameReader`` over the process's pipes, the way any host would. A
background thread collects reply frames so that every wait has a timeout and no test can hang
on a silent worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from akidb_embed.models import ModelMetadata, default_model_dir, load_metadata
from akidb_embed.wire import FrameError, FrameReader, pack, unpack

REPLY_TIMEOUT = 120.0
"""Generous: a loaded 2-core CI machine may be slow, but a hang must still end the test."""
START_TIMEOUT = 120.0
WORKER_COMMAND = (sys.executable, "-m", "akidb_embed.worker")


@pytest.fixture(scope="session")
def metadata() -> ModelMetadata:
    """The provisioned default model; its absence is a set-up error, not a skip."""
    try:
        return load_metadata(default_model_dir())
    except Exception as exc:
        pytest.fail(f"no provisioned model ({exc}); run `make models`", pytrace=False)


@pytest.fixture(scope="session")
def golden(metadata: ModelMetadata) -> dict[str, Any]:
    """Reference texts and vectors computed by the exporting framework (golden.json)."""
    loaded: dict[str, Any] = json.loads(metadata.path("golden.json").read_text(encoding="utf-8"))
    return loaded


class WorkerGone(AssertionError):
    """The worker's stdout ended, or no frame came within the timeout."""


class _End:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class RawWorker:
    """One real worker process, driven through raw frames on its stdin and stdout."""

    def __init__(
        self,
        args: Sequence[str] = (),
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        read_hello: bool = True,
    ) -> None:
        # a file, not a pipe: nobody has to drain it for the worker to go on
        self._stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by kill())
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            [*(command or WORKER_COMMAND), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            env={**os.environ, **(env or {})},
        )
        self._frames: queue.Queue[bytes | _End] = queue.Queue()
        threading.Thread(target=self._collect, daemon=True).start()
        self.hello: dict[str, Any] = self.recv(START_TIMEOUT) if read_hello else {}

    def _collect(self) -> None:
        assert self.process.stdout is not None
        reader = FrameReader(self.process.stdout, max_frame_bytes=1 << 30)
        while True:
            try:
                payload = reader.read()
            except FrameError as exc:
                self._frames.put(_End(f"broken reply stream: {exc}"))
                return
            if payload is None:
                self._frames.put(_End("end of stdout"))
                return
            self._frames.put(payload)

    # -- sending --------------------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send(self, *messages: dict[str, Any]) -> None:
        self.send_bytes(b"".join(pack(message) for message in messages))

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    # -- receiving ------------------------------------------------------------------------

    def recv_payload(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """The next frame's payload, exactly as the worker wrote it."""
        try:
            frame = self._frames.get(timeout=timeout)
        except queue.Empty:
            raise WorkerGone(f"no frame within {timeout} s; stderr:\n{self.stderr()}") from None
        if isinstance(frame, _End):
            self._frames.put(frame)  # later calls see the end too
            raise WorkerGone(
                f"{frame.reason}; exit {self.process.poll()}; stderr:\n{self.stderr()}"
            )
        return frame

    def recv(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        return unpack(self.recv_payload(timeout))

    def recv_many(self, count: int) -> list[dict[str, Any]]:
        return [self.recv() for _ in range(count)]

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its reply (nothing else may be in flight)."""
        self.send(message)
        return self.recv()

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

    # -- process --------------------------------------------------------------------------

    def wait(self, timeout: float = REPLY_TIMEOUT) -> int:
        return self.process.wait(timeout)

    def stderr(self) -> str:
        self._stderr_file.seek(0)
        return self._stderr_file.read().decode("utf-8", "replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(REPLY_TIMEOUT)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr_file.close()


@pytest.fixture
def spawn_worker() -> Iterator[Any]:
    """A factory of ``RawWorker``s, all killed at the end of the test whatever happened."""
    workers: list[RawWorker] = []

    def spawn(*args: str, **kwargs: Any) -> RawWorker:
        worker = RawWorker(args, **kwargs)
        workers.append(worker)
        return worker

    yield spawn
    for worker in workers:
        worker.kill()


@pytest.fixture(scope="module")
def shared_worker(metadata: ModelMetadata) -> Iterator[RawWorker]:
    """One worker with default settings shared by a module's tests (start-up costs ~1 s)."""
    worker = RawWorker()
    yield worker
    worker.kill()


def _run_shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder shared by every process of this run: under pytest-xdist the processes' own
    temporary folders are siblings, so it sits beside them; else it is this process's own."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp(name)
    shared = tmp_path_factory.getbasetemp().parent / name
    shared.mkdir(exist_ok=True)
    return shared


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Held by one process of the run at a time."""
    import fcntl

    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelMetadata]:
    """Every served tiny random-weight model of ``st_fixtures``, built and provisioned through
    the real provisioning (export, parity gate in every mode): its metadata by fixture name.
    The model id recorded is the fixture's name. Built once per run: the other processes of a
    parallel run find the directories provisioned (and verified) by the first."""
    from st_fixtures import FIXTURES

    from akidb_embed.models.provision import provision

    root = _run_shared_dir(tmp_path_factory, "tiny-models")
    built = root / "built"
    provisioned = {}
    with _exclusive(root / "build.lock"):
        for name, spec in FIXTURES.items():
            if spec.refused is not None:
                continue
            source = root / "sources" / name
            if not built.exists():
                spec.build(source)
            result = provision(
                root / "models" / name, source_dir=source, model_id=name, log=lambda message: None
            )
            provisioned[name] = result.metadata
        built.touch()
    return provisioned
