"""A real worker, one process shared by this module, driven through raw frames on its stdio:
hello, info, health, ping, embeddings against the golden vectors, batching, and an error reply
for every malformed request after which the worker keeps serving. Generated frames are thrown
at a worker in test_worker_generated_frames.py."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import msgpack
import numpy as np
import pytest
from golden_frames import GOLDEN, assert_golden_bytes, golden_reply, send_golden_request
from tokenizers import Tokenizer

from akidb_embed import __version__
from akidb_embed.models import METADATA_FILE, ModelMetadata
from akidb_embed.wire import LENGTH_PREFIX, MAX_NESTING, embeddings_from_bytes
from akidb_embed.worker.config import WorkerConfig, size_lanes, usable_cores

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
    # sized from this machine's cores (worker/config.py size_lanes)
    assert (hello["lanes"], hello["threads"]) == size_lanes(usable_cores())


def _model_entry(metadata: ModelMetadata) -> dict[str, Any]:
    """The model's entry as protocol.md lists it, from what the model directory's metadata file
    states (``normalize`` as ``normalize_default``, the prompts by name), with every encoding."""
    stated = json.loads(metadata.path(METADATA_FILE).read_text())
    as_stated = ("model", "dimension", "max_tokens", "pooling", "default_prompt_name")
    return {
        **{name: stated[name] for name in as_stated},
        "normalize_default": stated["normalize"],
        "prompts": list(stated["prompts"]),
        "variant": stated.get("variant"),
        "base_model": stated.get("base_model"),
        "encodings": ["float32", "float16", "int8", "uint8", "binary", "ubinary"],
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
        "lanes": shared_worker.hello["lanes"],
        "threads": shared_worker.hello["threads"],
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


@pytest.mark.parametrize(
    "case", ["invalid_utf8", "non_string_key", "float_id", "too_deep", "unknown_op", "ping"]
)
def test_live_worker_answers_golden_requests_with_golden_bytes(
    shared_worker: Any, case: str
) -> None:
    send_golden_request(shared_worker, case)
    assert_golden_bytes(shared_worker, case)


def test_an_id_comes_back_by_value_in_its_shortest_form(shared_worker: Any) -> None:
    # id 7 written as a uint 64 (cf 00 00 00 00 00 00 00 07), as some encoders do for big types
    payload = b"\x82\xa2id\xcf" + (7).to_bytes(8, "big") + b"\xa2op\xa4ping"
    shared_worker.send_bytes(LENGTH_PREFIX.pack(len(payload)) + payload)
    assert shared_worker.recv_payload() == b"\x82\xa2id\x07\xa2ok\xc3"


def test_live_worker_refuses_the_golden_duplicate_id_with_golden_bytes(
    shared_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    long_text = golden["sentences"][golden["token_counts"].index(metadata.max_tokens)]
    shared_worker.send({"id": 15, "op": "embed", "inputs": [long_text] * 12})
    send_golden_request(shared_worker, "duplicate_id")
    assert_golden_bytes(shared_worker, "duplicate_id")
    assert vectors_of(shared_worker.recv()).shape == (12, metadata.dimension)


def test_live_worker_answers_the_golden_embed_request_with_the_reference_vectors(
    shared_worker: Any,
) -> None:
    reply = golden_reply(shared_worker, "embed_two_texts", ("id", "ok", "model", "shape"))
    reference = json.loads((GOLDEN / "embed_two_texts_vectors.json").read_text(encoding="utf-8"))
    vectors = vectors_of(reply)
    assert cosines(vectors, np.asarray(reference["embeddings"])).min() >= MIN_COSINE


def test_live_worker_embeds_the_golden_embed_request(
    shared_worker: Any, metadata: ModelMetadata
) -> None:
    send_golden_request(shared_worker, "embed")
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


TRACE_MARKS = ("read", "parsed", "tokenized", "started", "ran", "pooled")


def test_trace_gives_the_stages_of_a_lone_request_run_without_the_queue(
    shared_worker: Any, golden: dict[str, Any]
) -> None:
    reply = embed(shared_worker, [golden["sentences"][0]], trace=True)
    vectors_of(reply)
    trace = reply["trace"]
    marks = [trace[name] for name in TRACE_MARKS]
    assert marks == sorted(marks), trace
    assert trace["encode_ns"] > 0
    # nothing else was in flight: the reader ran it at once, without queueing it
    assert "queued" not in trace
    assert "trace" not in embed(shared_worker, [golden["sentences"][0]])


def test_requests_arriving_together_go_through_the_queue_and_share_runs(
    shared_worker: Any, golden: dict[str, Any]
) -> None:
    sentences = golden["sentences"]
    requests = [
        {"id": new_id(), "op": "embed", "inputs": [sentences[n]], "trace": True} for n in range(8)
    ]
    shared_worker.send(*requests)  # one write: the worker reads them back to back
    replies = {reply["id"]: reply for reply in shared_worker.recv_many(len(requests))}
    traces = [replies[request["id"]]["trace"] for request in requests]
    assert all("queued" in trace for trace in traces[1:]), traces
    # runs shared: fewer distinct run starts than requests
    assert len({trace["started"] for trace in traces}) < len(requests)
    expected = np.asarray(golden["embeddings"], dtype=np.float32)
    for n, request in enumerate(requests):
        assert cosines(vectors_of(replies[request["id"]]), expected[[n]]).min() >= MIN_COSINE


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
ID = object()
"""Stands for the request's id in the cases below."""
PYTHON_WORDS = re.compile(r"\b(int|str|bool|float64|list|dict|None|NoneType|tuple)\b")


