"""The golden frames of tests/golden/ played to a live worker: each ``<case>_request.bin`` and
the ``<case>_reply.bin`` it must get (test_worker_pure.py writes both from its messages and
checks the worker's codec against them without a worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from akidb_embed.bench.raw import RawWorker
from akidb_embed.wire import LENGTH_PREFIX, unpack

GOLDEN = Path(__file__).resolve().parent / "golden"


def send_golden_request(worker: RawWorker, case: str) -> None:
    worker.send_bytes((GOLDEN / f"{case}_request.bin").read_bytes())


def assert_golden_bytes(worker: RawWorker, case: str) -> None:
    """The worker's next reply is ``<case>_reply.bin`` to the byte."""
    payload = worker.recv_payload()
    assert LENGTH_PREFIX.pack(len(payload)) + payload == (GOLDEN / f"{case}_reply.bin").read_bytes()


def golden_reply(worker: RawWorker, case: str, same: tuple[str, ...]) -> dict[str, Any]:
    """The worker's reply to ``<case>_request.bin``, checked against ``<case>_reply.bin``: the
    same fields in the same order, the same values of ``same`` and the same token count. What
    may differ (vectors in their last bits, timings) the caller checks its own way."""
    send_golden_request(worker, case)
    reply: dict[str, Any] = worker.recv()
    expected = unpack((GOLDEN / f"{case}_reply.bin").read_bytes()[LENGTH_PREFIX.size :])
    assert list(reply) == list(expected)
    for key in same:
        assert reply[key] == expected[key], key
    assert reply["usage"]["total_tokens"] == expected["usage"]["total_tokens"]
    return reply
