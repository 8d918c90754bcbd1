"""The host client against a real worker and the real model: results, errors, splitting,
backpressure, the asyncio twin and what importing it loads.

Supervision under faults (kill -9, SIGSTOP, failed starts, close under load) is in
test_host_client_supervision.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from supervision_helpers import join_all, start_threads

from akidb_embed.host_client import (
    AsyncEmbeddingClient,
    BatchEmbeddingRequest,
    BatchEmbeddingResponse,
    EmbeddingClient,
    InvalidInput,
    ModelInfo,
    ModelNotFound,
    RequestTrace,
    ServiceUnavailable,
)
from akidb_embed.models import ModelMetadata

GOLDEN_MIN_COSINE = 0.99999
CALL_TIMEOUT = 300.0
"""Only a guard against a hang: joins and waits give up after this long."""


def min_cosine(actual: npt.NDArray[np.float32], expected: npt.NDArray[Any]) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    actual64 = actual.astype(np.float64)
    dots = np.sum(actual64 * expected, axis=1)
    norms = np.linalg.norm(actual64, axis=1) * np.linalg.norm(expected, axis=1)
    return float(np.min(dots / norms))


def words(count: int, prefix: str = "w") -> list[str]:
    return [f"{prefix}{index}" for index in range(count)]


@pytest.fixture(scope="module")
def client(metadata: ModelMetadata) -> Iterator[EmbeddingClient]:
    """One client with default settings for this module's tests."""
    with EmbeddingClient(metadata.directory, request_timeout=120.0) as shared:
        yield shared


@pytest.fixture(scope="module")
def small_frames_client(metadata: ModelMetadata) -> Iterator[EmbeddingClient]:
    """A worker allowing 8 texts and 16 KiB per frame (a reply of 8 vectors fits), and a client
    allowing 16 texts in flight: cheap ways to make the client split and hold back."""
    with EmbeddingClient(
        metadata.directory,
        request_timeout=120.0,
        max_in_flight_texts=16,
        worker_args=("--max-texts-per-request", "8", "--max-frame-bytes", str(16 * 1024)),
    ) as shared:
        yield shared


# ------------------------------------------------------------------------------ results


def test_embed_batch_matches_golden_vectors(
    client: EmbeddingClient, golden: dict[str, Any], metadata: ModelMetadata
) -> None:
    response = client.embed_batch(BatchEmbeddingRequest(metadata.model, golden["sentences"]))

    assert isinstance(response, BatchEmbeddingResponse)
    assert response.model == metadata.model
    assert response.embeddings.dtype == np.float32
    assert response.embeddings.shape == (len(golden["sentences"]), metadata.dimension)
    assert response.embeddings.flags.c_contiguous
    assert min_cosine(response.embeddings, golden["embeddings"]) >= GOLDEN_MIN_COSINE
    assert response.usage.total_tokens == sum(golden["token_counts"])
    assert response.usage.duration_ms > 0


def test_embed_returns_unit_vectors_and_honours_normalize_false(client: EmbeddingClient) -> None:
    texts = ["A cat sleeps on the warm windowsill.", "Interest rates rose again."]

    normalized = client.embed(texts)
    raw = client.embed(texts, normalize=False)

    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    rescaled = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert min_cosine(normalized, rescaled) >= GOLDEN_MIN_COSINE


def test_model_info_comes_from_the_model_metadata(
    client: EmbeddingClient, metadata: ModelMetadata
) -> None:
    assert client.model_info() == ModelInfo(
        model=metadata.model,
        dimension=metadata.dimension,
        max_tokens=metadata.max_tokens,
        encodings=("float32", "float16", "int8", "uint8", "binary", "ubinary"),
    )
    assert client.providers
    assert client.limits["max_texts_per_request"] >= 1


def test_health_check_and_ping_answer(client: EmbeddingClient) -> None:
    assert client.health_check() is True
    assert client.ping() > 0


def test_trace_hook_places_the_workers_marks_among_the_clients(metadata: ModelMetadata) -> None:
    traces: list[RequestTrace] = []
    with EmbeddingClient(metadata.directory, trace=traces.append) as traced:
        traced.embed(["a traced query"])
        traced.health_check()  # text-free ops are not traced

    assert len(traces) == 1
    trace, worker = traces[0], traces[0].worker
    assert trace.texts == 1
    # one clock (Linux CLOCK_MONOTONIC) on both sides of the pipe
    host = [trace.submitted, trace.encoding, trace.encoded, trace.writing, trace.written]
    assert host == sorted(host)
    # the worker may read the frame before the writer, descheduled after its write, notes it
    assert trace.writing <= worker["read"] <= worker["parsed"] <= worker["tokenized"]
    assert worker["tokenized"] <= worker["started"] <= worker["ran"] <= worker["pooled"]
    assert worker["pooled"] <= trace.read <= trace.decoded <= trace.delivered