def packed(message: dict[str, Any], request_id: int) -> bytes:
    payload: bytes = msgpack.packb(
        {key: (request_id if value is ID else value) for key, value in message.items()}
    )
    return payload


def with_bad_text(message: dict[str, Any], request_id: int, encoded: bytes) -> bytes:
    """``message`` packed with the string "@" replaced by the msgpack str ``encoded``."""
    payload = packed(message, request_id)
    assert payload.count(b"\xa1@") == 1
    return payload.replace(b"\xa1@", encoded)


def nested(depth: int) -> bytes:
    """A msgpack value nested ``depth`` arrays deep."""
    return b"\x91" * depth + b"\x01"


def id_then(request_id: int, rest: bytes, pairs: int) -> bytes:
    """A map of ``pairs`` pairs whose first is the id, followed by ``rest`` (raw msgpack)."""
    return bytes([0x80 | pairs]) + b"\xa2id" + msgpack.packb(request_id) + rest


TOO_DEEP = nested(MAX_NESTING + 1)

MALFORMED: list[tuple[str, Any, Any, str, str, int | None]] = [
    # (case, payload: a message to pack, or a function of the id giving the payload bytes,
    #  the reply's id (ID: the request's, or a value), code, words in the message, index)
    ("bytes that are not msgpack", lambda i: b"\xc1\x00", None, "protocol_error",
     "not msgpack", None),
    ("map cut before the id's value", lambda i: b"\x82\xa2id", None, "protocol_error",
     "ends inside", None),
    ("map cut after the id", lambda i: id_then(i, b"\xa2op", 2), ID, "protocol_error",
     "ends inside", None),
    ("bytes after the map", lambda i: packed({"id": i, "op": "ping"}, i) + b"\x01", ID,
     "protocol_error", "bytes after the map", None),
    ("not a map", lambda i: msgpack.packb([1, 2, 3]), None, "protocol_error",
     "array, not a map", None),
    ("missing id", {"op": "ping"}, None, "protocol_error", "id missing", None),
    ("non-string key", {"id": ID, "op": "ping", 1: 2}, ID, "invalid_input",
     "key that is an integer, not a string", None),
    ("non-string key inside a text", {"id": ID, "op": "embed", "inputs": ["a", {1: 2}]}, ID,
     "invalid_input", "inputs[1] has a key that is an integer", 1),
    ("invalid UTF-8 in one text",
     lambda i: with_bad_text({"id": i, "op": "embed", "inputs": ["ok", "@", "ok"]}, i,
                             b"\xa2\xff\xfe"),
     ID, "invalid_input", "inputs[1] is not valid UTF-8", 1),
    ("lone surrogate as JavaScript encoders write it",
     lambda i: with_bad_text({"id": i, "op": "embed", "inputs": ["@"]}, i, b"\xa3\xed\xa0\x80"),
     ID, "invalid_input", "inputs[0] is not valid UTF-8", 0),
    ("invalid UTF-8 in an unknown field",
     lambda i: with_bad_text({"id": i, "op": "ping", "note": "@"}, i, b"\xa1\xc3"),
     ID, "invalid_input", "note is not valid UTF-8", None),
    ("nesting too deep in a text",
     lambda i: id_then(i, b"\xa2op\xa5embed\xa6inputs\x92\xa1a" + TOO_DEEP, 3),
     ID, "invalid_input", f"inputs[1] is nested more than {MAX_NESTING} levels deep", 1),
    ("nesting too deep in an unknown field",
     lambda i: id_then(i, b"\xa2op\xa4ping\xa4deep" + TOO_DEEP, 3),
     ID, "invalid_input", "deep is nested more than", None),
    ("nesting at the limit is fine but not a text",
     lambda i: id_then(i, b"\xa2op\xa5embed\xa6inputs" + nested(MAX_NESTING - 1), 3),
     ID, "invalid_input", "inputs[0] is an array, not a string", 0),
    ("float id, as JavaScript BigInt mode writes 2^32", {"id": 4294967296.0, "op": "ping"},
     4294967296.0, "invalid_input", "not a float (4294967296.0)", None),
    ("negative id", {"id": -3, "op": "ping"}, -3, "invalid_input",
     "not a negative integer (-3)", None),
    ("string id", {"id": "seven", "op": "ping"}, "seven", "invalid_input",
     "not a string ('seven')", None),
    ("array id", {"id": [7], "op": "ping"}, None, "invalid_input", "not an array", None),
    ("missing op", {"id": ID}, ID, "protocol_error", "op missing", None),
    ("mistyped op", {"id": ID, "op": 42}, ID, "protocol_error",
     "op is an integer, not a string", None),
    ("unknown op", {"id": ID, "op": "transmogrify"}, ID, "protocol_error", "unknown op", None),
    ("embed without inputs", {"id": ID, "op": "embed"}, ID, "invalid_input",
     "inputs must be an array of strings, not nil", None),
    ("inputs not an array", {"id": ID, "op": "embed", "inputs": "text"}, ID, "invalid_input",
     "not a string", None),
    ("empty inputs", {"id": ID, "op": "embed", "inputs": []}, ID, "invalid_input", "empty",
     None),
    ("non-string input", {"id": ID, "op": "embed", "inputs": ["a", 5]}, ID, "invalid_input",
     "inputs[1] is an integer, not a string", 1),
    ("binary input", {"id": ID, "op": "embed", "inputs": [b"raw"]}, ID, "invalid_input",
     "inputs[0] is a binary, not a string", 0),
    ("mistyped normalize", {"id": ID, "op": "embed", "inputs": ["a"], "normalize": "yes"},
     ID, "invalid_input", "normalize must be a boolean or nil, not a string", None),
    ("mistyped truncate", {"id": ID, "op": "embed", "inputs": ["a"], "truncate": 0},
     ID, "invalid_input", "truncate must be a boolean or nil, not an integer", None),
    ("mistyped model", {"id": ID, "op": "embed", "inputs": ["a"], "model": 3.5},
     ID, "invalid_input", "model must be a string or nil, not a float", None),
    ("another model", {"id": ID, "op": "embed", "inputs": ["a"], "model": "bert-base-uncased"},
     ID, "model_not_found", "'bert-base-uncased' is not loaded", None),
    ("too many texts", {"id": ID, "op": "embed", "inputs": ["a"] * TOO_MANY_TEXTS},
     ID, "invalid_input", "max_texts_per_request", None),
    ("too many bytes", {"id": ID, "op": "embed", "inputs": ["", "a" * TOO_MANY_BYTES]},
     ID, "invalid_input", "inputs[1] holds", 1),
]  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "answered_id", "code", "words", "index"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_request_gets_an_error_reply_and_the_worker_keeps_serving(
    shared_worker: Any, payload: Any, answered_id: Any, code: str, words: str, index: int | None
) -> None:
    request_id = new_id()
    data = packed(payload, request_id) if isinstance(payload, dict) else payload(request_id)
    shared_worker.send_bytes(LENGTH_PREFIX.pack(len(data)) + data)
    reply = shared_worker.recv()
    expected_id = request_id if answered_id is ID else answered_id
    assert reply["id"] == expected_id
    assert type(reply["id"]) is type(expected_id)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert words in reply["error"]["message"]
    assert reply["error"].get("index") == index
    assert not PYTHON_WORDS.search(reply["error"]["message"]), reply["error"]["message"]
    assert_still_serving(shared_worker)


