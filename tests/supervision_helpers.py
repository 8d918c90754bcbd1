"""Helpers of the tests that kill, stop and restart workers under a client
(test_host_client_supervision.py, test_pool.py, test_host_client_stand_ins.py): texts, the
vector check, a call left waiting, waiting and reaping."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

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


def assert_reaped(pid: int) -> None:
    """The process was waited for by the client: neither running nor a zombie."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
