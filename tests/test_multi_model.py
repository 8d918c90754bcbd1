"""Several models in one worker, chosen per request: routing, fairness, failures.

The real worker serves the provisioned all-MiniLM-L6-v2 (384 dimensions) beside tiny models of
``st_fixtures`` (32 dimensions, other pooling modes and tokenizers). Vectors are compared with
those of single-model workers; the worker is killed for real; damaged and duplicate model
directories are real directories. No timing is asserted.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from st_fixtures import FIXTURE_TEXTS

from akidb_embed.host_client import (
    BatchEmbeddingRequest,
    EmbeddingClient,
    ModelNotFound,
)
from akidb_embed.models import MODEL_DIR_ENV, MODEL_FILE, ModelMetadata
from akidb_embed.worker.batcher import Batcher, Job
from akidb_embed.worker.config import WorkerConfig
from akidb_embed.worker.engine import Engine

MIN_COSINE = 0.99999
THREADS = 8
CALLS_PER_THREAD = 24
OTHER = "bert_cls"
"""The second model: CLS pooling, its own WordPiece vocabulary, 32 dimensions."""


def min_cosine(actual: npt.NDArray[np.float32], expected: npt.NDArray[np.float32]) -> float:
    dots = np.sum(actual.astype(np.float64) * expected, axis=1)
    norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    return float(np.min(dots / np.maximum(norms, 1e-30)))


@pytest.fixture(scope="module")
def other(tiny_models: dict[str, ModelMetadata]) -> ModelMetadata:
    return tiny_models[OTHER]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return FIXTURE_TEXTS[:96]


@pytest.fixture(scope="module")
def single_model_vectors(
    metadata: ModelMetadata, other: ModelMetadata, texts: list[str]
) -> dict[str, npt.NDArray[np.float32]]:
    """Each model's vectors of ``texts`` from a worker serving that model alone."""
    vectors = {}
    for model in (metadata, other):
        with EmbeddingClient(model.directory) as client:
            vectors[model.model] = client.embed(texts)
    return vectors


@pytest.fixture
def client(metadata: ModelMetadata, other: ModelMetadata) -> Iterator[EmbeddingClient]:
    with EmbeddingClient([metadata.directory, other.directory], request_timeout=120.0) as client:
        yield client


def _interleave(
    client: EmbeddingClient,
    models: list[str],
    texts: list[str],
    on_call: Any = None,
) -> dict[str, list[tuple[list[int], npt.NDArray[np.float32]]]]:
    """THREADS threads, each alternating between the models, each call a few of ``texts``;
    every result by model, with the indices of the texts it embedded."""
    results: dict[str, list[tuple[list[int], npt.NDArray[np.float32]]]] = {m: [] for m in models}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def caller(thread: int) -> None:
        try:
            for call in range(CALLS_PER_THREAD):
                model = models[(thread + call) % len(models)]
                picked = [(thread * 31 + call * 7 + k) % len(texts) for k in range(1 + call % 4)]
                request = BatchEmbeddingRequest(model, [texts[i] for i in picked])
                response = client.embed_batch(request)
                assert response.model == model
                with lock:
                    results[model].append((picked, response.embeddings))
                if on_call is not None:
                    on_call(thread, call)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    return results


def _check(
    results: dict[str, list[tuple[list[int], npt.NDArray[np.float32]]]],
    expected: dict[str, npt.NDArray[np.float32]],
) -> None:
    for model, calls in results.items():
        assert calls, model
        for picked, vectors in calls:
            assert vectors.shape == (len(picked), expected[model].shape[1])
            assert min_cosine(vectors, expected[model][picked]) >= MIN_COSINE, model