def test_empty_batch_is_invalid_input_as_akidb_providers_answer_it(
    client: EmbeddingClient, metadata: ModelMetadata
) -> None:
    with pytest.raises(InvalidInput, match=r"^empty input batch$"):
        client.embed_batch(BatchEmbeddingRequest(metadata.model, []))
    with pytest.raises(InvalidInput, match=r"^empty input batch$"):
        client.embed([])
    assert client.stats().in_flight_texts == 0


def test_any_number_of_threads_share_one_client(
    client: EmbeddingClient, golden: dict[str, Any]
) -> None:
    sentences, expected = golden["sentences"], np.asarray(golden["embeddings"])
    results: dict[int, npt.NDArray[np.float32]] = {}

    def call(index: int) -> None:
        picked = [(index + offset) % len(sentences) for offset in range(3)]
        vectors = client.embed([sentences[i] for i in picked])
        results[index] = vectors
        assert min_cosine(vectors, expected[picked]) >= GOLDEN_MIN_COSINE

    join_all(start_threads(call, 16))
    assert sorted(results) == list(range(16))


# ------------------------------------------------------------------------------- errors


def test_wrong_model_is_model_not_found_and_the_worker_stays_usable(
    client: EmbeddingClient,
) -> None:
    with pytest.raises(ModelNotFound):
        client.embed_batch(BatchEmbeddingRequest("someone/another-model", ["hello"]))

    assert client.embed(["still here"]).shape[0] == 1


def test_a_models_short_name_names_it(client: EmbeddingClient, metadata: ModelMetadata) -> None:
    short_name = metadata.model.rsplit("/", 1)[-1]
    assert short_name != metadata.model  # sentence-transformers/all-MiniLM-L6-v2

    assert client.model_info(short_name) == client.model_info()
    response = client.embed_batch(BatchEmbeddingRequest(short_name, ["a cat on a mat"]))
    assert response.model == metadata.model
    assert np.array_equal(response.embeddings, client.embed(["a cat on a mat"]))


def test_over_long_input_without_truncation_is_invalid_input(
    client: EmbeddingClient, metadata: ModelMetadata
) -> None:
    over_long = " ".join(["word"] * (metadata.max_tokens * 2))

    with pytest.raises(InvalidInput) as raised:
        client.embed_batch(
            BatchEmbeddingRequest(metadata.model, ["fine", over_long], truncate=False)
        )
    # in the words of this API, not the wire's
    assert raised.value.message.endswith("; shorten it or pass truncate=True (the default)")
    with pytest.raises(InvalidInput, match=r"^inputs\[0\] has \d+ tokens"):
        client.embed([over_long], truncate=False)

    truncated = client.embed_batch(BatchEmbeddingRequest(metadata.model, [over_long]))
    assert truncated.usage.total_tokens == metadata.max_tokens
    assert client.embed(["still here"]).shape[0] == 1


def test_invalid_input_names_the_callers_index_in_a_split_and_sorted_batch(
    small_frames_client: EmbeddingClient, metadata: ModelMetadata
) -> None:
    # texts go out sorted by length in frames of 8: the over-long text (the longest) is sent
    # as inputs[n] of the last frame, and the error must still name the caller's index 13
    texts = [f"short text {index}" for index in range(30)]
    texts[13] = " ".join(["word"] * (metadata.max_tokens * 2))

    with pytest.raises(InvalidInput, match=r"^inputs\[13\] has \d+ tokens") as raised:
        small_frames_client.embed_batch(BatchEmbeddingRequest(None, texts, truncate=False))

    assert raised.value.index == 13


@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param("one string, not a list", id="a-bare-string"),
        pytest.param(["fine", 42], id="a-non-string-input"),
        pytest.param(["fine", "\ud800 lone surrogate"], id="text-that-is-not-unicode"),
    ],
)
def test_inputs_that_cannot_be_sent_are_invalid_input(client: EmbeddingClient, inputs: Any) -> None:
    with pytest.raises(InvalidInput) as raised:
        client.embed_batch(BatchEmbeddingRequest(None, inputs))
    if inputs == ["fine", 42]:
        assert raised.value.message == "inputs[1] is an int, not a str"

    assert client.stats().in_flight_texts == 0
    assert client.embed(["still here"]).shape[0] == 1


