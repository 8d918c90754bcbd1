"""Supervision without the model: the client's restart, backoff, budget, hang and crash-loop logic
against stand-in workers (``fake_workers/stand_in.py``, a real program that speaks the protocol
and misbehaves on cue), started through the client's ``Spawner`` seam; and the restart policy
alone, on a clock of the test's own.

The stand-ins are the fakes here: they have no model, and their "vectors" only say which text
they belong to. ``test_host_client_supervision.py`` and ``test_pool.py`` prove the same paths
with the real worker and the real model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from supervision_helpers import (
    GUARD_TIMEOUT,
    assert_reaped,
    call_in_background,
    join_all,
    start_threads,
    wait_until,
)

from akidb_embed import wire
from akidb_embed.host_client import (
    AsyncEmbeddingClient,
    EmbeddingClient,
    ModelNotFound,
    ProtocolError,
    RequestTimeout,
    RequestTrace,
    ServiceUnavailable,
)
from akidb_embed.host_client.supervision import GiveUp, RestartPolicy, WorkerCommand

STAND_IN = Path(__file__).parent / "fake_workers" / "stand_in.py"

Plan = Callable[[int, int], Sequence[str]]
"""The stand-in's arguments for slot ``slot``'s ``n``-th spawn (1-based)."""


class StandIns:
    """A ``Spawner`` of stand-in workers, each spawn's behaviour from ``plan``; it counts the
    spawns of each slot."""

    def __init__(self, plan: Plan = lambda slot, spawn: ()) -> None:
        self.plan = plan
        self.spawns: dict[int, int] = {}

    def command(self, slot: int) -> WorkerCommand:
        spawn = self.spawns.get(slot, 0) + 1
        self.spawns[slot] = spawn
        argv = (sys.executable, str(STAND_IN), "--protocol", str(wire.PROTOCOL_VERSION))
        return WorkerCommand((*argv, *self.plan(slot, spawn)), dict(os.environ))


def first_spawn(*arguments: str) -> Plan:
    """Slot 0's first worker gets ``arguments``; every other spawn serves."""
    return lambda slot, spawn: arguments if (slot, spawn) == (0, 1) else ()


def check_rows(vectors: np.ndarray, texts: Sequence[str]) -> None:
    """The stand-in's rows are ``[len(text), 1, 0, 0]``: each text got its own row."""
    assert vectors.shape == (len(texts), 4)
    assert vectors[:, 0].tolist() == [float(len(text)) for text in texts]


def texts_of(count: int, prefix: str = "t") -> list[str]:
    return [prefix + "x" * (index % 17) for index in range(count)]


@pytest.fixture
def clients() -> Iterator[Callable[..., EmbeddingClient]]:
    """A factory of stand-in clients (``spawner`` required), all closed at the end."""
    made: list[EmbeddingClient] = []

    def make(spawner: StandIns, **options: object) -> EmbeddingClient:
        client = EmbeddingClient(spawner=spawner, **options)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# ------------------------------------------------------------------- the policy on its own


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_from_50_ms_to_its_2_s_cap() -> None:
    policy = RestartPolicy(restart_limit=10, stable_start_time=10.0, clock=Clock())

    delays = [policy.failed() for _ in range(8)]

    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_restart_budget_is_spent_by_restarts_in_a_row() -> None:
    policy = RestartPolicy(restart_limit=2, stable_start_time=10.0, clock=Clock())

    outcomes = [policy.failed() for _ in range(3)]

    assert outcomes[:2] == [0.05, 0.1]
    assert outcomes[2] == GiveUp(restarts=2, restart_limit=2)
    assert "restart_limit=2" in outcomes[2].message("killed")


def test_a_stable_worker_resets_the_restart_count() -> None:
    clock = Clock()
    policy = RestartPolicy(restart_limit=2, stable_start_time=10.0, clock=clock)
    policy.ready()
    assert policy.failed() == 0.05
    policy.ready()
    clock.now += 9.9  # not stable yet: the count goes on
    assert policy.failed() == 0.1
    policy.ready()
    clock.now += 10.0  # stable: counted from the start again
    assert policy.failed() == 0.05
    assert policy.consecutive_restarts == 1


