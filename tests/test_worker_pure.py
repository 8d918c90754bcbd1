"""The worker's pure parts, without a process: provider choice, micro-batch planning, request
validation and the frame decoder (property tests), and the golden frames of protocol.md."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgpack_strategies import any_msgpack_value

from akidb_embed.errors import InvalidInput, ModelNotFound, ProtocolError, ServiceUnavailable
from akidb_embed.wire import (
    FrameError,
    FrameReader,
    MalformedMessage,
    TruncatedFrame,
    embeddings_from_bytes,
    error_reply,
    pack,
    unpack,
)
from akidb_embed.worker.batcher import plan_micro_batches
from akidb_embed.worker.config import CoreMLOptions
from akidb_embed.worker.providers import COREML, CPU, CUDA, choose_providers
from akidb_embed.worker.validation import (
    EmbedRequest,
    OpRequest,
    RejectedRequest,
    RequestLimits,
    parse_payload,
    parse_request,
)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
MODEL = "some-org/some-model"
OTHER_MODEL = "other-org/other-model"
MODELS = (MODEL, OTHER_MODEL)
"""The loaded models' ids, the default first."""
LIMITS = RequestLimits(max_texts_per_request=4, max_text_bytes=32)

# -- execution providers -------------------------------------------------------------------
# CoreML and CUDA cannot run on this CI machine (Linux, CPU-only onnxruntime): the choice is
# tested as a pure function of fake "available" lists, the only place these providers appear.

COREML_OPTIONS = CoreMLOptions(compute_units="ALL", model_format="MLProgram", cache_dir=Path("/c"))
LINUX_CPU = ["AzureExecutionProvider", CPU]
LINUX_GPU = ["TensorrtExecutionProvider", CUDA, CPU]
MAC = [COREML, "AzureExecutionProvider", CPU]


def names(choice: list[tuple[str, dict[str, str]]]) -> list[str]:
    return [name for name, _ in choice]


def test_auto_on_macos_prefers_coreml_with_its_options() -> None:
    choice = choose_providers("auto", MAC, "darwin", COREML_OPTIONS)
    assert names(choice) == [COREML, CPU]
    assert choice[0][1] == {
        "MLComputeUnits": "ALL",
        "ModelFormat": "MLProgram",
        "ModelCacheDirectory": "/c",
    }


def test_auto_takes_cuda_when_offered_and_cpu_otherwise() -> None:
    assert names(choose_providers("auto", LINUX_GPU, "linux", COREML_OPTIONS)) == [CUDA, CPU]
    assert names(choose_providers("auto", LINUX_CPU, "linux", COREML_OPTIONS)) == [CPU]


def test_auto_ignores_coreml_outside_macos() -> None:
    assert names(choose_providers("auto", MAC, "linux", COREML_OPTIONS)) == [CPU]


def test_forced_provider_is_used_with_cpu_as_fallback() -> None:
    assert names(choose_providers("cuda", LINUX_GPU, "linux", COREML_OPTIONS)) == [CUDA, CPU]
    assert names(choose_providers("cpu", LINUX_GPU, "linux", COREML_OPTIONS)) == [CPU]
    assert names(choose_providers("coreml", MAC, "darwin", COREML_OPTIONS)) == [COREML, CPU]


@pytest.mark.parametrize("forced", ["cuda", "coreml"])
def test_forced_provider_that_is_missing_names_what_is_available(forced: str) -> None:
    with pytest.raises(ServiceUnavailable) as raised:
        choose_providers(forced, LINUX_CPU, "linux", COREML_OPTIONS)
    assert forced in raised.value.message
    assert "AzureExecutionProvider, CPUExecutionProvider" in raised.value.message