def test_text_over_the_workers_byte_limit_is_refused_before_sending(
    client: EmbeddingClient,
) -> None:
    too_big = "x" * (client.limits["max_text_bytes"] + 1)

    with pytest.raises(InvalidInput, match=r"^inputs\[1\]"):
        client.embed(["fine", too_big])

    assert client.stats().spawns == 1  # the worker never saw it, let alone died of it


# -------------------------------------------------------------- splitting and backpressure


def test_batch_over_the_worker_limits_is_split_and_reassembled_in_order(
    small_frames_client: EmbeddingClient, client: EmbeddingClient
) -> None:
    # 8 texts per frame at most, and 16 KiB per frame: the multi-byte texts of ~2,400 UTF-8
    # bytes split on size, 6 to a frame; the short ones on count.
    texts = [f"text number {index}" for index in range(60)]
    texts += [f"{index} " + "é" * 1200 for index in range(10)]
    texts += [f"closing line {index}" for index in range(13)]

    split = small_frames_client.embed_batch(BatchEmbeddingRequest(None, texts))
    whole = client.embed_batch(BatchEmbeddingRequest(None, texts))

    assert split.embeddings.shape == whole.embeddings.shape
    assert min_cosine(split.embeddings, whole.embeddings) >= GOLDEN_MIN_COSINE
    assert split.usage.total_tokens == whole.usage.total_tokens


def test_texts_in_flight_never_exceed_the_bound(small_frames_client: EmbeddingClient) -> None:
    bound = small_frames_client.config.max_in_flight_texts
    results: dict[int, npt.NDArray[np.float32]] = {}

    def call(index: int) -> None:
        results[index] = small_frames_client.embed(words(300, prefix=f"t{index}-"))

    join_all(start_threads(call, 4))

    stats = small_frames_client.stats()
    assert sorted(results) == [0, 1, 2, 3]
    assert all(vectors.shape[0] == 300 for vectors in results.values())
    assert 0 < stats.peak_in_flight_texts <= bound
    assert stats.in_flight_texts == 0


def test_lone_calls_among_queued_calls_keep_the_bound_and_their_own_vectors(
    small_frames_client: EmbeddingClient,
) -> None:
    """One-text calls take the lone path (one lock, no waiting line) only when nothing waits
    before them: racing calls that the bound holds back, each still gets its own vector and the
    texts in flight never pass the bound."""
    bound = small_frames_client.config.max_in_flight_texts
    expected = {index: small_frames_client.embed([f"lone text {index}"])[0] for index in range(8)}
    lone: dict[int, list[npt.NDArray[np.float32]]] = {index: [] for index in range(8)}
    big: dict[int, npt.NDArray[np.float32]] = {}

    def lone_caller(index: int) -> None:
        for _ in range(5):
            lone[index].append(small_frames_client.embed([f"lone text {index}"])[0])

    def big_caller(index: int) -> None:
        big[index] = small_frames_client.embed(words(100, prefix=f"b{index}-"))

    join_all(start_threads(lone_caller, 8) + start_threads(big_caller, 2))

    for index, vectors in lone.items():
        assert len(vectors) == 5
        assert all(min_cosine(vector[None], expected[index][None]) > 0.9999 for vector in vectors)
    assert sorted(big) == [0, 1] and all(v.shape[0] == 100 for v in big.values())
    stats = small_frames_client.stats()
    assert 0 < stats.peak_in_flight_texts <= bound
    assert stats.in_flight_texts == 0


def test_queue_ms_is_the_wait_for_room_under_the_bound(
    small_frames_client: EmbeddingClient,
) -> None:
    """A call of more texts than the bound allows in flight waits for its first chunks'
    replies before its last chunk is admitted; a lone call is admitted at once."""
    bound = small_frames_client.config.max_in_flight_texts
    texts = [f"text number {index} waits for room" for index in range(bound * 3)]
    waited = small_frames_client.embed_batch(BatchEmbeddingRequest(None, texts)).usage
    assert 0 < waited.queue_ms < waited.duration_ms
    lone = small_frames_client.embed_batch(BatchEmbeddingRequest(None, ["alone"])).usage
    assert lone.queue_ms == 0


def test_many_thousand_texts_make_as_many_vectors(client: EmbeddingClient) -> None:
    count = 4000  # ~4 frames of 1,024; 100,000 behaves the same, only slower
    texts = words(count)

    vectors = client.embed(texts)

    assert vectors.shape == (count, client.model_info().dimension)
    spot_checks = [0, 1023, 1024, 2500, count - 1]
    expected = client.embed([texts[index] for index in spot_checks])
    assert min_cosine(vectors[spot_checks], expected) >= GOLDEN_MIN_COSINE
    assert client.stats().peak_in_flight_texts <= client.config.max_in_flight_texts


