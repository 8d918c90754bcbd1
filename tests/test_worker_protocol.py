"""A real worker, one process shared by this module, driven through raw frames on its stdio:
hello, info, health, ping, embeddings against the golden vectors, batching, and an error reply
for every malformed request after which the worker keeps serving."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from akidb_embed import __version__
from akidb_embed.models import ModelMetadata
from akidb_embed.wire import LENGTH_PREFIX, embeddings_from_bytes
from akidb_embed.worker.config import WorkerConfig

GOLDEN = Path(__file__).resolve().parent / "golden"
MIN_COSINE = 0.99999

_ids = itertools.count(100)


def new_id() -> int:
    return next(_ids)


def vectors_of(reply: dict[str, Any]) -> np.ndarray:
    assert reply["ok"] is True, reply
    return embeddings_from_bytes(reply["embeddings"], tuple(reply["shape"]))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def embed(worker: Any, inputs: list[str], **fields: Any) -> dict[str, Any]:
    reply: dict[str, Any] = worker.request(
        {"id": new_id(), "op": "embed", "inputs": inputs, **fields}
    )
    return reply


def assert_still_serving(worker: Any) -> None:
    request_id = new_id()
    assert worker.request({"id": request_id, "op": "ping"}) == {"id": request_id, "ok": True}


# -- hello, info, health, ping -------------------------------------------------------------


def test_hello_announces_protocol_model_providers_and_limits(
    shared_worker: Any, metadata: ModelMetadata
) -> None:
    hello = shared_worker.hello
    assert hello["op"] == "hello"
    assert hello["ok"] is True
    assert hello["protocol"] == 1
    assert hello["worker_version"] == __version__
    assert hello["pid"] == shared_worker.process.pid
    assert hello["model"] == {
        "model": metadata.model,
        "dimension": metadata.dimension,
        "max_tokens": metadata.max_tokens,
    }
    assert hello["normalize_default"] is metadata.normalize
    assert hello["models"] == [_model_entry(metadata)]
    assert hello["providers"] == ["CPUExecutionProvider"]  # CPU-only onnxruntime on this machine
    assert hello["limits"] == WorkerConfig().limits()


def _model_entry(metadata: ModelMetadata) -> dict[str, Any]:
    return {
        "model": metadata.model,
        "dimension": metadata.dimension,
        "max_tokens": metadata.max_tokens,
        "normalize_default": metadata.normalize,
        "pooling": metadata.pooling,
        "prompts": list(metadata.prompts),
        "default_prompt_name": metadata.default_prompt_name,
    }


def test_info_is_akidb_model_info(shared_worker: Any, metadata: ModelMetadata) -> None:
    request_id = new_id()
    assert shared_worker.request({"id": request_id, "op": "info"}) == {
        "id": request_id,
        "ok": True,
        "model": metadata.model,
        "dimension": metadata.dimension,
        "max_tokens": metadata.max_tokens,
        "normalize_default": metadata.normalize,
        "models": [_model_entry(metadata)],
        "providers": ["CPUExecutionProvider"],
    }


def test_health_runs_a_real_embedding(shared_worker: Any, metadata: ModelMetadata) -> None:
    request_id = new_id()
    reply = shared_worker.request({"id": request_id, "op": "health"})
    assert reply["id"] == request_id
    assert reply["ok"] is True, reply
    assert reply["status"] == "ok"
    assert reply["dimension"] == metadata.dimension
    assert abs(reply["norm"] - 1.0) < 1e-3
    assert reply["duration_ms"] > 0


def test_live_worker_answers_golden_ping_with_golden_bytes(shared_worker: Any) -> None:
    shared_worker.send_bytes((GOLDEN / "ping_request.bin").read_bytes())
    payload = shared_worker.recv_payload()
    assert LENGTH_PREFIX.pack(len(payload)) + payload == (GOLDEN / "ping_reply.bin").read_bytes()


def test_live_worker_answers_golden_unknown_op_with_golden_bytes(shared_worker: Any) -> None:
    shared_worker.send_bytes((GOLDEN / "unknown_op_request.bin").read_bytes())
    payload = shared_worker.recv_payload()
    expected = (GOLDEN / "unknown_op_reply.bin").read_bytes()
    assert LENGTH_PREFIX.pack(len(payload)) + payload == expected


def test_live_worker_embeds_the_golden_embed_request(
    shared_worker: Any, metadata: ModelMetadata
) -> None:
    shared_worker.send_bytes((GOLDEN / "embed_request.bin").read_bytes())
    reply = shared_worker.recv()
    assert reply["id"] == 7
    assert reply["model"] == metadata.model
    assert reply["shape"] == [1, metadata.dimension]
    assert len(reply["embeddings"]) == metadata.dimension * 4


# -- embeddings ----------------------------------------------------------------------------


def test_embeddings_match_the_golden_vectors(
    shared_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    reply = embed(shared_worker, golden["sentences"], model=metadata.model)
    vectors = vectors_of(reply)
    expected = np.asarray(golden["embeddings"], dtype=np.float32)
    assert reply["model"] == metadata.model
    assert reply["shape"] == [len(golden["sentences"]), metadata.dimension]
    assert cosines(vectors, expected).min() >= MIN_COSINE
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert reply["usage"]["total_tokens"] == sum(golden["token_counts"])
    assert reply["usage"]["duration_ms"] > 0


def test_normalize_false_keeps_the_direction_but_not_unit_length(
    shared_worker: Any, golden: dict[str, Any]
) -> None:
    raw = vectors_of(embed(shared_worker, golden["sentences"], normalize=False))
    expected = np.asarray(golden["embeddings"], dtype=np.float32)
    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1.0) > 1e-3)
    assert cosines(raw, expected).min() >= MIN_COSINE


def test_truncate_false_rejects_an_overlong_input_naming_its_index_and_length(
    shared_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    long_index = golden["token_counts"].index(metadata.max_tokens)  # a golden text was cut
    tokenizer = Tokenizer.from_file(str(metadata.path("tokenizer.json")))
    tokenizer.no_truncation()
    real_length = len(tokenizer.encode(golden["sentences"][long_index]).ids)
    inputs = ["short one", golden["sentences"][long_index]]
    request_id = new_id()
    reply = shared_worker.request(
        {"id": request_id, "op": "embed", "inputs": inputs, "truncate": False}
    )
    assert reply["id"] == request_id
    assert reply["ok"] is False
    assert reply["error"]["code"] == "invalid_input"
    assert reply["error"]["message"].startswith(f"inputs[1] has {real_length} tokens")
    assert reply["error"]["index"] == 1
    assert real_length > metadata.max_tokens


def test_truncate_false_accepts_inputs_within_max_tokens(shared_worker: Any) -> None:
    reply = embed(shared_worker, ["a short sentence", ""], truncate=False)
    assert reply["ok"] is True
    assert reply["shape"][0] == 2


def test_many_requests_in_flight_get_their_own_replies_in_any_order(
    shared_worker: Any, golden: dict[str, Any]
) -> None:
    sentences = golden["sentences"]
    expected = np.asarray(golden["embeddings"], dtype=np.float32)
    requests = {}
    for n in range(60):
        picks = [(n * 7 + k) % len(sentences) for k in range(1 + n % 5)]
        requests[new_id()] = picks
    shared_worker.send(
        *(
            {"id": i, "op": "embed", "inputs": [sentences[p] for p in picks]}
            for i, picks in requests.items()
        )
    )
    replies = {reply["id"]: reply for reply in shared_worker.recv_many(len(requests))}
    assert replies.keys() == requests.keys()
    for request_id, picks in requests.items():
        vectors = vectors_of(replies[request_id])
        assert cosines(vectors, expected[picks]).min() >= MIN_COSINE
        expected_tokens = sum(golden["token_counts"][p] for p in picks)
        assert replies[request_id]["usage"]["total_tokens"] == expected_tokens


def test_request_larger_than_max_batch_tokens_is_served(
    shared_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    long_index = golden["token_counts"].index(metadata.max_tokens)
    copies = 2 * shared_worker.hello["limits"]["max_batch_tokens"] // metadata.max_tokens + 3
    reply = embed(shared_worker, [golden["sentences"][long_index]] * copies)
    vectors = vectors_of(reply)
    assert reply["usage"]["total_tokens"] == copies * metadata.max_tokens
    expected = np.asarray(golden["embeddings"][long_index], dtype=np.float32)
    assert cosines(vectors, np.tile(expected, (copies, 1))).min() >= MIN_COSINE


# -- malformed requests: an error reply, then the worker keeps serving ---------------------

TOO_MANY_TEXTS = WorkerConfig().max_texts_per_request + 1
TOO_MANY_BYTES = WorkerConfig().max_text_bytes + 1

MALFORMED: list[tuple[str, Any, bool, str]] = [
    # (case, payload: bytes as is or a message to pack, id echoed?, code)
    ("bad msgpack", b"\xc1\x00", False, "protocol_error"),
    ("truncated msgpack inside the frame", b"\x82\xa2id", False, "protocol_error"),
    ("not a map", msgpack.packb([1, 2, 3]), False, "protocol_error"),
    ("non-string key", msgpack.packb({1: 2}), False, "protocol_error"),
    ("missing id", {"op": "ping"}, False, "protocol_error"),
    ("mistyped id", {"id": "seven", "op": "ping"}, False, "protocol_error"),
    ("negative id", {"id": -3, "op": "ping"}, False, "protocol_error"),
    ("missing op", {"id": None}, True, "protocol_error"),
    ("mistyped op", {"id": None, "op": 42}, True, "protocol_error"),
    ("unknown op", {"id": None, "op": "transmogrify"}, True, "protocol_error"),
    ("embed without inputs", {"id": None, "op": "embed"}, True, "invalid_input"),
    ("inputs not an array", {"id": None, "op": "embed", "inputs": "text"}, True, "invalid_input"),
    ("empty inputs", {"id": None, "op": "embed", "inputs": []}, True, "invalid_input"),
    ("non-string input", {"id": None, "op": "embed", "inputs": ["a", 5]}, True, "invalid_input"),
    ("bytes input", {"id": None, "op": "embed", "inputs": [b"raw"]}, True, "invalid_input"),
    ("mistyped normalize", {"id": None, "op": "embed", "inputs": ["a"], "normalize": "yes"},
     True, "invalid_input"),
    ("mistyped truncate", {"id": None, "op": "embed", "inputs": ["a"], "truncate": 0},
     True, "invalid_input"),
    ("mistyped model", {"id": None, "op": "embed", "inputs": ["a"], "model": 3},
     True, "invalid_input"),
    ("another model", {"id": None, "op": "embed", "inputs": ["a"], "model": "bert-base-uncased"},
     True, "model_not_found"),
    ("too many texts", {"id": None, "op": "embed", "inputs": ["a"] * TOO_MANY_TEXTS},
     True, "invalid_input"),
    ("too many bytes", {"id": None, "op": "embed", "inputs": ["a" * TOO_MANY_BYTES]},
     True, "invalid_input"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "echoes_id", "code"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_request_gets_an_error_reply_and_the_worker_keeps_serving(
    shared_worker: Any, payload: Any, echoes_id: bool, code: str
) -> None:
    request_id = new_id()
    if isinstance(payload, dict):
        payload = msgpack.packb(
            {k: (request_id if k == "id" and v is None else v) for k, v in payload.items()}
        )
    shared_worker.send_bytes(LENGTH_PREFIX.pack(len(payload)) + payload)
    reply = shared_worker.recv()
    assert reply["ok"] is False
    assert reply["id"] == (request_id if echoes_id else None)
    assert reply["error"]["code"] == code
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    assert_still_serving(shared_worker)


# -- fuzzing the live worker ---------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=10)
)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
random_requests = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(min_value=0, max_value=2**64 - 1) | values,
        "op": st.sampled_from(["embed", "info", "health", "ping", "nope"]) | values,
        "inputs": st.lists(st.text(max_size=30), max_size=4) | values,
        "model": values,
        "normalize": st.booleans() | values,
        "truncate": st.booleans() | values,
        "extra": values,
    },
)


@settings(max_examples=80, deadline=None)
@given(message=random_requests)
def test_random_requests_each_get_one_reply_and_the_worker_keeps_serving(
    shared_worker: Any, message: dict[str, Any]
) -> None:
    assume(message.get("op") != "shutdown")
    shared_worker.send(message)
    reply = shared_worker.recv()
    assert isinstance(reply["ok"], bool)
    request_id = message.get("id")
    if isinstance(request_id, int) and not isinstance(request_id, bool) and request_id >= 0:
        assert reply["id"] == request_id
    else:
        assert reply["id"] is None
    if not reply["ok"]:
        assert reply["error"]["code"] in {"protocol_error", "invalid_input", "model_not_found"}
    assert_still_serving(shared_worker)


def test_worker_stderr_has_no_traceback_after_all_this(shared_worker: Any) -> None:
    assert "Traceback" not in shared_worker.stderr()
    assert shared_worker.process.poll() is None
