"""The embed request's options against sentence-transformers on the same model (the weights the
default model was exported from): ``dimensions`` (its ``truncate_dim``), ``encoding`` (its
``quantize_embeddings``), ``truncation_side`` (its tokenizer's ``truncation_side``), and the
``tokenize`` op (its tokenizer's ids); int8/uint8 codes that do not depend on the batch; every
bad value refused with ``invalid_input`` naming its field, by the worker and by the client."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from akidb_embed.bench.corpus import build_corpus
from akidb_embed.encodings import ENCODINGS, dequantize, quantization_ranges
from akidb_embed.errors import InvalidInput
from akidb_embed.host_client import EmbeddingClient
from akidb_embed.models import METADATA_FILE, ModelMetadata, verify_model_dir
from akidb_embed.models.metadata import CALIBRATION_FILE
from akidb_embed.models.sources import export_package_model_dir, read_model_config
from akidb_embed.wire import LENGTH_PREFIX, embeddings_from_bytes, unpack

MIN_COSINE = 0.99999
ZERO_NOISE = 1e-5
"""A component closer to zero than this may take either sign between two float pipelines."""
LONG = "the quick brown fox jumps over the lazy dog near the river bank " * 40
"""Far past max_tokens=256: truncation decides what is embedded."""
TEXTS = [
    "a cat on a mat",
    "café ☕ and a croissant",
    "vector databases store embeddings for nearest-neighbour search",
    "",
    LONG,
    "the end of this text is what left truncation keeps " + LONG + " and this is its end",
    *build_corpus(40),
]

_ids = itertools.count(50_000)


@pytest.fixture(scope="module")
def client(metadata: ModelMetadata) -> Iterator[EmbeddingClient]:
    with EmbeddingClient(metadata.directory) as client:
        yield client


@pytest.fixture(scope="module")
def reference() -> Any:
    """sentence-transformers with the default model's original weights (CPU, offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model_dir = export_package_model_dir()
    assert model_dir is not None, "the export extra (make venv) ships the reference weights"
    return SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def _encode(reference: Any, texts: list[str], **options: Any) -> np.ndarray:
    vectors: np.ndarray = reference.encode(texts, convert_to_numpy=True, batch_size=16, **options)
    return vectors


@pytest.fixture(scope="module")
def reference_normalised(reference: Any) -> Callable[[int | None], np.ndarray]:
    """sentence-transformers' normalised vectors of TEXTS cut to ``dimensions`` (its
    ``truncate_dim``), each computed once for the module's tests."""
    computed: dict[int | None, np.ndarray] = {}

    def vectors(dimensions: int | None) -> np.ndarray:
        if dimensions not in computed:
            options = {"truncate_dim": dimensions, "normalize_embeddings": True}
            computed[dimensions] = _encode(reference, TEXTS, **options)
        return computed[dimensions]

    return vectors


# -- dimensions ------------------------------------------------------------------------------


@pytest.mark.parametrize("dimensions", [384, 256, 64, 1])
def test_dimensions_equal_truncate_dim_then_normalisation(
    client: EmbeddingClient,
    reference_normalised: Callable[[int | None], np.ndarray],
    dimensions: int,
) -> None:
    ours = client.embed(TEXTS, dimensions=dimensions)
    theirs = reference_normalised(dimensions)
    assert ours.shape == theirs.shape == (len(TEXTS), dimensions)
    assert ours.dtype == np.float32
    if dimensions > 1:  # one component normalised is its sign: compared below
        assert _cosines(ours, theirs).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_dimensions_without_normalisation_are_the_first_components(
    client: EmbeddingClient,
) -> None:
    whole = client.embed(TEXTS, normalize=False)
    cut = client.embed(TEXTS, normalize=False, dimensions=100)
    np.testing.assert_array_equal(cut, whole[:, :100])