# -- micro-batch planning ------------------------------------------------------------------


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=600), max_size=200),
    budget=st.integers(min_value=1, max_value=4096),
)
def test_micro_batches_cover_every_text_once_and_respect_the_budget(
    lengths: list[int], budget: int
) -> None:
    batches = plan_micro_batches(lengths, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1  # an over-long text runs alone


def test_micro_batches_group_similar_lengths() -> None:
    lengths = [200, 5, 190, 6, 7, 210]
    assert plan_micro_batches(lengths, 600) == [[1, 3, 4], [2, 0], [5]]


def test_text_longer_than_the_budget_runs_alone() -> None:
    assert plan_micro_batches([300, 10, 10], 100) == [[1, 2], [0]]


# -- request validation --------------------------------------------------------------------


def parse(message: dict[str, Any]) -> Any:
    return parse_request(message, LIMITS, MODELS)


def rejected(message: dict[str, Any]) -> RejectedRequest:
    with pytest.raises(RejectedRequest) as raised:
        parse(message)
    return raised.value


def test_embed_request_defaults() -> None:
    request = parse({"id": 1, "op": "embed", "inputs": ["a", ""]})
    assert request == EmbedRequest(
        id=1, inputs=["a", ""], model=MODEL, normalize=None, truncate=True, prompt_name=None
    )
    explicit = parse(
        {"id": 2, "op": "embed", "inputs": ["a"], "model": OTHER_MODEL, "normalize": False,
         "truncate": False, "prompt_name": "query", "future_field": [1, 2]}
    )  # fmt: skip
    assert explicit == EmbedRequest(
        id=2, inputs=["a"], model=OTHER_MODEL, normalize=False, truncate=False, prompt_name="query"
    )


def test_a_models_short_name_names_it_unless_two_models_share_it() -> None:
    request = parse({"id": 3, "op": "embed", "inputs": ["a"], "model": "other-model"})
    assert request.model == OTHER_MODEL
    twins = ("org-a/twin", "org-b/twin")
    rejection = None
    with pytest.raises(RejectedRequest) as raised:
        parse_request({"id": 4, "op": "embed", "inputs": ["a"], "model": "twin"}, LIMITS, twins)
    rejection = raised.value
    assert type(rejection.error) is ModelNotFound
    assert "'org-a/twin', 'org-b/twin'" in rejection.error.message


def test_unknown_model_is_refused_naming_every_loaded_model() -> None:
    rejection = rejected({"id": 5, "op": "embed", "inputs": ["a"], "model": "nope"})
    assert type(rejection.error) is ModelNotFound
    assert rejection.error.message == (
        f"model 'nope' is not loaded; this worker serves {MODEL!r}, {OTHER_MODEL!r}"
    )


@pytest.mark.parametrize(
    ("message", "request_id", "error", "words"),
    [
        ({"op": "ping"}, None, ProtocolError, "id missing"),
        ({"id": -1, "op": "ping"}, -1, InvalidInput, "not a negative integer (-1)"),
        ({"id": True, "op": "ping"}, True, InvalidInput, "not a boolean"),
        ({"id": "7", "op": "ping"}, "7", InvalidInput, "not a string ('7')"),
        ({"id": 7.0, "op": "ping"}, 7.0, InvalidInput, "not a float (7.0)"),
        ({"id": None, "op": "ping"}, None, InvalidInput, "not nil"),
        ({"id": [7], "op": "ping"}, None, InvalidInput, "not an array"),
        ({"id": {"n": 7}, "op": "ping"}, None, InvalidInput, "not a map"),
        ({"id": 3}, 3, ProtocolError, "op missing"),
        ({"id": 3, "op": 5}, 3, ProtocolError, "op is an integer, not a string"),
        ({"id": 3, "op": "nope"}, 3, ProtocolError, "unknown op 'nope'"),
        ({"id": 4, "op": "embed"}, 4, InvalidInput, "inputs must be an array"),
        ({"id": 4, "op": "embed", "inputs": "text"}, 4, InvalidInput, "not a string"),
        ({"id": 4, "op": "embed", "inputs": []}, 4, InvalidInput, "empty"),
        ({"id": 4, "op": "embed", "inputs": ["a"] * 5}, 4, InvalidInput, "max_texts_per_request"),
        ({"id": 4, "op": "embed", "inputs": ["a", 1]}, 4, InvalidInput, "inputs[1] is an integer"),
        ({"id": 4, "op": "embed", "inputs": [None]}, 4, InvalidInput, "inputs[0] is nil"),
        ({"id": 4, "op": "embed", "inputs": ["é" * 17]}, 4, InvalidInput, "34 UTF-8 bytes"),
        ({"id": 4, "op": "embed", "inputs": ["a"], "model": 1}, 4, InvalidInput, "model must"),
        ({"id": 4, "op": "embed", "inputs": ["a"], "model": "x"}, 4, ModelNotFound, "'x'"),
        ({"id": 4, "op": "embed", "inputs": ["a"], "normalize": 1}, 4, InvalidInput, "normalize"),
        ({"id": 4, "op": "embed", "inputs": ["a"], "truncate": "no"}, 4, InvalidInput, "truncate"),
        ({"id": 4, "op": "embed", "inputs": ["a"], "prompt_name": 3}, 4, InvalidInput, "prompt"),
    ],
)
def test_invalid_request_is_rejected_with_its_id_when_readable(
    message: dict[str, Any], request_id: int | None, error: type, words: str
) -> None:
    rejection = rejected(message)
    assert rejection.request_id == request_id
    assert type(rejection.request_id) is type(request_id)
    assert type(rejection.error) is error
    assert words in rejection.error.message


def test_text_of_exactly_max_text_bytes_is_accepted() -> None:
    assert parse({"id": 1, "op": "embed", "inputs": ["é" * 16]}).inputs == ["é" * 16]


msgpack_values = any_msgpack_value(
    max_leaves=20, text_size=40, binary_size=20, list_size=5, key_size=8, map_size=4
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(min_value=0, max_value=2**64 - 1) | msgpack_values,
        "op": st.sampled_from(["embed", "info", "health", "ping", "shutdown", "nope"])
        | msgpack_values,
        "inputs": st.lists(st.text(max_size=12), max_size=6) | msgpack_values,
        "model": st.just(MODEL) | msgpack_values,
        "normalize": msgpack_values,
        "truncate": msgpack_values,
    },
).flatmap(lambda d: st.dictionaries(st.text(max_size=6), msgpack_values, max_size=2).map(
    lambda extra: {**extra, **d}))  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(request_like)