def test_interleaved_threads_get_the_vectors_of_single_model_workers(
    client: EmbeddingClient,
    metadata: ModelMetadata,
    other: ModelMetadata,
    texts: list[str],
    single_model_vectors: dict[str, npt.NDArray[np.float32]],
) -> None:
    assert [info.model for info in client.models()] == [metadata.model, OTHER]
    assert client.model_info() == client.models()[0]
    assert client.model_info(OTHER).dimension == other.dimension != metadata.dimension
    results = _interleave(client, [metadata.model, OTHER], texts)
    _check(results, single_model_vectors)
    # a nil model is the default (first) model
    default = client.embed(texts[:3])
    assert min_cosine(default, single_model_vectors[metadata.model][:3]) >= MIN_COSINE


def test_killed_worker_loses_nothing_and_its_successor_serves_both_models(
    client: EmbeddingClient,
    metadata: ModelMetadata,
    texts: list[str],
    single_model_vectors: dict[str, npt.NDArray[np.float32]],
) -> None:
    killed = threading.Event()
    first_pid = client.stats().worker_pid

    def kill_once(thread: int, call: int) -> None:
        if thread == 0 and call == CALLS_PER_THREAD // 3 and not killed.is_set():
            killed.set()
            assert first_pid is not None
            os.kill(first_pid, signal.SIGKILL)

    results = _interleave(client, [metadata.model, OTHER], texts, on_call=kill_once)
    assert killed.is_set()
    _check(results, single_model_vectors)
    stats = client.stats()
    assert stats.restarts >= 1 and stats.worker_pid != first_pid
    assert [info.model for info in client.models()] == [metadata.model, OTHER]


def test_unknown_model_fails_listing_the_loaded_ids(
    client: EmbeddingClient, metadata: ModelMetadata
) -> None:
    with pytest.raises(ModelNotFound) as raised:
        client.embed(["text"], model="no/such-model")
    assert f"{metadata.model!r}, {OTHER!r}" in raised.value.message
    with pytest.raises(ModelNotFound):
        client.model_info("no/such-model")


def test_worker_refuses_an_unknown_model_listing_the_loaded_ids(
    spawn_worker: Any, metadata: ModelMetadata, other: ModelMetadata
) -> None:
    worker = spawn_worker(
        "--model-dir", str(metadata.directory), "--model-dir", str(other.directory)
    )
    reply = worker.request({"id": 3, "op": "embed", "inputs": ["a"], "model": "nope"})
    assert reply["ok"] is False and reply["error"]["code"] == "model_not_found"
    assert reply["error"]["message"] == (
        f"model 'nope' is not loaded; this worker serves {metadata.model!r}, {OTHER!r}"
    )


def test_client_ignoring_models_sees_the_default_model_as_before(
    spawn_worker: Any, metadata: ModelMetadata, other: ModelMetadata
) -> None:
    worker = spawn_worker(
        "--model-dir", str(metadata.directory), "--model-dir", str(other.directory)
    )
    hello = worker.hello
    assert hello["model"] == {
        "model": metadata.model,
        "dimension": metadata.dimension,
        "max_tokens": metadata.max_tokens,
    }
    assert hello["normalize_default"] is metadata.normalize
    reply = worker.request({"id": 4, "op": "embed", "inputs": ["hi"]})
    assert reply["ok"] is True, reply
    assert reply["model"] == metadata.model and reply["shape"] == [1, metadata.dimension]
    other_reply = worker.request({"id": 5, "op": "embed", "inputs": ["hi"], "model": OTHER})
    assert other_reply["shape"] == [1, other.dimension]


def test_model_dirs_from_the_environment_separated_by_pathsep(
    spawn_worker: Any, metadata: ModelMetadata, other: ModelMetadata
) -> None:
    joined = os.pathsep.join([str(other.directory), str(metadata.directory)])
    worker = spawn_worker(env={MODEL_DIR_ENV: joined})
    assert [entry["model"] for entry in worker.hello["models"]] == [OTHER, metadata.model]
    assert worker.hello["model"]["model"] == OTHER


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_corrupted_second_model_fails_the_start_naming_its_directory(
    tmp_path: Path, metadata: ModelMetadata, other: ModelMetadata
) -> None:
    broken = _copy_model(other.directory, tmp_path / "broken-model")
    model_file = broken / MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    with pytest.raises(ModelNotFound, match=str(broken)):
        EmbeddingClient([metadata.directory, broken])