# -- encodings -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["binary", "ubinary"])
@pytest.mark.parametrize("dimensions", [None, 128])
def test_packed_encodings_equal_quantize_embeddings_bit_for_bit(
    client: EmbeddingClient,
    reference_normalised: Callable[[int | None], np.ndarray],
    encoding: str,
    dimensions: int | None,
) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    floats = reference_normalised(dimensions)
    theirs = quantize_embeddings(floats, precision=encoding)
    ours = client.embed(TEXTS, dimensions=dimensions, encoding=encoding)
    assert ours.dtype == theirs.dtype == ENCODINGS[encoding]
    assert ours.shape == theirs.shape == (len(TEXTS), floats.shape[1] // 8)
    our_bits = np.unpackbits(ours.view(np.uint8), axis=1).astype(bool)
    their_bits = np.unpackbits(theirs.view(np.uint8), axis=1).astype(bool)
    decided = np.abs(floats) > ZERO_NOISE
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(our_bits[decided], their_bits[decided])


@pytest.mark.parametrize("encoding", ["int8", "uint8"])
@pytest.mark.parametrize("dimensions", [None, 192])
def test_scalar_encodings_are_quantize_embeddings_over_the_calibrated_ranges(
    client: EmbeddingClient, metadata: ModelMetadata, encoding: str, dimensions: int | None
) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    floats = client.embed(TEXTS, dimensions=dimensions)
    calibration = np.load(metadata.path(CALIBRATION_FILE))
    ranges = quantization_ranges(calibration, floats.shape[1], normalize=True)
    np.testing.assert_array_equal(client.quantization_ranges(dimensions=dimensions), ranges)
    ours = client.embed(TEXTS, dimensions=dimensions, encoding=encoding)
    theirs = quantize_embeddings(floats, precision=encoding, ranges=ranges)
    assert ours.dtype == theirs.dtype == ENCODINGS[encoding]
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("encoding", ["int8", "uint8", "binary", "float16"])
def test_a_text_quantises_the_same_alone_and_in_a_batch_of_200(
    client: EmbeddingClient, encoding: str
) -> None:
    batch = build_corpus(200)
    together = client.embed(batch, encoding=encoding)
    for index in (0, 57, 199):
        alone = client.embed([batch[index]], encoding=encoding)
        assert alone.tobytes() == together[index].tobytes(), index


def test_float16_is_the_float32_vectors_rounded(client: EmbeddingClient) -> None:
    halves = client.embed(TEXTS, encoding="float16", dimensions=200)
    assert halves.dtype == np.float16
    np.testing.assert_array_equal(halves, client.embed(TEXTS, dimensions=200).astype(np.float16))


def test_int8_codes_keep_the_nearest_neighbours_of_float32(client: EmbeddingClient) -> None:
    corpus = build_corpus(300)
    floats = client.embed(corpus)
    codes = client.embed(corpus, encoding="int8")
    recall = _recall_at_10(floats, dequantize(codes, "int8", client.quantization_ranges()))
    assert recall >= 0.95, recall


def test_quantization_ranges_follow_dimensions_and_normalisation(
    client: EmbeddingClient, shared_worker: Any
) -> None:
    whole = client.quantization_ranges()
    assert whole.shape == (2, 384) and (whole[0] < whole[1]).all()
    raw = client.quantization_ranges(normalize=False, dimensions=100)
    assert raw.shape == (2, 100)
    np.testing.assert_array_equal(raw, client.quantization_ranges(normalize=False)[:, :100])
    with pytest.raises(InvalidInput, match=r"^dimensions must be from 1 to 384"):
        client.quantization_ranges(dimensions=500)
    request = {"id": next(_ids), "op": "quantization_ranges", "dimensions": 0}
    assert shared_worker.request(request)["error"]["code"] == "invalid_input"


def _recall_at_10(floats: np.ndarray, codes: np.ndarray) -> float:
    """Share of each text's 10 nearest neighbours by float32 cosine found among its 10 nearest
    by the codes' dot product (the text itself excluded)."""
    exact = floats @ floats.T
    approx = codes @ codes.T
    np.fill_diagonal(exact, -np.inf)
    np.fill_diagonal(approx, -np.inf)
    truth = np.argsort(-exact, axis=1)[:, :10]
    found = np.argsort(-approx, axis=1)[:, :10]
    hits = [len(set(t) & set(f)) for t, f in zip(truth, found, strict=True)]
    return float(np.mean(hits) / 10)


# -- truncation side and tokenize ------------------------------------------------------------


def test_left_truncation_equals_sentence_transformers_left_truncation(
    client: EmbeddingClient, reference: Any
) -> None:
    reference.tokenizer.truncation_side = "left"
    try:
        theirs = _encode(reference, TEXTS)
    finally:
        reference.tokenizer.truncation_side = "right"
    ours = client.embed(TEXTS, truncation_side="left")
    assert _cosines(ours, theirs).min() >= MIN_COSINE
    right = client.embed(TEXTS)
    assert _cosines(ours[4:6], right[4:6]).max() < 0.99, "left and right differ on long texts"
    np.testing.assert_array_equal(ours[:4], right[:4])  # short texts are not cut at all


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_ids_and_counts_equal_the_reference_tokenizer(
    client: EmbeddingClient, reference: Any, metadata: ModelMetadata, side: str
) -> None:
    tokenizer = reference.tokenizer
    tokenizer.truncation_side = side
    try:
        theirs = tokenizer(TEXTS, truncation=True, max_length=metadata.max_tokens)["input_ids"]
    finally:
        tokenizer.truncation_side = "right"
    assert client.tokenize(TEXTS, truncation_side=side) == theirs
    assert client.count_tokens(TEXTS, truncation_side=side) == [len(ids) for ids in theirs]
    assert client.count_tokens([LONG], truncate=True) == [metadata.max_tokens]


def test_token_counts_are_the_usage_of_embedding_the_same_texts(
    client: EmbeddingClient, metadata: ModelMetadata
) -> None:
    from akidb_embed.host_client import BatchEmbeddingRequest

    response = client.embed_batch(BatchEmbeddingRequest(None, TEXTS))
    assert response.usage.total_tokens == sum(client.count_tokens(TEXTS))


def test_tokenize_without_truncation_names_the_over_long_text(client: EmbeddingClient) -> None:
    with pytest.raises(InvalidInput, match=r"^inputs\[4\] has \d+ tokens") as raised:
        client.count_tokens(TEXTS, truncate=False)
    assert raised.value.index == 4


def test_tokenize_splits_more_texts_than_one_request_holds(client: EmbeddingClient) -> None:
    texts = [f"text number {i}" for i in range(2500)]  # max_texts_per_request is 1024
    counts = client.count_tokens(texts)
    assert len(counts) == 2500
    for index in (0, 1023, 1024, 2047, 2048, 2499):  # each in its place, across the requests
        assert counts[index] == client.count_tokens([texts[index]])[0]
    assert counts[7] == 5 and counts[2499] == 6  # "2499": "249", "##9"


# -- bad values ------------------------------------------------------------------------------

BAD_FIELDS = [
    ({"dimensions": 0}, "dimensions must be 1 or more, not 0"),
    ({"dimensions": 385}, "dimensions must be from 1 to 384"),
    ({"dimensions": "64"}, "dimensions must be an integer or nil, not a string"),
    ({"dimensions": 1.5}, "dimensions must be an integer or nil, not a float"),
    ({"dimensions": True}, "dimensions must be an integer or nil, not a boolean"),
    ({"dimensions": 100, "encoding": "binary"}, "dimensions 100 is not a multiple of 8"),
    ({"encoding": "int4"}, "encoding must be one of float32, float16, int8, uint8, binary"),
    ({"encoding": 8}, "encoding must be a string or nil, not an integer"),
    ({"truncation_side": "middle"}, "truncation_side must be one of right, left, not 'middle'"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_FIELDS)
def test_the_worker_refuses_a_bad_option_naming_the_field(
    shared_worker: Any, fields: dict[str, Any], message: str
) -> None:
    request_id = next(_ids)
    reply = shared_worker.request({"id": request_id, "op": "embed", "inputs": ["x"], **fields})
    assert reply["id"] == request_id and reply["ok"] is False
    assert reply["error"]["code"] == "invalid_input"
    assert reply["error"]["message"].startswith(message), reply["error"]["message"]
    assert shared_worker.request({"id": request_id, "op": "ping"})["ok"] is True


def test_the_worker_refuses_a_bad_tokenize_option(shared_worker: Any) -> None:
    request_id = next(_ids)
    reply = shared_worker.request(
        {"id": request_id, "op": "tokenize", "inputs": ["x"], "truncation_side": 1}
    )
    assert reply["error"]["code"] == "invalid_input"
    assert reply["error"]["message"] == "truncation_side must be a string or nil, not an integer"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dimensions": 0}, "dimensions must be from 1 to 384"),
        ({"dimensions": 999}, "dimensions must be from 1 to 384"),
        ({"dimensions": 12, "encoding": "ubinary"}, "dimensions 12 is not a multiple of 8"),
        ({"encoding": "float64"}, "encoding must be one of float32, float16"),
        ({"truncation_side": "both"}, "truncation_side must be 'right' or 'left'"),
    ],
)
def test_the_client_refuses_a_bad_option_before_sending_it(
    client: EmbeddingClient, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInput, match=f"^{message}"):
        client.embed(["x"], **options)