def test_any_map_yields_a_request_or_an_error_reply(message: dict[str, Any]) -> None:
    try:
        request = parse(message)
    except RejectedRequest as rejection:
        reply = unpack(pack(error_reply(rejection.request_id, rejection.error))[4:])
        assert reply["ok"] is False
        assert reply["error"]["code"] in {"protocol_error", "invalid_input", "model_not_found"}
        if rejection.request_id is not None:
            sent = message["id"]
            assert rejection.request_id == sent or (sent != sent and reply["id"] != reply["id"])
            assert type(rejection.request_id) is type(sent)
        else:
            assert message.get("id") is None or isinstance(message["id"], list | dict)
        return
    assert isinstance(request, EmbedRequest | OpRequest)
    assert request.id == message["id"]


# -- frame decoder -------------------------------------------------------------------------


def read_all(data: bytes, max_frame_bytes: int) -> tuple[list[bytes], FrameError | None]:
    reader = FrameReader(io.BytesIO(data), max_frame_bytes)
    payloads: list[bytes] = []
    for _ in range(len(data) + 1):  # each frame consumes at least 4 bytes: this always ends
        try:
            payload = reader.read()
        except FrameError as error:
            return payloads, error
        if payload is None:
            return payloads, None
        payloads.append(payload)
    raise AssertionError("the reader did not reach the end of a finite stream")


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300), max_frame_bytes=st.integers(min_value=0, max_value=64))
def test_random_bytes_give_frames_or_a_frame_error(data: bytes, max_frame_bytes: int) -> None:
    payloads, _ = read_all(data, max_frame_bytes)
    for payload in payloads:
        with contextlib.suppress(MalformedMessage):
            assert isinstance(unpack(payload), dict)


@settings(max_examples=300, deadline=None)
@given(
    messages=st.lists(st.dictionaries(st.text(max_size=5), msgpack_values, max_size=3), max_size=5),
    cut=st.integers(min_value=0),
)
def test_cut_stream_yields_the_whole_frames_then_truncation(
    messages: list[dict[str, Any]], cut: int
) -> None:
    frames = [pack(message) for message in messages]
    stream = b"".join(frames)
    cut %= len(stream) + 1
    payloads, error = read_all(stream[:cut], max_frame_bytes=1 << 20)
    boundaries = [sum(len(f) for f in frames[:n]) for n in range(len(frames) + 1)]
    whole = max(n for n, end in enumerate(boundaries) if end <= cut)
    assert payloads == [frame[4:] for frame in frames[:whole]]
    if cut in boundaries:
        assert error is None
    else:
        assert isinstance(error, TruncatedFrame)