def test_two_directories_of_one_model_fail_the_start_naming_the_second(
    spawn_worker: Any, tmp_path: Path, other: ModelMetadata
) -> None:
    twin = _copy_model(other.directory, tmp_path / "twin")
    worker = spawn_worker("--model-dir", str(other.directory), "--model-dir", str(twin))
    assert worker.hello["ok"] is False
    assert worker.hello["error"]["code"] == "model_not_found"
    assert str(twin) in worker.hello["error"]["message"]
    assert worker.wait() == 4


def test_a_flood_for_one_model_does_not_starve_another(
    metadata: ModelMetadata, other: ModelMetadata
) -> None:
    """Round-robin between models: a request for the second model, queued behind many big ones
    for the first, finishes after at most one snapshot of the first model's texts."""
    config = WorkerConfig(model_dir=metadata.directory, max_batch_tokens=64)
    first, second = Engine.load(config), Engine.load(config, other.directory)
    finished: list[str] = []
    done = threading.Event()
    flood = 30

    def on_done(job: Job) -> None:
        assert job.error is None, job.error
        finished.append("second" if job.engine is second else "first")
        if len(finished) == flood + 1:
            done.set()

    batcher = Batcher([first, second], max_batch_tokens=64, max_pending_texts=100_000)
    texts = FIXTURE_TEXTS[100:110]
    for request_id in range(flood):
        batcher.submit(Job(request_id, first.tokenize(texts), True, on_done, engine=first))
    batcher.submit(Job(flood, second.tokenize(["a query"]), True, on_done, engine=second))
    batcher.start()
    assert done.wait(300)
    batcher.close()
    batcher.join(60)
    assert finished.count("second") == 1
    assert finished.index("second") < flood // 2, finished


def test_raw_frames_choose_a_prompt_and_fall_back_to_the_models_normalize_default(
    spawn_worker: Any, tiny_models: dict[str, ModelMetadata]
) -> None:
    prompts, raw = tiny_models["mpnet_prompts"], tiny_models["bert_max"]
    worker = spawn_worker("--model-dir", str(prompts.directory), "--model-dir", str(raw.directory))
    entries = {entry["model"]: entry for entry in worker.hello["models"]}
    assert set(entries["mpnet_prompts"]["prompts"]) >= {"query", "passage"}
    assert entries["bert_max"]["normalize_default"] is False
    plain = worker.request({"id": 1, "op": "embed", "inputs": ["a cat"], "model": "mpnet_prompts"})
    query = worker.request(
        {
            "id": 2,
            "op": "embed",
            "inputs": ["a cat"],
            "model": "mpnet_prompts",
            "prompt_name": "query",
        }
    )
    assert plain["ok"] and query["ok"] and plain["embeddings"] != query["embeddings"]
    assert query["usage"]["total_tokens"] > plain["usage"]["total_tokens"]
    unknown = worker.request(
        {"id": 3, "op": "embed", "inputs": ["a cat"], "model": "mpnet_prompts", "prompt_name": "x"}
    )
    assert unknown["error"]["code"] == "invalid_input"
    assert "'query'" in unknown["error"]["message"]
    default = worker.request({"id": 4, "op": "embed", "inputs": ["a cat"], "model": "bert_max"})
    vector = np.frombuffer(default["embeddings"], dtype="<f4")
    assert abs(float(np.linalg.norm(vector)) - 1.0) > 0.01  # nil normalize: the model's (off)
    normalized = worker.request(
        {"id": 5, "op": "embed", "inputs": ["a cat"], "model": "bert_max", "normalize": True}
    )
    unit = np.frombuffer(normalized["embeddings"], dtype="<f4")
    assert abs(float(np.linalg.norm(unit)) - 1.0) < 1e-5