def test_a_worker_that_never_started_is_never_stable() -> None:
    clock = Clock()
    policy = RestartPolicy(restart_limit=1, stable_start_time=0.0, clock=clock)
    policy.ready()
    clock.now += 5.0
    assert policy.failed() == 0.05  # it served: stable, count 1
    clock.now += 60.0  # no ready() since: the next failure is a failed start
    assert isinstance(policy.failed(), GiveUp)


# ---------------------------------------------------------------------- deaths and hangs


def test_killed_worker_loses_no_request(clients: Callable[..., EmbeddingClient]) -> None:
    spawner = StandIns(first_spawn("--die-after", "3"))
    client = clients(spawner, workers=1, max_attempts=3)
    texts = texts_of(60)
    results: dict[int, np.ndarray] = {}

    def caller(index: int) -> None:
        results[index] = client.embed(texts[index : index + 20])

    join_all(start_threads(caller, 8))

    assert sorted(results) == list(range(8))
    for index, vectors in results.items():
        check_rows(vectors, texts[index : index + 20])
    stats = client.stats()
    assert stats.restarts == 1 and stats.spawns == 2
    assert stats.resent_requests >= 1
    assert stats.in_flight_texts == 0


def test_many_lone_callers_each_get_their_own_rows(
    clients: Callable[..., EmbeddingClient],
) -> None:
    """Lone calls from many threads over a pool: every call gets its own rows, and no reply is
    left unhandled (it would hold its request past request_timeout: a hang kill, a restart)."""
    client = clients(StandIns(), workers=2, request_timeout=5.0)
    results: dict[tuple[int, int], np.ndarray] = {}

    def caller(thread_index: int) -> None:
        for call in range(150):
            results[(thread_index, call)] = client.embed([f"{thread_index}" + "x" * (call % 9)])

    join_all(start_threads(caller, 8))

    assert len(results) == 8 * 150
    for (thread_index, call), vectors in results.items():
        check_rows(vectors, [f"{thread_index}" + "x" * (call % 9)])
    assert client.stats().spawns == 2 and client.stats().resent_requests == 0


def test_hung_worker_is_killed_and_the_next_one_answers(
    clients: Callable[..., EmbeddingClient],
) -> None:
    spawner = StandIns(first_spawn("--hang-after", "1"))
    client = clients(spawner, workers=1, request_timeout=0.3, max_attempts=2)
    check_rows(client.embed(["answered"]), ["answered"])
    hung = client.stats().worker_pid
    assert hung is not None

    check_rows(client.embed(["held by a hung worker"]), ["held by a hung worker"])

    stats = client.stats()
    assert stats.spawns == 2 and stats.resent_requests == 1
    assert stats.worker_pid not in (None, hung)
    assert_reaped(hung)


def test_request_times_out_when_its_attempts_run_out(
    clients: Callable[..., EmbeddingClient],
) -> None:
    spawner = StandIns(first_spawn("--hang-after", "0"))
    client = clients(spawner, workers=1, request_timeout=0.3, max_attempts=1)

    with pytest.raises(RequestTimeout, match=r"no reply for 0\.3 s"):
        client.embed(["will time out"])
    check_rows(client.embed(["the next worker answers"]), ["the next worker answers"])


def test_a_hung_workers_load_is_read_from_the_table(
    clients: Callable[..., EmbeddingClient],
) -> None:
    spawner = StandIns(first_spawn("--hang-after", "0"))
    client = clients(spawner, workers=2, request_timeout=60.0)
    outcome: list[BaseException] = []

    def held_call() -> None:
        try:
            client.embed(["a", "bb", "ccc"])
        except ServiceUnavailable as exc:  # failed by close, the hung worker never answers
            outcome.append(exc)

    caller = threading.Thread(target=held_call)
    caller.start()
    wait_until(lambda: client.stats().workers[0].in_flight_texts == 3, "slot 0 to hold it")

    stats = client.stats()
    assert stats.in_flight_texts == 3
    assert stats.workers[0].in_flight_tokens > 0
    assert stats.workers[1].in_flight_texts == 0
    # slot 0 holds tokens: the next call goes to slot 1
    check_rows(client.embed(["next"]), ["next"])
    assert client.stats().workers[1].answered_requests == 1
    client.close()
    caller.join(GUARD_TIMEOUT)
    assert len(outcome) == 1


