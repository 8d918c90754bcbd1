"""A real worker per test, driven through raw frames: how it starts, stops, fails and survives.

Exit codes are those of protocol.md section 8. Two tests run the worker's own entry point
under a small wrapper that patches ``Engine.run`` after the fd guard: one makes it print, write
to fd 1 and spawn a child (the stream must stay intact), one makes it raise (the requests of
that batch fail, the worker keeps serving). Everything else runs the worker unmodified.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from akidb_embed.models import METADATA_FILE, ModelMetadata
from akidb_embed.wire import LENGTH_PREFIX, FrameReader, embeddings_from_bytes, pack, unpack

EXIT_TIMEOUT = 120.0
_ids = itertools.count(1)

PATCHED_WORKER = """
import sys
import akidb_embed.worker.server as server

_serve = server.serve

def serve(config, protocol_in, protocol_out):
    from akidb_embed.worker import engine  # imported after the fd guard, as the worker does
    original_forward = engine.Engine.forward
{patch}
    engine.Engine.forward = patched_forward
    return _serve(config, protocol_in, protocol_out)

server.serve = serve
from akidb_embed.worker.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def patched_worker(patch: str) -> list[str]:
    """The command running the worker's ``main`` with ``Engine.forward`` (the ONNX Runtime run
    of a micro-batch) replaced by ``patched_forward`` as defined in ``patch`` (which may call
    ``original_forward``)."""
    script = PATCHED_WORKER.format(patch=textwrap.indent(textwrap.dedent(patch), "    "))
    return [sys.executable, "-c", script]


def embed_request(inputs: list[str], **fields: Any) -> dict[str, Any]:
    return {"id": next(_ids), "op": "embed", "inputs": inputs, **fields}


def assert_embedded(reply: dict[str, Any], dimension: int) -> np.ndarray:
    assert reply["ok"] is True, reply
    vectors = embeddings_from_bytes(reply["embeddings"], tuple(reply["shape"]))
    assert vectors.shape[1] == dimension
    return vectors


def process_is_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def mixed_requests(golden: dict[str, Any], count: int) -> list[dict[str, Any]]:
    sentences = golden["sentences"]
    return [
        embed_request([sentences[(n + k) % len(sentences)] for k in range(1 + n % 4)])
        for n in range(count)
    ]


# -- clean stops ---------------------------------------------------------------------------