class CountingPipe(io.BytesIO):
    """A stream whose reads are counted (each read of a pipe is a system call)."""

    reads = 0

    def read1(self, size: int = -1) -> bytes:
        self.reads += 1
        return super().read1(size)


def test_a_frame_is_one_read_and_the_end_of_the_stream_one_more() -> None:
    # a second read after EOF would race a host closing the stream once it has seen the end
    pipe = CountingPipe(pack({"id": 1}) + pack({"id": 2}))
    reader = FrameReader(pipe)
    assert [reader.read(), reader.read(), reader.read()] == [
        msgpack.packb({"id": 1}), msgpack.packb({"id": 2}), None
    ]  # fmt: skip
    assert pipe.reads == 2  # both frames in the first read, then the end


def test_non_map_payload_is_malformed_not_broken() -> None:
    with pytest.raises(MalformedMessage):
        unpack(msgpack.packb([1, 2]))
    with pytest.raises(MalformedMessage):
        unpack(b"\xc1")  # a byte msgpack never uses


# -- golden frames -------------------------------------------------------------------------

GOLDEN_MESSAGES = {
    "ping_request.bin": {"id": 1, "op": "ping"},
    "ping_reply.bin": {"id": 1, "ok": True},
    "embed_request.bin": {
        "id": 7, "op": "embed", "model": "sentence-transformers/all-MiniLM-L6-v2",
        "inputs": ["hi"], "normalize": True, "truncate": True,
    },
    "unknown_op_request.bin": {"id": 9, "op": "nope"},
    "unknown_op_reply.bin": {
        "id": 9, "ok": False,
        "error": {"code": "protocol_error", "message": "unknown op 'nope'"},
    },
    "invalid_utf8_reply.bin": {
        "id": 11, "ok": False,
        "error": {"code": "invalid_input", "message": "inputs[1] is not valid UTF-8", "index": 1},
    },
    "non_string_key_reply.bin": {
        "id": 12, "ok": False,
        "error": {"code": "invalid_input",
                  "message": "the request map has a key that is an integer, not a string"},
    },
    "float_id_request.bin": {"id": 4294967296.0, "op": "ping"},
    "float_id_reply.bin": {
        "id": 4294967296.0, "ok": False,
        "error": {"code": "invalid_input",
                  "message": "id must be an integer from 0 to 2^64-1, not a float (4294967296.0)"},
    },
    "too_deep_reply.bin": {
        "id": 14, "ok": False,
        "error": {"code": "invalid_input",
                  "message": "inputs[0] is nested more than 1024 levels deep", "index": 0},
    },
    "duplicate_id_request.bin": {"id": 15, "op": "ping"},
    "duplicate_id_reply.bin": {
        "id": 15, "ok": False,
        "error": {"code": "invalid_input",
                  "message": "id 15 is already in flight; ids must be unique among requests in "
                             "flight"},
    },
    "embed_two_texts_request.bin": {
        "id": 1000, "op": "embed", "inputs": ["a cat on a mat", "caf\u00e9 \u2615"],
    },
}  # fmt: skip
UNDECODABLE_REQUESTS = {
    # golden request frames that the codec cannot write: each is answered by its golden reply
    "invalid_utf8_request.bin": "invalid_utf8_reply.bin",
    "non_string_key_request.bin": "non_string_key_reply.bin",
    "too_deep_request.bin": "too_deep_reply.bin",
}


@pytest.mark.parametrize("name", sorted(GOLDEN_MESSAGES))
def test_golden_frame_matches_the_codec_byte_for_byte(name: str) -> None:
    golden = (GOLDEN / name).read_bytes()
    assert pack(GOLDEN_MESSAGES[name]) == golden
    assert unpack(golden[4:]) == GOLDEN_MESSAGES[name]


@pytest.mark.parametrize("request_name", sorted(UNDECODABLE_REQUESTS))
def test_golden_request_the_codec_refuses_gets_the_golden_reply(request_name: str) -> None:
    payload = (GOLDEN / request_name).read_bytes()[4:]
    with pytest.raises(MalformedMessage):
        unpack(payload)
    with pytest.raises(RejectedRequest) as raised:
        parse_payload(payload, RequestLimits(1024, 262144), MODEL)
    reply = pack(error_reply(raised.value.request_id, raised.value.error))
    assert reply == (GOLDEN / UNDECODABLE_REQUESTS[request_name]).read_bytes()