def test_restart_budget_spent_makes_calls_fail_fast(
    clients: Callable[..., EmbeddingClient],
) -> None:
    spawner = StandIns(lambda slot, spawn: ("--die-after", "1"))
    client = clients(spawner, workers=1, restart_limit=2, stable_start_time=3600.0)
    for index in range(3):  # each call's worker answers it, the next call kills it
        check_rows(client.embed([f"call {index}"]), [f"call {index}"])

    with pytest.raises(ServiceUnavailable, match=r"restart_limit=2.*SIGKILL"):
        client.embed(["no more workers"])
    with pytest.raises(ServiceUnavailable, match="restart_limit=2"):
        client.health_check()
    assert spawner.spawns == {0: 3}


def test_stable_workers_never_spend_the_budget(clients: Callable[..., EmbeddingClient]) -> None:
    spawner = StandIns(lambda slot, spawn: ("--die-after", "1"))
    client = clients(spawner, workers=1, restart_limit=1, stable_start_time=0.0)

    for index in range(5):  # every worker dies on its second request, after a stable start
        check_rows(client.embed([f"call {index}"]), [f"call {index}"])

    assert client.stats().restarts == 4


def test_crash_loop_at_restart_gives_up_after_the_budget(
    clients: Callable[..., EmbeddingClient],
) -> None:
    def plan(slot: int, spawn: int) -> Sequence[str]:
        if spawn == 1:
            return ("--die-after", "1")
        return ("--exit-at-start", "1", "--stderr", "cannot open the accelerator")

    spawner = StandIns(plan)
    client = clients(spawner, workers=1, restart_limit=3, stable_start_time=3600.0)
    check_rows(client.embed(["served"]), ["served"])

    with pytest.raises(ServiceUnavailable, match="restart_limit=3") as raised:
        client.embed(["kills it; its replacements cannot start"])
    assert "cannot open the accelerator" in raised.value.message
    assert spawner.spawns == {0: 4}


# -------------------------------------------------------------- workers that cannot start


def test_worker_that_exits_at_start_fails_fast_with_its_stderr() -> None:
    spawner = StandIns(lambda slot, spawn: ("--exit-at-start", "1", "--stderr", "no CUDA"))

    with pytest.raises(ServiceUnavailable, match="exited with code 1") as raised:
        EmbeddingClient(spawner=spawner)

    assert "no CUDA" in raised.value.message
    assert spawner.spawns == {0: 1}


def test_worker_command_runs_the_given_program(tmp_path: Path) -> None:
    command = [sys.executable, str(STAND_IN), "--protocol", str(wire.PROTOCOL_VERSION)]
    command += ["--exit-at-start", "1", "--stderr", "libonnxruntime_providers_cuda.so failed"]

    with pytest.raises(ServiceUnavailable, match="exited with code 1") as raised:
        EmbeddingClient(worker_command=command)

    assert "libonnxruntime_providers_cuda.so failed" in raised.value.message


def test_failed_start_is_never_retried_in_a_loop() -> None:
    spawner = StandIns(lambda slot, spawn: ("--exit-at-start", "1", "--stderr", "no CUDA"))

    async def scenario() -> None:
        client = AsyncEmbeddingClient(spawner=spawner, restart_limit=5)
        try:
            with pytest.raises(ServiceUnavailable, match="CUDA"):
                await client.start()
            for _ in range(3):
                with pytest.raises(ServiceUnavailable, match="CUDA"):
                    await client.embed(["anyone?"])
        finally:
            await client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), GUARD_TIMEOUT))
    assert spawner.spawns == {0: 1}


def test_worker_without_a_hello_is_killed_after_start_timeout() -> None:
    spawner = StandIns(lambda slot, spawn: ("--no-hello",))

    with pytest.raises(ServiceUnavailable, match=r"no hello within 0\.3 s"):
        EmbeddingClient(spawner=spawner, start_timeout=0.3)


def test_worker_that_refuses_to_start_raises_its_own_error() -> None:
    spawner = StandIns(lambda slot, spawn: ("--refuse", "model_not_found", "--stderr", "no dir"))

    with pytest.raises(ModelNotFound, match="no dir"):
        EmbeddingClient(spawner=spawner)


def test_worker_of_another_protocol_version_is_refused() -> None:
    spawner = StandIns(lambda slot, spawn: ("--protocol", str(wire.PROTOCOL_VERSION + 1)))

    with pytest.raises(ProtocolError, match=f"protocol {wire.PROTOCOL_VERSION + 1}"):
        EmbeddingClient(spawner=spawner)