# -- the wire --------------------------------------------------------------------------------


def test_a_reply_names_its_dtype_when_the_request_names_an_encoding(shared_worker: Any) -> None:
    request = {"id": next(_ids), "op": "embed", "inputs": ["a", "b"]}
    plain = shared_worker.request(request)
    assert "dtype" not in plain and plain["shape"] == [2, 384]
    packed = shared_worker.request({**request, "encoding": "ubinary", "dimensions": 256})
    assert packed["dtype"] == "ubinary" and packed["shape"] == [2, 32]
    assert len(packed["embeddings"]) == 64
    half = shared_worker.request({**request, "encoding": "float32", "dimensions": 3})
    assert half["dtype"] == "float32" and half["shape"] == [2, 3]
    vectors = embeddings_from_bytes(half["embeddings"], (2, 3))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


GOLDEN = Path(__file__).resolve().parent / "golden"


def test_live_worker_answers_the_golden_tokenize_request_with_golden_bytes(
    shared_worker: Any,
) -> None:
    shared_worker.send_bytes((GOLDEN / "tokenize_request.bin").read_bytes())
    payload = shared_worker.recv_payload()
    expected = (GOLDEN / "tokenize_reply.bin").read_bytes()
    assert LENGTH_PREFIX.pack(len(payload)) + payload == expected


