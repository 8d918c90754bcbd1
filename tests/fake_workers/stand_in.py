"""A stand-in worker for the supervision tests: it speaks the worker's protocol (protocol.md: a
4-byte big-endian length, then a msgpack map) with no model behind it, and misbehaves on cue.

Its "vectors" say which text they belong to: row ``i`` of an embed reply is
``[len(inputs[i]), 1, 0, 0]``, so a test can tell that every call got its own rows back in order,
whoever answered. It imports nothing of akidb_embed (msgpack only, for a fast start), so it also
checks that protocol.md's framing is all a worker needs.

    python stand_in.py --protocol 1                  serve until stdin closes (other options,
                                                     the real worker's, are ignored)
        --die-after N       answer N requests, then die by SIGKILL on reading the next one
        --hang-after N      answer N requests, then read on and answer nothing (hung)
        --exit-at-start C   write --stderr's line and exit with code C before any hello
        --no-hello          never write a hello (sleep until killed)
        --refuse CODE       write an ``ok: false`` hello with error CODE (and --stderr's line
                            as its message), then wait for stdin to close
        --max-texts N       the hello's max_texts_per_request (default 64)
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import sys
import time
from typing import Any

import msgpack

PREFIX = struct.Struct(">I")
DIMENSION = 4
MODEL = "stand-in/model"


def write(message: dict[str, Any]) -> None:
    payload = msgpack.packb(message, use_bin_type=True)
    sys.stdout.buffer.write(PREFIX.pack(len(payload)) + payload)
    sys.stdout.buffer.flush()


def read(stdin: Any) -> dict[str, Any] | None:
    header = stdin.read(PREFIX.size)
    if len(header) < PREFIX.size:
        return None
    (length,) = PREFIX.unpack(header)
    message: dict[str, Any] = msgpack.unpackb(stdin.read(length), raw=False)
    return message


def hello(protocol: int, max_texts: int) -> dict[str, Any]:
    model = {"model": MODEL, "dimension": DIMENSION, "max_tokens": 128}
    limits = {
        "max_frame_bytes": 1 << 20,
        "max_texts_per_request": max_texts,
        "max_text_bytes": 4096,
        "max_batch_tokens": 2048,
    }
    return {
        "op": "hello",
        "ok": True,
        "protocol": protocol,
        "pid": os.getpid(),
        "model": model,
        "limits": limits,
        "providers": ["none"],
        "worker_version": "stand-in",
    }


def answer(request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op != "embed":
        return {"id": request.get("id"), "ok": True}
    inputs = request["inputs"]
    rows = b"".join(struct.pack("<4f", len(text), 1.0, 0.0, 0.0) for text in inputs)
    reply = {
        "id": request["id"],
        "ok": True,
        "model": MODEL,
        "shape": [len(inputs), DIMENSION],
        "embeddings": rows,
        "usage": {"total_tokens": len(inputs), "duration_ms": 0.0},
    }
    if request.get("trace"):
        now = time.monotonic_ns()
        marks = ("read", "parsed", "tokenized", "started", "ran", "pooled")
        reply["trace"] = {**dict.fromkeys(marks, now), "encode_ns": 0}
    return reply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", type=int, required=True)
    parser.add_argument("--die-after", type=int)
    parser.add_argument("--hang-after", type=int)
    parser.add_argument("--exit-at-start", type=int)
    parser.add_argument("--no-hello", action="store_true")
    parser.add_argument("--refuse")
    parser.add_argument("--stderr", default="")
    parser.add_argument("--max-texts", type=int, default=64)
    args, _ = parser.parse_known_args()  # the real worker's options (--provider...) too
    if args.stderr:
        sys.stderr.write(args.stderr + "\n")
        sys.stderr.flush()
    if args.exit_at_start is not None:
        sys.exit(args.exit_at_start)
    if args.no_hello:
        time.sleep(3600)
    stdin = sys.stdin.buffer
    if args.refuse:
        write({"op": "hello", "ok": False, "protocol": args.protocol,
               "error": {"code": args.refuse, "message": args.stderr}})  # fmt: skip
        stdin.read()
        return
    write(hello(args.protocol, args.max_texts))
    answered = 0
    while (request := read(stdin)) is not None:
        if args.die_after is not None and answered >= args.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.hang_after is not None and answered >= args.hang_after:
            continue  # hung: reads on, answers nothing
        write(answer(request))
        answered += 1


if __name__ == "__main__":
    main()
