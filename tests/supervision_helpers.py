"""Helpers of the tests that call a client from many threads, and kill, stop and restart its
workers (test_host_client.py, test_host_client_supervision.py, test_pool.py,
test_host_client_stand_ins.py, test_serve.py): texts, the vector check, callers on threads, a
call left waiting, a close under load, waiting and reaping."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from akidb_embed.host_client import EmbeddingClient, ServiceUnavailable

MIN_COSINE = 0.99999
GUARD_TIMEOUT = 300.0
"""Only a guard against a hang; no test measures time."""

TOPICS = ("cats", "interest rates", "guitars", "vector search", "the weather", "rust", "tea")


def sentences(count: int) -> list[str]:
    return [
        f"Sentence {index} is about {TOPICS[index % len(TOPICS)]} and number {index * 7 % 31}."
        for index in range(count)
    ]


def min_cosine(actual: npt.NDArray[np.float32], expected: npt.NDArray[np.float32]) -> float:
    dots = np.sum(actual.astype(np.float64) * expected, axis=1)
    norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    return float(np.min(dots / norms))


def call_in_background(
    embed: Callable[[list[str]], Any], failure: type[BaseException]
) -> tuple[threading.Thread, list[BaseException]]:
    """``embed(["never answered"])`` on a started thread; the ``failure`` it raises is appended
    to the returned list (any other outcome leaves the list empty)."""
    outcome: list[BaseException] = []

    def caller() -> None:
        try:
            embed(["never answered"])
        except failure as exc:
            outcome.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    return thread, outcome


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


def start_threads(call: Callable[[int], object], count: int) -> list[threading.Thread]:
    """``call(index)`` for each index below ``count``, each on its own thread, all started."""
    threads = [threading.Thread(target=call, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    return threads


def join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(GUARD_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a caller never got an answer"


def close_under_load(
    client: EmbeddingClient, texts: int, loaded: Callable[[], bool], what: str
) -> None:
    """Four callers each embed ``texts`` sentences; once ``loaded()`` (``what``) the client is
    closed. Every caller gets its answer, all its vectors or ``ServiceUnavailable``, and none is
    left waiting."""
    outcomes: dict[int, Any] = {}

    def caller(index: int) -> None:
        try:
            outcomes[index] = client.embed(sentences(texts))
        except ServiceUnavailable as exc:
            outcomes[index] = exc

    threads = start_threads(caller, 4)
    wait_until(loaded, what)
    client.close()
    join_all(threads)

    assert sorted(outcomes) == [0, 1, 2, 3]
    for outcome in outcomes.values():
        assert isinstance(outcome, ServiceUnavailable) or np.shape(outcome)[0] == texts


def assert_reaped(pid: int) -> None:
    """The process was waited for by the client: neither running nor a zombie."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
