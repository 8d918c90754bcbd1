"""``akidb-embed serve`` end to end: the real command on 127.0.0.1 with an ephemeral port, real
workers and the real model, called through OpenAI's own Python client and through raw HTTP.

Vectors are checked against sentence-transformers' (the provisioned model's golden.json);
``dimensions`` against truncation and renormalisation of the full vector; every error against
OpenAI's shape and its status; supervision by killing a worker under 32 concurrent callers and
by stopping the server with SIGTERM while requests are in flight.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import openai
import pytest
from fresh_python import run_python
from prometheus_client.parser import text_string_to_metric_families
from supervision_helpers import (
    GUARD_TIMEOUT,
    MIN_COSINE,
    min_cosine,
    sentences,
    start_threads,
    wait_until,
)

from akidb_embed.models import ModelMetadata
from akidb_embed.serve import truncate_dimensions

LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:(\d+))")
CALLERS = 32


class Server:
    """``akidb-embed serve --port 0`` in a child process; its stderr collected by a thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "akidb_embed.cli", "serve", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.port = 0
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()
        if not self._listening.wait(GUARD_TIMEOUT) or not self.port:
            self.stop()
            raise AssertionError(f"the server did not listen:\n{self.stderr()}")
        self.url = f"http://127.0.0.1:{self.port}"

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            found = LISTENING.search(line)
            if found and not self.port:
                self.port = int(found.group(2))
                self._listening.set()
        self._listening.set()

    def stderr(self) -> str:
        return "".join(self.lines)

    def wait(self) -> int:
        """The exit status, once every line of stderr is collected."""
        status = self.process.wait(GUARD_TIMEOUT)
        self._collector.join(GUARD_TIMEOUT)
        return status

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """One request on a new connection: status, headers (lower-case names), and the body
        parsed as JSON when it is JSON."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=GUARD_TIMEOUT)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            connection.request(method, path, data, headers or {})
            response = connection.getresponse()
            raw = response.read()
            reply_headers = {name.lower(): value for name, value in response.getheaders()}
        finally:
            connection.close()
        parsed: Any = raw.decode()
        if reply_headers.get("content-type", "").startswith("application/json"):
            parsed = json.loads(raw)
        return response.status, reply_headers, parsed

    def embed(self, body: dict[str, Any]) -> tuple[int, Any]:
        status, _, reply = self.request("POST", "/v1/embeddings", body)
        return status, reply

    def health(self) -> tuple[int, Any]:
        status, _, reply = self.request("GET", "/health")
        return status, reply

    def wait_ready(self) -> dict[str, Any]:
        wait_until(lambda: self.health()[0] == 200, f"/health 200:\n{self.stderr()}")
        return dict(self.health()[1])

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics`` by name and labels, parsed as Prometheus text."""
        status, headers, text = self.request("GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def openai(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(GUARD_TIMEOUT)


@pytest.fixture(scope="module")
def server(metadata: ModelMetadata) -> Iterator[Server]:
    """A pool of two single-thread workers behind the server, shared by the module's tests."""
    running = Server("--workers", "2", "--threads", "1")
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def _vectors(reply: dict[str, Any]) -> npt.NDArray[np.float32]:
    data = reply["data"]
    assert [item["index"] for item in data] == list(range(len(data)))
    assert all(item["object"] == "embedding" for item in data)
    embeddings = [item["embedding"] for item in data]
    if isinstance(embeddings[0], str):
        return np.stack([np.frombuffer(base64.b64decode(text), "<f4") for text in embeddings])
    return np.asarray(embeddings, dtype=np.float32)


def _error(reply: Any) -> dict[str, Any]:
    """The ``error`` object of an error reply, checked for OpenAI's four fields."""
    assert set(reply) == {"error"}, reply
    error: dict[str, Any] = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


# ------------------------------------------------------------------------- OpenAI's client


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_openai_client_vectors_equal_sentence_transformers(
    server: Server,
    metadata: ModelMetadata,
    golden: dict[str, Any],
    encoding_format: str | None,
) -> None:
    """``float`` and ``base64`` asked explicitly, and the SDK's default (it asks for base64 and
    decodes the vectors itself)."""
    texts = golden["sentences"]
    options: dict[str, Any] = (
        {} if encoding_format is None else {"encoding_format": encoding_format}
    )
    reply = server.openai().embeddings.create(input=texts, model=metadata.model, **options)
    assert reply.object == "list" and reply.model == metadata.model
    assert [item.index for item in reply.data] == list(range(len(texts)))
    if encoding_format == "base64":  # asked for explicitly, the SDK hands the text over as is
        vectors = np.stack(
            [np.frombuffer(base64.b64decode(item.embedding), "<f4") for item in reply.data]  # type: ignore[arg-type]
        )
    else:
        vectors = np.asarray([item.embedding for item in reply.data], dtype=np.float32)
    assert vectors.shape == (len(texts), metadata.dimension)
    assert min_cosine(vectors, np.asarray(golden["embeddings"])) >= MIN_COSINE
    tokens = sum(golden["token_counts"])
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens


def test_openai_client_default_model_and_one_string(
    server: Server, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    """``model`` may name the default model or be left out (raw HTTP: the SDK requires it);
    ``input`` may be one string."""
    text = golden["sentences"][3]
    reply = server.openai().embeddings.create(input=text, model=metadata.model, user="someone")
    assert len(reply.data) == 1
    status, raw = server.embed({"input": text})
    assert status == 200 and raw["model"] == metadata.model
    expected = np.asarray(golden["embeddings"][3:4])
    assert min_cosine(np.asarray([reply.data[0].embedding], np.float32), expected) >= MIN_COSINE
    assert min_cosine(_vectors(raw), expected) >= MIN_COSINE
    assert raw["usage"] == {"prompt_tokens": golden["token_counts"][3]} | {
        "total_tokens": golden["token_counts"][3]
    }


def test_openai_client_lists_the_models(server: Server, metadata: ModelMetadata) -> None:
    models = list(server.openai().models.list())
    assert [model.id for model in models] == [metadata.model]
    status, _, reply = server.request("GET", "/v1/models")
    assert status == 200 and reply["data"][0]["dimension"] == metadata.dimension


def test_openai_client_gets_typed_errors(server: Server, metadata: ModelMetadata) -> None:
    client = server.openai()
    with pytest.raises(openai.NotFoundError) as not_found:
        client.embeddings.create(input="a text", model="no/such-model")
    assert not_found.value.code == "model_not_found" and not_found.value.param == "model"
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(input=[], model=metadata.model)
    assert empty.value.param == "input"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.embeddings.create(input="a text", model=metadata.model, dimensions=100_000)
    assert too_many.value.param == "dimensions"


# --------------------------------------------------------------------------- dimensions


@pytest.mark.parametrize("dimensions", [1, 64, 200])
def test_dimensions_equal_truncation_and_renormalisation(
    server: Server, metadata: ModelMetadata, golden: dict[str, Any], dimensions: int
) -> None:
    texts = golden["sentences"]
    full = _vectors(server.embed({"input": texts})[1])
    reply = server.openai().embeddings.create(
        input=texts, model=metadata.model, dimensions=dimensions, encoding_format="float"
    )
    cut = np.asarray([item.embedding for item in reply.data], dtype=np.float32)
    expected = full[:, :dimensions] / np.linalg.norm(full[:, :dimensions], axis=1, keepdims=True)
    assert cut.shape == (len(texts), dimensions)
    assert min_cosine(cut, expected) >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    assert reply.usage.total_tokens == sum(golden["token_counts"])


def test_dimensions_without_normalisation_are_the_first_components(
    server: Server, golden: dict[str, Any]
) -> None:
    texts = golden["sentences"][:5]
    status, raw = server.embed({"input": texts, "normalize": False})
    status_cut, cut = server.embed(
        {"input": texts, "normalize": False, "dimensions": 32, "encoding_format": "base64"}
    )
    assert status == status_cut == 200
    np.testing.assert_allclose(_vectors(cut), _vectors(raw)[:, :32], rtol=1e-6, atol=1e-7)


def test_truncate_dimensions_matches_the_definition() -> None:
    rows = np.random.default_rng(7).normal(size=(5, 48)).astype(np.float32)
    cut = truncate_dimensions(rows, 16, normalize=True)
    np.testing.assert_allclose(cut, rows[:, :16] / np.linalg.norm(rows[:, :16], axis=1)[:, None])
    assert cut.flags.c_contiguous and cut.dtype == np.float32
    np.testing.assert_array_equal(truncate_dimensions(rows, 16, normalize=False), rows[:, :16])


# ------------------------------------------------------------------------------- raw HTTP


def test_extensions_prompt_name_normalize_and_truncate(
    server: Server, metadata: ModelMetadata
) -> None:
    long_text = "word " * (metadata.max_tokens * 2)
    status, reply = server.embed({"input": [long_text, "short"], "normalize": False})
    assert status == 200
    assert reply["usage"]["total_tokens"] == metadata.max_tokens + 3  # cut at max_tokens
    norms = np.linalg.norm(_vectors(reply), axis=1)
    assert not np.allclose(norms, 1.0)  # normalize: false reached the workers
    status, reply = server.embed({"input": ["short", long_text], "truncate": False})
    error = _error(reply)
    assert status == 400 and error["param"] == "input" and "inputs[1]" in error["message"]
    status, reply = server.embed({"input": "text", "prompt_name": "query"})
    assert status == 400 and _error(reply)["param"] == "prompt_name"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"model": "x"}, "input"),
        ({"input": 5}, "input"),
        ({"input": {"text": "a"}}, "input"),
        ({"input": ["fine", 7]}, "input"),
        ({"input": [[101, 2023]]}, "input"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "dimensions": 385}, "dimensions"),
        ({"input": "a", "dimensions": "64"}, "dimensions"),
        ({"input": "a", "dimensions": True}, "dimensions"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "normalize": "yes"}, "normalize"),
        ({"input": "a", "truncate": 0}, "truncate"),
        ({"input": "a", "model": 3}, "model"),
        (b"{not json", "body"),
        ([1, 2], "body"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server: Server, body: Any, param: str) -> None:
    status, reply = server.embed(body)
    error = _error(reply)
    assert status == 400, reply
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_input",
        param,
    )