def test_live_worker_answers_the_golden_options_request_with_the_golden_bits(
    shared_worker: Any,
) -> None:
    shared_worker.send_bytes((GOLDEN / "embed_options_request.bin").read_bytes())
    reply = shared_worker.recv()
    expected = unpack((GOLDEN / "embed_options_reply.bin").read_bytes()[4:])
    assert list(reply) == list(expected)
    for key in ("id", "ok", "model", "shape", "dtype", "embeddings"):
        assert reply[key] == expected[key], key
    assert reply["usage"]["total_tokens"] == expected["usage"]["total_tokens"]


def test_the_hello_lists_each_models_encodings(shared_worker: Any) -> None:
    (entry,) = shared_worker.hello["models"]
    assert entry["encodings"] == list(ENCODINGS)
    assert "matryoshka_dimensions" not in entry  # all-MiniLM-L6-v2 lists none


def test_int8_without_calibration_says_how_to_add_it(
    spawn_worker: Any, metadata: ModelMetadata, tmp_path: Path
) -> None:
    older = tmp_path / "older-model"
    older.mkdir()
    for name in ("model.onnx", "tokenizer.json", "golden.json"):
        (older / name).symlink_to(metadata.path(name))
    document = json.loads(metadata.path(METADATA_FILE).read_text(encoding="utf-8"))
    del document["calibration"]
    del document["files"][CALIBRATION_FILE]
    (older / METADATA_FILE).write_text(json.dumps(document), encoding="utf-8")
    worker = spawn_worker("--model-dir", str(older))
    assert worker.hello["models"][0]["encodings"] == ["float32", "float16", "binary", "ubinary"]
    request = {"id": 1, "op": "embed", "inputs": ["x"], "encoding": "uint8"}
    error = worker.request(request)["error"]
    assert error["code"] == "invalid_input"
    assert "encoding 'uint8' needs the calibration vectors" in error["message"]
    assert f"python -m akidb_embed.models provision --model-dir {older}" in error["message"]
    assert worker.request({**request, "id": 2, "encoding": "binary"})["ok"] is True