def test_duplicate_id_in_flight_is_refused_and_the_first_request_still_answered(
    shared_worker: Any, metadata: ModelMetadata, golden: dict[str, Any]
) -> None:
    # the first request takes long enough (many long texts) to be in flight when the next
    # frames, written with it, are read
    long_text = golden["sentences"][golden["token_counts"].index(metadata.max_tokens)]
    request_id = new_id()
    shared_worker.send(
        {"id": request_id, "op": "embed", "inputs": [long_text] * 12},
        {"id": request_id, "op": "ping"},
        {"id": request_id, "op": "embed", "inputs": ["again"]},
    )
    first, second, third = shared_worker.recv_many(3)
    for refusal in (first, second):
        assert refusal["id"] == request_id
        assert refusal["ok"] is False
        assert refusal["error"]["code"] == "invalid_input"
        assert f"id {request_id} is already in flight" in refusal["error"]["message"]
    assert third["id"] == request_id
    assert vectors_of(third).shape == (12, metadata.dimension)
    # answered: the id is free again
    assert shared_worker.request({"id": request_id, "op": "ping"}) == {"id": request_id, "ok": True}


def test_worker_stderr_has_no_traceback_after_all_this(shared_worker: Any) -> None:
    assert "Traceback" not in shared_worker.stderr()
    assert shared_worker.process.poll() is None