def test_unknown_model_is_a_404_listing_the_served(server: Server, metadata: ModelMetadata) -> None:
    status, reply = server.embed({"input": "a", "model": "../../etc/passwd"})
    error = _error(reply)
    assert status == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    assert metadata.model in error["message"]


def test_unknown_path_and_wrong_method(server: Server) -> None:
    status, _, reply = server.request("GET", "/v1/../../etc/passwd")
    assert status == 404 and _error(reply)["code"] == "not_found"
    status, headers, reply = server.request("GET", "/v1/embeddings")
    assert status == 405 and headers["allow"] == "POST"
    assert _error(reply)["code"] == "method_not_allowed"


def test_a_body_over_the_limit_is_refused_before_it_is_read() -> None:
    """A declared length over the limit gets 413 with only part of the body sent; a chunked
    body, once its chunks pass the limit."""
    limited = Server("--max-body-bytes", "1000")
    try:
        limited.wait_ready()
        request = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        declared = request + b"Content-Length: 50000000\r\n\r\n" + b'{"input": "' + b"a" * 500
        chunk = b"190\r\n" + b"x" * 400 + b"\r\n"  # 400 bytes a chunk, 4,000 in all
        chunked = request + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 10 + b"0\r\n\r\n"
        for sent in (declared, chunked):
            # sent whole at once: the server answers, then closes, part-way through the body
            with socket.create_connection(("127.0.0.1", limited.port), GUARD_TIMEOUT) as sock:
                sock.sendall(sent)
                received = b""
                while part := sock.recv(65536):  # the server closes the connection after it
                    received += part
            head, _, body = received.decode().partition("\r\n\r\n")
            assert head.startswith("HTTP/1.1 413"), head
            assert _error(json.loads(body))["code"] == "request_too_large"
        status, reply = limited.embed({"input": "under the limit"})
        assert status == 200 and len(reply["data"]) == 1
        assert (
            limited.metrics()[
                ("akidb_embed_errors_total", (("code", "request_too_large"), ("status", "413")))
            ]
            == 2
        )
    finally:
        limited.stop()