def test_provisioning_adds_calibration_to_a_directory_that_lacks_it(
    tiny_models: dict[str, ModelMetadata], tmp_path: Path
) -> None:
    from akidb_embed.models.provision import CALIBRATED, NOTHING_TO_DO, provision

    metadata = tiny_models["bert_cls"]  # normalised: its Normalize comes after the pooled vectors
    older = tmp_path / "older-model"
    shutil.copytree(metadata.directory, older, ignore=shutil.ignore_patterns(CALIBRATION_FILE))
    document = json.loads((older / METADATA_FILE).read_text(encoding="utf-8"))
    del document["calibration"]
    del document["files"][CALIBRATION_FILE]
    (older / METADATA_FILE).write_text(json.dumps(document), encoding="utf-8")
    result = provision(older, log=lambda message: None)
    assert result.outcome == CALIBRATED
    assert result.metadata.calibration["texts"] == 1000
    vectors = np.load(older / CALIBRATION_FILE)
    assert vectors.shape == (1000, metadata.dimension) and vectors.dtype == np.float32
    # unnormalised pooled vectors: the model's Normalize comes after them
    assert np.abs(np.linalg.norm(vectors, axis=1) - 1.0).max() > 0.1
    assert provision(older, log=lambda message: None).outcome == NOTHING_TO_DO
    assert verify_model_dir(older) == []


# -- Matryoshka dimensions -------------------------------------------------------------------


def test_matryoshka_dimensions_come_from_the_configs_or_the_model_card(tmp_path: Path) -> None:
    source = export_package_model_dir()
    assert source is not None
    listed = tmp_path / "listed"
    shutil.copytree(source, listed, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config_path = listed / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "matryoshka_dimensions": [64, 384, 128, 999]}))
    assert read_model_config(listed).matryoshka_dimensions == (384, 128, 64)
    config_path.write_text(json.dumps(config))
    (listed / "README.md").write_text(
        '---\nlibrary_name: sentence-transformers\n---\n```json\n{\n    "loss": '
        '"MultipleNegativesRankingLoss",\n    "matryoshka_dims": [\n        384,\n        256,\n'
        "        32\n    ],\n}\n```\n",
        encoding="utf-8",
    )
    assert read_model_config(listed).matryoshka_dimensions == (384, 256, 32)
    (listed / "README.md").write_text("no losses here\n", encoding="utf-8")
    assert read_model_config(listed).matryoshka_dimensions == ()


# -- the command line ------------------------------------------------------------------------

CLI = (sys.executable, "-m", "akidb_embed.cli")


def _run_cli(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=300, check=False
    )