def test_shutdown_answers_everything_read_then_acks_last_and_exits_0(
    spawn_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    worker = spawn_worker()
    requests = mixed_requests(golden, 30)
    shutdown_id = next(_ids)
    worker.send(*requests, {"id": shutdown_id, "op": "shutdown"})
    frames = worker.frames_until_end()
    assert frames[-1] == {"id": shutdown_id, "ok": True}
    replies = {frame["id"]: frame for frame in frames[:-1]}
    assert replies.keys() == {request["id"] for request in requests}
    for reply in replies.values():
        assert_embedded(reply, metadata.dimension)
    assert worker.wait(EXIT_TIMEOUT) == 0


def test_eof_mid_load_answers_everything_then_exits_0(
    spawn_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    # started through the console script, as a packaged host would
    worker = spawn_worker(command=[str(Path(sys.executable).parent / "akidb-embed-worker")])
    requests = mixed_requests(golden, 40)
    worker.send(*requests)
    worker.close_stdin()
    frames = worker.frames_until_end()
    assert sorted(frame["id"] for frame in frames) == sorted(r["id"] for r in requests)
    for frame in frames:
        assert_embedded(frame, metadata.dimension)
    assert worker.wait(EXIT_TIMEOUT) == 0
    assert "Traceback" not in worker.stderr()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_signal_finishes_the_requests_already_read_then_exits_0(
    spawn_worker: Any, metadata: ModelMetadata, golden: dict[str, Any], stop_signal: int
) -> None:
    worker = spawn_worker()
    requests = mixed_requests(golden, 40)
    ping_id = next(_ids)
    # the reader answers a ping as soon as it reads it: once its reply is back, every request
    # written before it has been read
    worker.send(*requests, {"id": ping_id, "op": "ping"})
    frames = []
    while not any(frame["id"] == ping_id for frame in frames):
        frames.append(worker.recv())
    worker.process.send_signal(stop_signal)
    frames += worker.frames_until_end()
    replies = {frame["id"]: frame for frame in frames if frame["id"] != ping_id}
    assert replies.keys() == {request["id"] for request in requests}
    for reply in replies.values():
        assert_embedded(reply, metadata.dimension)
    assert worker.wait(EXIT_TIMEOUT) == 0
    assert "Traceback" not in worker.stderr()


def test_after_sigterm_the_worker_reads_one_more_frame_refuses_it_and_exits_0(
    spawn_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    worker = spawn_worker()
    long_text = golden["sentences"][golden["token_counts"].index(metadata.max_tokens)]
    # seconds of work in hand, so that the worker is still finishing it when the frames below
    # arrive, even with this test's process held off the CPU a while (a loaded machine)
    held = [embed_request([long_text] * 16) for _ in range(6)]
    ping_id = next(_ids)
    worker.send(*held, {"id": ping_id, "op": "ping"})
    assert worker.recv() == {"id": ping_id, "ok": True}  # everything before it has been read
    worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while "stopping (SIGTERM)" not in worker.stderr() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "stopping (SIGTERM)" in worker.stderr()
    after = [{"id": next(_ids), "op": "ping"}, embed_request(["too late"])]
    after += [{"id": next(_ids), "op": "ping"} for _ in range(20)]
    worker.send(*after)
    frames = worker.frames_until_end()
    replies = {frame["id"]: frame for frame in frames}
    assert len(replies) == len(frames) == len(held) + 1
    for request in held:
        assert_embedded(replies[request["id"]], metadata.dimension)
    refused = replies[after[0]["id"]]  # the frame the reader was waiting for
    assert refused["ok"] is False
    assert refused["error"]["code"] == "service_unavailable"
    assert "shutting down" in refused["error"]["message"]
    assert worker.wait(EXIT_TIMEOUT) == 0
    assert "Traceback" not in worker.stderr()


def test_worker_exits_0_when_the_host_stops_reading_its_replies(metadata: ModelMetadata) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-m", "akidb_embed.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert worker.stdout is not None and worker.stdin is not None
        assert unpack(FrameReader(worker.stdout).read() or b"")["ok"] is True
        worker.stdout.close()  # stdin stays open: only the failed write can tell the worker
        worker.stdin.write(pack(embed_request(["nobody will read this"])))
        worker.stdin.flush()
        assert worker.wait(EXIT_TIMEOUT) == 0
    finally:
        worker.kill()
        worker.wait(EXIT_TIMEOUT)
        if worker.stdin is not None:
            worker.stdin.close()


def test_worker_exits_when_its_parent_dies(spawn_worker: Any) -> None:
    # The parent starts the worker on its own stdin and stdout, which are pipes of this test:
    # the worker's stdin stays open after the parent dies, so only the parent watch can end it.
    parent = spawn_worker(
        command=[
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-m', 'akidb_embed.worker'])\n"
            "time.sleep(600)\n",
        ]
    )
    worker_pid = parent.hello["pid"]
    assert worker_pid != parent.process.pid
    try:
        parent.process.send_signal(signal.SIGKILL)
        parent.wait(EXIT_TIMEOUT)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while not process_is_gone(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_is_gone(worker_pid), "the orphaned worker is still running"
    finally:
        if not process_is_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


# -- broken streams ------------------------------------------------------------------------


def test_oversized_frame_gets_a_protocol_error_and_exit_3_after_the_requests_in_flight(
    spawn_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    worker = spawn_worker("--max-frame-bytes", "100000")
    requests = mixed_requests(golden, 10)
    worker.send(*requests)
    worker.send_bytes(LENGTH_PREFIX.pack(100_001) + b"\x80" * 64)
    frames = worker.frames_until_end()
    errors = [frame for frame in frames if frame["id"] is None]
    assert len(errors) == 1
    assert errors[0]["ok"] is False
    assert errors[0]["error"]["code"] == "protocol_error"
    assert "100001" in errors[0]["error"]["message"]
    answered = sorted(frame["id"] for frame in frames if frame["id"] is not None)
    assert answered == sorted(request["id"] for request in requests)
    assert worker.wait(EXIT_TIMEOUT) == 3
    assert "Traceback" not in worker.stderr()
    assert "max_frame_bytes" in worker.stderr()


def test_stream_ending_inside_a_frame_gets_a_protocol_error_and_exit_3(
    spawn_worker: Any,
) -> None:
    worker = spawn_worker()
    worker.send_bytes(LENGTH_PREFIX.pack(100) + b"\x82\xa2id\x01")
    worker.close_stdin()
    frames = worker.frames_until_end()
    assert len(frames) == 1
    assert frames[0]["id"] is None
    assert frames[0]["error"]["code"] == "protocol_error"
    assert "5 of 100" in frames[0]["error"]["message"]
    assert worker.wait(EXIT_TIMEOUT) == 3
    assert "Traceback" not in worker.stderr()


def test_stream_ending_inside_a_length_prefix_gets_a_protocol_error_and_exit_3(
    spawn_worker: Any,
) -> None:
    worker = spawn_worker()
    worker.send({"id": 1, "op": "ping"})
    worker.send_bytes(b"\x00\x00")
    worker.close_stdin()
    frames = worker.frames_until_end()
    assert frames[0] == {"id": 1, "ok": True}
    assert frames[1]["id"] is None
    assert frames[1]["error"]["code"] == "protocol_error"
    assert len(frames) == 2
    assert worker.wait(EXIT_TIMEOUT) == 3
    assert "Traceback" not in worker.stderr()


# -- failures inside the worker ------------------------------------------------------------


def test_stray_output_inside_the_worker_cannot_corrupt_the_stream(
    spawn_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    # Each ONNX Runtime run prints, writes to fd 1 as a C library would, and runs a child that
    # writes to its stdout and reads its stdin (`cat`): with the guard, all of it lands on
    # stderr and `cat` reads /dev/null; without it, the frames would be corrupted and `cat`
    # would swallow requests.
    worker = spawn_worker(
        command=patched_worker(
            """
            def patched_forward(self, token_ids):
                import os, subprocess
                print("stray print() output")
                os.write(1, b"stray write to fd 1\\n")
                subprocess.run(["sh", "-c", "echo stray child output; cat"], timeout=60, check=True)
                return original_forward(self, token_ids)
            """
        )
    )
    assert worker.hello["ok"] is True
    requests = mixed_requests(golden, 5)
    worker.send(*requests)
    replies = {reply["id"]: reply for reply in worker.recv_many(len(requests))}
    expected = np.asarray(golden["embeddings"], dtype=np.float32)
    for request in requests:
        vectors = assert_embedded(replies[request["id"]], metadata.dimension)
        picks = [golden["sentences"].index(text) for text in request["inputs"]]
        assert np.allclose(vectors, expected[picks], atol=1e-4)
    ping = {"id": next(_ids), "op": "ping"}
    assert worker.request(ping) == {"id": ping["id"], "ok": True}
    stderr = worker.stderr()
    for stray in ("stray print() output", "stray write to fd 1", "stray child output"):
        assert stray in stderr


def test_failed_batch_fails_its_requests_and_the_worker_keeps_serving(
    spawn_worker: Any, metadata: ModelMetadata
) -> None:
    worker = spawn_worker(
        command=patched_worker(
            """
            def patched_forward(self, token_ids):
                if any(len(ids) > 40 for ids in token_ids):
                    raise RuntimeError("injected failure for a long text")
                return original_forward(self, token_ids)
            """
        )
    )
    long_text = "a fairly long sentence about nothing in particular " * 10
    # the three requests fit one micro-batch; after its failure each is retried apart
    long_only = embed_request([long_text])
    short_only = embed_request(["short text"])
    mixed = embed_request(["another short text", long_text])
    worker.send(long_only, short_only, mixed)
    replies = {reply["id"]: reply for reply in worker.recv_many(3)}
    for failed in (long_only, mixed):
        assert replies[failed["id"]]["ok"] is False
        assert replies[failed["id"]]["error"]["code"] == "internal"
        assert "injected failure" in replies[failed["id"]]["error"]["message"]
    assert_embedded(replies[short_only["id"]], metadata.dimension)
    health = worker.request({"id": 77, "op": "health"})
    assert health["ok"] is True
    assert worker.process.poll() is None


# -- small budgets: splitting, a text over the budget alone, backpressure -------------------


def test_small_budgets_still_serve_everything(
    spawn_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    worker = spawn_worker("--max-batch-tokens", "64", "--max-pending-texts", "8")
    assert worker.hello["limits"]["max_batch_tokens"] == 64
    assert worker.hello["limits"]["max_pending_texts"] == 8
    expected = np.asarray(golden["embeddings"], dtype=np.float32)
    longest = int(np.argmax(golden["token_counts"]))
    assert golden["token_counts"][longest] > 64  # runs alone, over the budget
    requests = mixed_requests(golden, 30)  # many more texts than max_pending_texts
    big = embed_request(golden["sentences"] * 2)  # one request above max_pending_texts
    alone = embed_request([golden["sentences"][longest]])
    worker.send(*requests, big, alone)
    replies = {reply["id"]: reply for reply in worker.recv_many(len(requests) + 2)}
    for request in [*requests, big, alone]:
        vectors = assert_embedded(replies[request["id"]], metadata.dimension)
        picks = [golden["sentences"].index(text) for text in request["inputs"]]
        assert np.allclose(vectors, expected[picks], atol=1e-4)


# -- start-up failures ---------------------------------------------------------------------


def test_missing_model_directory_fails_the_hello_with_model_not_found_and_exit_4(
    spawn_worker: Any, tmp_path: Path
) -> None:
    worker = spawn_worker("--model-dir", str(tmp_path / "nowhere"))
    assert worker.hello["ok"] is False
    assert worker.hello["protocol"] == 1
    assert worker.hello["error"]["code"] == "model_not_found"
    assert "make models" in worker.hello["error"]["message"]
    assert worker.frames_until_end() == []
    assert worker.wait(EXIT_TIMEOUT) == 4


def test_corrupt_model_file_fails_the_hello_with_model_not_found_and_exit_4(
    spawn_worker: Any, metadata: ModelMetadata, tmp_path: Path
) -> None:
    document = json.loads(metadata.path(METADATA_FILE).read_text())
    document["files"] = {}  # the size check would catch our garbage before onnxruntime does
    (tmp_path / METADATA_FILE).write_text(json.dumps(document))
    shutil.copy(metadata.path("tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "model.onnx").write_bytes(b"this is not an onnx model")
    worker = spawn_worker("--model-dir", str(tmp_path))
    assert worker.hello["ok"] is False
    assert worker.hello["error"]["code"] == "model_not_found"
    assert "model.onnx" in worker.hello["error"]["message"]
    assert worker.wait(EXIT_TIMEOUT) == 4
    assert "Traceback" not in worker.stderr()


def test_unavailable_provider_fails_the_hello_with_service_unavailable_and_exit_5(
    spawn_worker: Any,
) -> None:
    # a real refusal: the CPU-only onnxruntime installed here has no CUDA provider
    worker = spawn_worker("--provider", "cuda")
    assert worker.hello["ok"] is False
    assert worker.hello["error"]["code"] == "service_unavailable"
    assert "CPUExecutionProvider" in worker.hello["error"]["message"]
    assert worker.wait(EXIT_TIMEOUT) == 5


def test_bad_arguments_exit_2_without_a_hello(spawn_worker: Any) -> None:
    worker = spawn_worker("--threads", "-1", read_hello=False)
    assert worker.frames_until_end() == []
    assert worker.wait(EXIT_TIMEOUT) == 2
    assert "--threads" in worker.stderr()


def test_missing_dependency_fails_the_hello_with_service_unavailable_and_exit_5(
    spawn_worker: Any, tmp_path: Path
) -> None:
    # a module named onnxruntime that fails to import, first on the path: as if not installed
    (tmp_path / "onnxruntime.py").write_text("raise ImportError('onnxruntime is not installed')\n")
    worker = spawn_worker(env={"PYTHONPATH": str(tmp_path)})
    assert worker.hello["ok"] is False
    assert worker.hello["error"]["code"] == "service_unavailable"
    assert "onnxruntime is not installed" in worker.hello["error"]["message"]
    assert worker.wait(EXIT_TIMEOUT) == 5
    assert "Traceback" not in worker.stderr()
