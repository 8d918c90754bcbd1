"""A fake worker for the Rust client's supervision tests (host_client/rust/src/
supervision_tests.rs): it speaks the wire's framing and hello (protocol.md sections 2 and 3)
but loads no model, and behaves as its one argument says:

    serves            hello, then answers every request with {"id": id, "ok": true}
    exits-at-start    a line on stderr, then exit status 3, before any hello
    writes-no-hello   starts and says nothing
    refuses-to-start  a failed hello (ok: false, code model_not_found)
    dies-after-hello  hello, then exit status 1
    dies-on-request   hello, then exit status 1 on reading its first request
    answers-garbage   hello, then a frame that is no msgpack map for its first request
    closes-its-stdin  closes its stdin, then hello, and stays (writes to it fail)
    hangs-on-request  hello, then reads every request and answers none, and stays after the
                      end of its stdin too (a worker stuck in its model)

Any other worker that reads its stdin to the end exits 0, as the real one does on a graceful
close.
Only the standard library and msgpack (a dependency of akidb-embed) are imported, so it starts
in a few tens of milliseconds.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from typing import Any, BinaryIO

import msgpack

DIMENSION = 4
LIMITS = {
    "max_frame_bytes": 16 * 1024 * 1024,
    "max_texts_per_request": 256,
    "max_text_bytes": 65536,
    "max_batch_tokens": 8192,
    "max_pending_texts": 4096,
}


def write_frame(stdout: BinaryIO, message: dict[str, Any]) -> None:
    payload = msgpack.packb(message, use_bin_type=True)
    stdout.write(struct.pack(">I", len(payload)) + payload)
    stdout.flush()


def read_frame(stdin: BinaryIO) -> dict[str, Any] | None:
    """The next request, or None at the end of stdin."""
    prefix = stdin.read(4)
    if len(prefix) < 4:
        return None
    (length,) = struct.unpack(">I", prefix)
    request: dict[str, Any] = msgpack.unpackb(stdin.read(length), raw=False)
    return request


def hello() -> dict[str, Any]:
    model = {"model": "fake/rust-supervised-worker", "dimension": DIMENSION, "max_tokens": 16}
    return {
        "op": "hello",
        "ok": True,
        "protocol": 1,
        "pid": os.getpid(),
        "model": model,
        "normalize_default": True,
        "limits": LIMITS,
    }


def main(behaviour: str) -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    if behaviour == "exits-at-start":
        sys.stderr.write("fake worker: cannot start\n")
        return 3
    if behaviour == "writes-no-hello":
        time.sleep(3600)
        return 0
    if behaviour == "refuses-to-start":
        error = {"code": "model_not_found", "message": "fake worker: no model here"}
        write_frame(stdout, {"op": "hello", "ok": False, "protocol": 1, "error": error})
        return 4
    if behaviour == "closes-its-stdin":
        # before the hello, so that no request reaches the pipe first (sys.stdin's close would
        # leave fd 0 open)
        os.close(stdin.fileno())
        write_frame(stdout, hello())
        time.sleep(3600)
        return 0
    write_frame(stdout, hello())
    if behaviour == "dies-after-hello":
        return 1
    while (request := read_frame(stdin)) is not None:
        if behaviour == "dies-on-request":
            sys.stderr.write(f"fake worker: dying on request {request['id']}\n")
            return 1
        if behaviour == "answers-garbage":
            stdout.write(struct.pack(">I", 1) + b"\xc1")  # 0xc1: no msgpack value
            stdout.flush()
        if behaviour == "serves":
            write_frame(stdout, {"id": request["id"], "ok": True})
    if behaviour == "hangs-on-request":
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