def test_cli_writes_each_format_in_the_encoding_asked_for(
    tmp_path: Path, client: EmbeddingClient
) -> None:
    texts = ["one", "two words", "a third text"]
    expected = client.embed(texts, dimensions=128, encoding="int8")
    stdin = "\n".join(texts) + "\n"
    options = ("--dimensions", "128", "--encoding", "int8")
    npy = tmp_path / "codes.npy"
    result = _run_cli("embed", *options, "-o", str(npy), stdin=stdin)
    assert result.returncode == 0, result.stderr
    written = np.load(npy)
    assert written.dtype == np.int8
    np.testing.assert_array_equal(written, expected)
    jsonl = tmp_path / "codes.jsonl"
    assert _run_cli("embed", *options, "-o", str(jsonl), stdin=stdin).returncode == 0
    rows = [json.loads(line)["embedding"] for line in jsonl.read_text().splitlines()]
    np.testing.assert_array_equal(np.asarray(rows, dtype=np.int8), expected)
    parquet = tmp_path / "bits.parquet"
    bits = ("--dimensions", "128", "--encoding", "ubinary")
    assert _run_cli("embed", *bits, "-o", str(parquet), stdin=stdin).returncode == 0
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    column_type = table.schema.field("embedding").type
    assert (str(column_type.value_type), column_type.list_size) == ("uint8", 16)
    packed = np.asarray(table.column("embedding").to_pylist(), dtype=np.uint8)
    np.testing.assert_array_equal(packed, client.embed(texts, dimensions=128, encoding="ubinary"))


def test_cli_refuses_a_bad_encoding_or_dimensions_with_one_line(tmp_path: Path) -> None:
    for args, message in (
        (("--encoding", "int4"), "encoding must be one of float32, float16"),
        (("--dimensions", "0"), "dimensions must be from 1 to 384"),
        (("--dimensions", "20", "--encoding", "binary"), "dimensions 20 is not a multiple of 8"),
    ):
        result = _run_cli("embed", *args, "-o", str(tmp_path / "x.npy"), stdin="one\n")
        assert result.returncode != 0
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_matryoshka_model_announces_its_dimensions(
    tiny_models: dict[str, ModelMetadata], tmp_path: Path, spawn_worker: Any
) -> None:
    from akidb_embed.models.provision import provision

    source = tmp_path / "source"
    shutil.copytree(tiny_models["bert_max"].source["path"], source)
    config_path = source / "config_sentence_transformers.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "matryoshka_dimensions": [16, 32, 8]}))
    result = provision(
        tmp_path / "model", source_dir=source, model_id="tiny-matryoshka", log=lambda m: None
    )
    assert result.metadata.matryoshka_dimensions == (32, 16, 8)
    worker = spawn_worker("--model-dir", str(result.metadata.directory))
    (entry,) = worker.hello["models"]
    assert entry["matryoshka_dimensions"] == [32, 16, 8]
    reply = worker.request({"id": 1, "op": "embed", "inputs": ["a cat"], "dimensions": 16})
    assert reply["shape"] == [1, 16]


def test_the_async_client_takes_the_same_options(metadata: ModelMetadata) -> None:
    import asyncio

    from akidb_embed.host_client import AsyncEmbeddingClient

    async def scenario() -> tuple[np.ndarray, np.ndarray, list[int]]:
        async with AsyncEmbeddingClient(metadata.directory) as client:
            floats = await client.embed(TEXTS[:4], dimensions=64)
            bits = await client.embed(TEXTS[:4], dimensions=64, encoding="binary")
            return floats, bits, await client.count_tokens(TEXTS[:4], truncation_side="left")

    floats, bits, counts = asyncio.run(scenario())
    assert floats.shape == (4, 64) and bits.shape == (4, 8) and bits.dtype == np.int8
    decided = np.abs(floats) > ZERO_NOISE
    signs = np.unpackbits((bits.astype(np.int16) + 128).astype(np.uint8), axis=1).astype(bool)
    np.testing.assert_array_equal(signs[decided], (floats > 0)[decided])
    assert len(counts) == 4 and counts[3] == 2  # TEXTS[3] is "": [CLS] [SEP]