# ---------------------------------------------------------------------------- asyncio twin


def test_async_client_serves_many_concurrent_tasks(
    metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    sentences, expected = golden["sentences"], np.asarray(golden["embeddings"])

    async def scenario() -> list[float]:
        async with AsyncEmbeddingClient(metadata.directory, request_timeout=120.0) as client:
            assert await client.model_info() == ModelInfo(
                metadata.model,
                metadata.dimension,
                metadata.max_tokens,
                metadata.normalize,
                encodings=("float32", "float16", "int8", "uint8", "binary", "ubinary"),
            )
            assert await client.models() == [await client.model_info()]
            assert await client.health_check() is True
            with pytest.raises(InvalidInput, match=r"^empty input batch$"):
                await client.embed([])
            over_long = " ".join(["word"] * (metadata.max_tokens * 2))
            with pytest.raises(InvalidInput, match=r"pass truncate=True"):
                await client.embed([over_long], truncate=False)
            assert (await client.embed([over_long])).shape == (1, metadata.dimension)

            async def task(index: int) -> float:
                picked = [index % len(sentences), (index * 7) % len(sentences)]
                request = BatchEmbeddingRequest(metadata.model, [sentences[i] for i in picked])
                response = await client.embed_batch(request)
                return min_cosine(response.embeddings, expected[picked])

            cosines = await asyncio.gather(*(task(index) for index in range(200)))
            assert client.stats().in_flight_texts == 0
            return cosines

    cosines = asyncio.run(asyncio.wait_for(scenario(), CALL_TIMEOUT))
    assert len(cosines) == 200
    assert min(cosines) >= GOLDEN_MIN_COSINE


def test_cancelled_async_call_leaves_the_client_usable(metadata: ModelMetadata) -> None:
    async def scenario() -> None:
        async with AsyncEmbeddingClient(
            metadata.directory,
            request_timeout=120.0,
            max_in_flight_texts=64,
            worker_args=("--max-texts-per-request", "32"),
        ) as client:
            big = asyncio.ensure_future(client.embed(words(3000)))
            while client.stats().in_flight_texts == 0:
                await asyncio.sleep(0.001)
            big.cancel()
            with pytest.raises(asyncio.CancelledError):
                await big
            vectors = await client.embed(["after the cancel"])
            assert vectors.shape[0] == 1
            while client.stats().in_flight_texts:  # replies already on their way drain
                await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), CALL_TIMEOUT))


# ----------------------------------------------------------------------------- lifecycle


def test_closed_client_refuses_calls_and_close_is_idempotent(metadata: ModelMetadata) -> None:
    client = EmbeddingClient(metadata.directory)
    pid = client.stats().worker_pid
    assert pid is not None

    client.close()
    client.close()

    with pytest.raises(ServiceUnavailable):
        client.embed(["too late"])
    with pytest.raises(ChildProcessError):  # reaped: no zombie left behind
        os.waitpid(pid, os.WNOHANG)


def test_importing_the_client_loads_neither_onnxruntime_nor_tokenizers() -> None:
    probe = (
        "import sys, akidb_embed.host_client\n"
        "heavy = {'onnxruntime', 'tokenizers'}\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == ""


def test_public_api_is_what_all_lists_and_errors_are_the_shared_tree() -> None:
    import akidb_embed.errors as errors
    import akidb_embed.host_client as host_client

    for name in host_client.__all__:
        assert hasattr(host_client, name), name
    for name in errors.__all__:
        if name != "from_wire":
            assert getattr(host_client, name) is getattr(errors, name)


def test_a_failed_start_logs_the_workers_reason_at_debug_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller gets the reason as the constructor's error; a host that captures debug logs
    also finds the worker's own line there, and nothing is logged as a warning or error."""
    caplog.set_level(logging.DEBUG, logger="akidb_embed")
    with pytest.raises(ModelNotFound, match="no model at"):
        EmbeddingClient(tmp_path / "nowhere")
    ours = [record for record in caplog.records if record.name.startswith("akidb_embed")]
    assert any(
        record.name == "akidb_embed.worker" and "cannot start" in record.getMessage()
        for record in ours
    ), [record.getMessage() for record in ours]
    assert [record for record in ours if record.levelno >= logging.WARNING] == []