def test_golden_embed_reply_decodes_to_the_reference_vectors() -> None:
    payload = (GOLDEN / "embed_two_texts_reply.bin").read_bytes()[4:]
    reference = json.loads((GOLDEN / "embed_two_texts_vectors.json").read_text(encoding="utf-8"))
    reply = unpack(payload)
    assert list(reply) == ["id", "ok", "model", "shape", "embeddings", "usage"]
    assert reply["id"] == 1000
    assert reply["shape"] == reference["shape"] == [2, 384]
    assert reference["texts"] == GOLDEN_MESSAGES["embed_two_texts_request.bin"]["inputs"]
    offset = reference["embeddings_offset_in_payload"]
    assert offset % 4 != 0  # the example shows the unaligned case
    assert payload[offset : offset + len(reply["embeddings"])] == reply["embeddings"]
    vectors = embeddings_from_bytes(reply["embeddings"], (2, 384))
    assert vectors.tolist() == reference["embeddings"]  # exactly: the JSON holds the float32s
    assert set(reply["usage"]) == {"total_tokens", "duration_ms"}


def test_protocol_md_names_every_golden_file_and_shows_their_bytes() -> None:
    text = (ROOT / "protocol.md").read_text(encoding="utf-8")
    # "[`name.bin`]", then prose without another such tag, then a block of hex ("..." where
    # bytes are left out)
    examples = re.findall(
        r"\[`([a-z0-9_]+\.bin)`\](?:(?!\[`|```).)*```\n(.*?)```", text, flags=re.S
    )
    golden_files = {path.name for path in GOLDEN.iterdir()}
    for name in golden_files:
        assert f"`{name}`" in text, f"protocol.md does not mention {name}"
    shown = {name for name, _ in examples}
    assert shown == golden_files - {"too_deep_request.bin", "too_deep_reply.bin"} - {
        name for name in golden_files if not name.endswith(".bin")
    }
    for name, hex_text in examples:
        data = (GOLDEN / name).read_bytes()
        pieces = [bytes.fromhex(piece) for piece in hex_text.split("...")]
        if len(pieces) == 1:
            assert pieces[0] == data, name
        else:  # a long frame shown in part: its start, then pieces found in order
            assert data.startswith(pieces[0]), name
            position = len(pieces[0])
            for piece in pieces[1:]:
                position = data.index(piece, position) + len(piece)


# -- command line ----------------------------------------------------------------------------


def test_options_come_from_the_environment_unless_given_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from akidb_embed.worker.__main__ import config_from_args

    monkeypatch.setenv("AKIDB_EMBED_MAX_BATCH_TOKENS", "512")
    monkeypatch.setenv("AKIDB_EMBED_PROVIDER", "cpu")
    monkeypatch.setenv("AKIDB_EMBED_MODEL_DIR", str(tmp_path))
    config = config_from_args(["--max-batch-tokens", "256", "--coreml-compute-units", "CPUOnly"])
    assert config.max_batch_tokens == 256
    assert config.provider == "cpu"
    assert config.model_dir == tmp_path
    assert config.coreml.compute_units == "CPUOnly"
    assert config_from_args([]).max_batch_tokens == 512


def test_bad_environment_value_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from akidb_embed.worker.__main__ import config_from_args

    monkeypatch.setenv("AKIDB_EMBED_MAX_PENDING_TEXTS", "0")
    with pytest.raises(SystemExit) as exited:
        config_from_args([])
    assert exited.value.code == 2


def test_spin_wait_is_off_by_default_and_set_by_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from akidb_embed.worker.__main__ import config_from_args

    assert config_from_args([]).spin_wait is False
    assert config_from_args(["--spin-wait"]).spin_wait is True
    for on in ("1", "true", "Yes", "ON"):  # the values protocol.md section 7 lists
        monkeypatch.setenv("AKIDB_EMBED_SPIN_WAIT", on)
        assert config_from_args([]).spin_wait is True
    assert config_from_args(["--no-spin-wait"]).spin_wait is False
    for off in ("0", "false", "No", "off", ""):
        monkeypatch.setenv("AKIDB_EMBED_SPIN_WAIT", off)
        assert config_from_args([]).spin_wait is False
    monkeypatch.setenv("AKIDB_EMBED_SPIN_WAIT", "sometimes")
    with pytest.raises(SystemExit):
        config_from_args([])