def test_each_reply_leaves_in_one_write(server: Server, metadata: ModelMetadata) -> None:
    """Headers and body come in one segment, so the caller's first read holds the whole reply
    (uvicorn alone writes them apart, and a caller woken by the headers sleeps again for the
    body: most replies then took two reads)."""
    body = json.dumps({"input": "one write", "encoding_format": "base64"}).encode()
    request = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    with socket.create_connection(("127.0.0.1", server.port), GUARD_TIMEOUT) as sock:
        for _ in range(20):
            sock.sendall(request)
            first = sock.recv(1 << 20)  # returns as soon as the first segment is here
            head, _, rest = first.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            declared = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
            assert declared is not None, head
            length = int(declared[1])
            assert len(rest) == length, f"the first read held {len(rest)} of {length} body bytes"
            assert _vectors(json.loads(rest)).shape == (1, metadata.dimension)


def test_expect_100_continue_is_answered_before_the_body_is_sent(
    server: Server, metadata: ModelMetadata
) -> None:
    """curl sends ``Expect: 100-continue`` with a large body and waits for the interim reply:
    a write the server makes outside a reply goes out too (at the end of the loop's turn)."""
    body = json.dumps({"input": "continued", "encoding_format": "base64"}).encode()
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", server.port), GUARD_TIMEOUT) as sock:
        sock.sendall(head)
        assert sock.recv(1 << 16) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith(b"}"):
            received += sock.recv(1 << 20)
    reply_head, _, reply = received.partition(b"\r\n\r\n")
    assert reply_head.startswith(b"HTTP/1.1 200"), reply_head
    assert _vectors(json.loads(reply)).shape == (1, metadata.dimension)