def test_a_failed_start_logs_the_reason_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    spawner = StandIns(lambda slot, spawn: ("--exit-at-start", "1", "--stderr", "ERROR no CUDA"))

    with caplog.at_level(logging.DEBUG), pytest.raises(ServiceUnavailable):
        EmbeddingClient(spawner=spawner)

    assert any("no CUDA" in record.getMessage() for record in caplog.records)
    assert all(record.levelno < logging.WARNING for record in caplog.records)


# ------------------------------------------------------------------------------------ pool


def test_pool_moves_a_dead_workers_requests_to_the_others(
    clients: Callable[..., EmbeddingClient],
) -> None:
    spawner = StandIns(first_spawn("--die-after", "2"))
    client = clients(spawner, workers=3, max_attempts=2, max_in_flight_texts=64)
    texts = texts_of(200)

    vectors = client.embed(texts)  # one call, cut by the bound, over the three workers

    check_rows(vectors, texts)
    wait_until(lambda: client.stats().workers[0].state == "ready", "slot 0's replacement")
    stats = client.stats()
    assert stats.workers[0].restarts == 1 and stats.resent_requests >= 1
    assert [worker.restarts for worker in stats.workers[1:]] == [0, 0]


def test_each_worker_slot_has_its_own_restart_budget(
    clients: Callable[..., EmbeddingClient],
) -> None:
    spawner = StandIns(lambda slot, spawn: ("--hang-after", "0") if slot == 0 else ())
    client = clients(spawner, workers=2, restart_limit=0, request_timeout=0.3)

    for index in range(4):  # slot 0 hangs on its first request and gives up; slot 1 serves
        check_rows(client.embed([f"call {index}"]), [f"call {index}"])

    stats = client.stats()
    assert [worker.state for worker in stats.workers] == ["given up", "ready"]
    assert spawner.spawns == {0: 1, 1: 1}


def test_pool_whose_second_worker_cannot_start_fails_with_its_error() -> None:
    def plan(slot: int, spawn: int) -> Sequence[str]:
        return ("--exit-at-start", "1", "--stderr", "slot 1 failed") if slot == 1 else ()

    with pytest.raises(ServiceUnavailable, match="exited with code 1") as raised:
        EmbeddingClient(spawner=StandIns(plan), workers=3)

    assert "slot 1 failed" in raised.value.message


# ----------------------------------------------------------------------------------- close


def test_close_kills_a_hung_worker_and_fails_its_callers(
    clients: Callable[..., EmbeddingClient],
) -> None:
    spawner = StandIns(first_spawn("--hang-after", "0"))
    client = clients(spawner, workers=1, request_timeout=60.0, close_timeout=0.2)
    pid = client.stats().worker_pid
    assert pid is not None
    thread, outcome = call_in_background(client.embed, ServiceUnavailable)
    wait_until(lambda: client.stats().in_flight_texts > 0, "the call in flight")
    client.close()
    thread.join(GUARD_TIMEOUT)

    assert len(outcome) == 1
    assert [worker.state for worker in client.stats().workers] == ["closed"]
    assert_reaped(pid)


# ----------------------------------------------------------------------------------- trace


def test_trace_hook_gets_each_wire_requests_marks_in_order(
    clients: Callable[..., EmbeddingClient],
) -> None:
    traces: list[RequestTrace] = []
    client = clients(StandIns(), workers=1, trace=traces.append, max_in_flight_texts=8)

    client.embed(["one"])
    wait_until(lambda: len(traces) == 1, "the lone call's trace")
    client.embed(texts_of(20))  # three wire requests under the bound of 8
    wait_until(lambda: len(traces) == 4, "a trace per wire request")

    for trace in traces:
        sending = [trace.submitted, trace.encoding, trace.encoded, trace.writing, trace.written]
        # a stand-in answers at once: its reply may be read before the writer notes "written"
        answer = [trace.writing, trace.read, trace.decoded, trace.delivered]
        assert sending == sorted(sending) and answer == sorted(answer) and sending[0] > 0
        assert trace.worker["read"] > 0 and "encode_ns" in trace.worker
    assert [trace.texts for trace in traces] == [1, 8, 8, 4]
    assert len({trace.submitted for trace in traces[1:]}) == 1  # one call's