def test_the_bench_callers_get_the_vectors_on_one_connection(
    server: Server, golden: dict[str, Any]
) -> None:
    """The bench's two HTTP callers: a lone text, then the golden sentences many times over
    (a reply of several reads), on each thread's one keep-alive connection."""
    from akidb_embed.bench.http_column import LeanCaller, StdlibCaller

    sentences = golden["sentences"]
    expected = np.asarray(golden["embeddings"], dtype=np.float32)
    for caller in (LeanCaller(server.port), StdlibCaller(server.port)):
        assert min_cosine(caller.embed(sentences[:1]), expected[:1]) >= MIN_COSINE
        many = caller.embed(sentences * 40)
        assert min_cosine(many, np.tile(expected, (40, 1))) >= MIN_COSINE


# ------------------------------------------------------------------- health and metrics


def test_health_reports_every_worker(server: Server) -> None:
    status, reply = server.health()
    assert status == 200 and reply["status"] == "ok"
    assert [worker["state"] for worker in reply["workers"]] == ["ready", "ready"]


def test_metrics_count_requests_texts_tokens_and_errors(
    server: Server, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    model = (("model", metadata.model),)
    before = server.metrics()
    texts = golden["sentences"][:4]
    assert server.embed({"input": texts})[0] == 200
    assert server.embed({"input": []})[0] == 400
    after = server.metrics()

    def grew(name: str, labels: tuple[tuple[str, str], ...]) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert grew("akidb_embed_requests_total", model) == 1
    assert grew("akidb_embed_texts_total", model) == 4
    assert grew("akidb_embed_tokens_total", model) == sum(golden["token_counts"][:4])
    assert grew("akidb_embed_request_duration_seconds_count", model) == 1
    assert grew("akidb_embed_queue_wait_seconds_count", model) == 1
    batch = (("le", "4.0"), ("model", metadata.model))
    assert grew("akidb_embed_batch_size_texts_bucket", batch) == 1
    errors = (("code", "invalid_input"), ("status", "400"))
    assert grew("akidb_embed_errors_total", errors) == 1
    assert after[("akidb_embed_in_flight_requests", ())] == 0
    assert after[("akidb_embed_worker_ready", (("worker", "0"),))] == 1
    assert after[("akidb_embed_worker_rss_bytes", (("worker", "1"),))] > 50 * 2**20


# -------------------------------------------------------------------- key and extra


def test_an_api_key_from_the_environment_is_required() -> None:
    keyed = Server(env={"AKIDB_EMBED_API_KEY": "s3cret"})
    try:
        keyed.wait_ready()  # /health needs no key
        status, headers, reply = keyed.request("POST", "/v1/embeddings", {"input": "a"})
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert _error(reply)["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer guess"}
        assert keyed.request("GET", "/metrics", headers=wrong)[0] == 401
        with pytest.raises(openai.AuthenticationError):
            keyed.openai("guess").embeddings.create(input="a", model="any")
        models = list(keyed.openai("s3cret").models.list())
        reply = keyed.openai("s3cret").embeddings.create(input=["a", "b"], model=models[0].id)
        assert len(reply.data) == 2
    finally:
        keyed.stop()


def test_serve_without_the_extra_is_one_line() -> None:
    done = run_python(
        "import sys",
        "sys.modules['uvicorn'] = None  # as if the serve extra were not installed",
        "from akidb_embed.cli import main",
        "sys.exit(main(['serve']))",
        timeout=GUARD_TIMEOUT,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "`serve` extra" in done.stderr, done.stderr


# -------------------------------------------------------------------------- supervision


def _callers_until(
    server: Server, texts: list[str], reference: npt.NDArray[np.float32], stop: threading.Event
) -> tuple[list[int], list[str], list[threading.Thread]]:
    """``CALLERS`` threads posting one or two texts per request on keep-alive connections
    until ``stop``: the count answered per caller, every failure seen, and the threads."""
    answered = [0] * CALLERS
    failures: list[str] = []

    def caller(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=GUARD_TIMEOUT)
        call = 0
        while not stop.is_set():
            picked = [(index * 5 + call) % len(texts), (index + call * 3) % len(texts)][
                : 1 + call % 2
            ]
            body = json.dumps({"input": [texts[i] for i in picked], "encoding_format": "base64"})
            try:
                connection.request("POST", "/v1/embeddings", body)
                response = connection.getresponse()
                reply = json.loads(response.read())
                if response.status != 200:
                    failures.append(f"caller {index}: {response.status} {reply}")
                    return
                if min_cosine(_vectors(reply), reference[picked]) < MIN_COSINE:
                    failures.append(f"caller {index}: wrong vectors")
                    return
            except Exception as exc:
                failures.append(f"caller {index}: {exc!r}")
                return
            answered[index] += 1
            call += 1
        connection.close()

    return answered, failures, start_threads(caller, CALLERS)


def test_killed_worker_under_32_callers_loses_no_request(metadata: ModelMetadata) -> None:
    """One worker, SIGKILLed while 32 callers keep requests in flight: the replacement answers
    what it held, no caller sees an error, and /metrics counts the restart."""
    single = Server("--workers", "1")
    try:
        health = single.wait_ready()
        first_pid = health["workers"][0]["pid"]
        texts = sentences(64)
        reference = _vectors(single.embed({"input": texts})[1])
        stop = threading.Event()
        answered, failures, threads = _callers_until(single, texts, reference, stop)
        wait_until(lambda: sum(answered) >= 2 * CALLERS or bool(failures), "calls before the kill")
        os.kill(first_pid, signal.SIGKILL)
        at_kill = list(answered)
        wait_until(
            lambda: (
                all(now > then for now, then in zip(answered, at_kill, strict=True))
                or bool(failures)
            ),
            "every caller answered after the kill",
        )
        stop.set()
        for thread in threads:
            thread.join(GUARD_TIMEOUT)
        assert failures == []
        health = single.wait_ready()
        assert health["workers"][0]["pid"] != first_pid
        metrics = single.metrics()
        assert metrics[("akidb_embed_worker_restarts_total", ())] == 1
        assert not any(key[0] == "akidb_embed_errors_total" for key in metrics)
    finally:
        single.stop()


def test_workers_that_cannot_serve_give_503(metadata: ModelMetadata) -> None:
    """A worker killed with no restart budget left: the pool gave up, and the server says so."""
    fragile = Server("--workers", "1", "--restart-limit", "0")
    try:
        pid = fragile.wait_ready()["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: fragile.health()[0] == 503, "/health 503 after the kill")
        status, reply = fragile.health()
        assert reply["status"] == "unavailable" and "given up" in reply["reason"]
        status, reply = fragile.embed({"input": "a text"})
        error = _error(reply)
        assert status == 503 and error["code"] == "service_unavailable"
        assert error["type"] == "server_error"
    finally:
        fragile.stop()


def test_workers_that_cannot_start_end_the_server_with_their_reason(tmp_path: Path) -> None:
    failing = Server("--model-dir", str(tmp_path / "no-model-here"))
    try:
        assert failing.wait() == 2  # a CLI error: one line, exit code 2
        last = failing.stderr().strip().splitlines()[-1]
        assert last.startswith("akidb-embed: ModelNotFound: "), failing.stderr()
    finally:
        failing.stop()


def test_sigterm_answers_requests_in_flight_then_stops_the_workers(
    metadata: ModelMetadata,
) -> None:
    stopping = Server("--workers", "1")
    try:
        pid = stopping.wait_ready()["workers"][0]["pid"]
        texts = sentences(300)
        replies: list[tuple[int, Any]] = []

        def bulk() -> None:
            replies.append(stopping.embed({"input": texts}))

        threads = [threading.Thread(target=bulk) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(
            lambda: stopping.metrics()[("akidb_embed_in_flight_requests", ())] == 4,
            "four requests in flight",
        )
        stopping.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(GUARD_TIMEOUT)
        assert [status for status, _ in replies] == [200] * 4
        assert all(len(reply["data"]) == len(texts) for _, reply in replies)
        assert stopping.wait() == -signal.SIGTERM
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "the worker gone")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", stopping.port), timeout=5).close()
    finally:
        stopping.stop()
