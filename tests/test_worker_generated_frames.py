"""Generated frames thrown at the real worker (hypothesis), checked against protocol.md.

Each example writes a few frames at once (pipelined) to one worker with small limits: random
request maps with every field of every type, requests corrupted inside (a text that is not
UTF-8, a key that is not a string, nesting too deep), payloads cut short or followed by
extra bytes, random msgpack values and random bytes, ids that are huge, negative, floats or
duplicated while in flight. Then, sometimes, an ending: a frame cut by EOF or over
``max_frame_bytes`` (exit 3), EOF (exit 0) or ``shutdown`` (exit 0).

After each example: every frame got exactly one reply, each reply carries the id the rules
of sections 2, 4 and 5 give (the request's own, exactly as sent, or nil), is ``ok`` exactly
when the request is valid, with an error code and, for one bad text, the ``index`` the rules
give; every byte on stdout belongs to a frame; the worker then still answers a ping, or exits
with the documented code. A worker that ended is replaced for the next example.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from conftest import RawWorker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgpack_strategies import any_msgpack_value

from akidb_embed.models import ModelMetadata
from akidb_embed.wire import LENGTH_PREFIX, MAX_NESTING

MAX_FRAME_BYTES = 4096
MAX_TEXTS = 4
MAX_TEXT_BYTES = 64
WORKER_ARGS = (
    "--max-frame-bytes", str(MAX_FRAME_BYTES),
    "--max-texts-per-request", str(MAX_TEXTS),
    "--max-text-bytes", str(MAX_TEXT_BYTES),
)  # fmt: skip
EXIT_TIMEOUT = 120.0
MAX_ID = 2**64 - 1
ERROR_CODES = {"invalid_input", "protocol_error", "model_not_found"}


# -- what protocol.md says a frame gets -----------------------------------------------------


@dataclass
class Expected:
    """The reply one frame must get: ``reply_id`` (the request's id as sent, or None), and
    either success for ``op`` with ``texts`` inputs, or an error with one of ``codes``."""

    reply_id: object
    ok: bool
    op: str | None = None
    texts: int = 0
    codes: set[str] = field(default_factory=set)
    index: int | None = None
    check_index: bool = False


def id_key(value: object) -> tuple[str, object]:
    """Ids compare by type and value (1, 1.0 and True are different ids; NaN is one id)."""
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def echoed(value: object) -> object:
    """The id a reply carries for a request whose readable id is ``value`` (section 5)."""
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    return None


def is_request_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID


def expected_for_map(message: dict[Any, Any], model: str) -> Expected:
    """The rules of sections 4 and 5 for a payload that decodes to ``message``."""
    if any(not isinstance(key, str) for key in message):
        return Expected(echoed(message.get("id")), False, codes={"invalid_input"})
    if "id" not in message:
        return Expected(None, False, codes={"protocol_error"})
    request_id = message["id"]
    if not is_request_id(request_id):
        return Expected(echoed(request_id), False, codes={"invalid_input"})
    op = message.get("op")
    if op not in ("embed", "info", "health", "ping"):
        return Expected(request_id, False, codes={"protocol_error"})
    if op != "embed":
        return Expected(request_id, True, op=op, texts=1 if op == "health" else 0)
    inputs = message.get("inputs")
    bad = Expected(request_id, False, codes={"invalid_input"})
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_TEXTS:
        return bad
    for index, text in enumerate(inputs):
        if not isinstance(text, str) or len(text.encode("utf-8")) > MAX_TEXT_BYTES:
            return Expected(request_id, False, codes={"invalid_input"}, index=index)
    if message.get("model") is not None:
        if not isinstance(message["model"], str):
            return bad
        if message["model"] != model:
            return Expected(request_id, False, codes={"model_not_found", "invalid_input"})
    for flag in ("normalize", "truncate"):
        if message.get(flag) is not None and not isinstance(message[flag], bool):
            return bad
    return Expected(request_id, True, op="embed", texts=len(inputs))


# -- generated frames ------------------------------------------------------------------------

values = any_msgpack_value(
    max_leaves=6, text_size=12, binary_size=8, list_size=3, key_size=4, map_size=3
)
ids = (
    st.integers(min_value=0, max_value=MAX_ID)
    | st.sampled_from([0, 2**31, 2**32, 2**53 + 1, 2**63, MAX_ID])
    | st.integers(min_value=-(2**63), max_value=-1)
    | st.floats(allow_nan=False)
    | st.sampled_from([4294967296.0, 2.0**64, -0.0])
    | values
)
texts = st.text(max_size=24) | st.text(min_size=MAX_TEXT_BYTES - 2, max_size=MAX_TEXT_BYTES + 4)
request_maps = st.fixed_dictionaries(
    {"id": ids},
    optional={
        "op": st.sampled_from(["embed", "embed", "embed", "info", "health", "ping", "nope"])
        | values,
        "inputs": st.lists(texts, min_size=1, max_size=MAX_TEXTS + 1) | values,
        "model": st.none() | st.just("other/model") | values,
        "normalize": st.booleans() | values,
        "truncate": st.booleans() | values,
        "future_field": values,
    },
).map(lambda message: {key: value for key, value in message.items()})
# a message without id sometimes, as a client bug would send it
maybe_without_id = request_maps.flatmap(
    lambda message: st.sampled_from([message, {k: v for k, v in message.items() if k != "id"}])
)

BAD_UTF8 = [b"\xff", b"\xfe\xfe", b"\xc3", b"\xed\xa0\x80", b"\xc0\x80", b"a\xf8\x88\x80\x80\x80"]
PLACEHOLDER = "\x00placeholder\x00"


@dataclass
class Frame:
    data: bytes
    """The whole frame, length prefix included."""
    expected: Expected


def framed(payload: bytes) -> bytes:
    return LENGTH_PREFIX.pack(len(payload)) + payload


def packed_with(message: dict[Any, Any], replacement: bytes) -> bytes:
    """``message`` packed with the string PLACEHOLDER replaced by raw msgpack bytes."""
    payload: bytes = msgpack.packb(message)
    marker: bytes = msgpack.packb(PLACEHOLDER)
    assert payload.count(marker) == 1
    return payload.replace(marker, replacement)


@st.composite
def valid_embeds(draw: st.DrawFn) -> dict[str, Any]:
    inputs = draw(st.lists(st.text(max_size=16), min_size=1, max_size=MAX_TEXTS))
    request_id = draw(st.integers(min_value=0, max_value=MAX_ID))
    return {"id": request_id, "op": "embed", "inputs": inputs}


@st.composite
def corrupted_requests(draw: st.DrawFn, model: str) -> Frame:
    """A valid embed with one thing inside that strict decoding refuses."""
    message = draw(valid_embeds())
    request_id = message["id"]
    where = draw(st.integers(min_value=0, max_value=len(message["inputs"])))
    in_inputs = where < len(message["inputs"])
    kind = draw(st.sampled_from(["utf8", "key", "deep"]))
    if kind == "utf8":
        bad = draw(st.sampled_from(BAD_UTF8))
        replacement = bytes([0xA0 | len(bad)]) + bad  # a fixstr holding those bytes
    elif kind == "key":
        # msgpack's strict decoding takes str and bin keys; any other scalar is refused
        msgpack_int = st.integers(min_value=-(2**63), max_value=2**64 - 1)
        key = draw(msgpack_int | st.booleans() | st.none() | st.floats())
        replacement = b"\x81" + msgpack.packb(key) + b"\xc0"
    else:
        depth = draw(st.integers(min_value=MAX_NESTING, max_value=MAX_NESTING + 40))
        replacement = b"\x91" * depth + b"\xc0"
    if in_inputs:
        message["inputs"][where] = PLACEHOLDER
    else:
        message["note"] = PLACEHOLDER
    payload = packed_with(message, replacement)
    expected = Expected(
        request_id, False, codes={"invalid_input"}, index=where if in_inputs else None,
        check_index=True,
    )  # fmt: skip
    return Frame(framed(payload), expected)


@st.composite
def cut_or_padded_requests(draw: st.DrawFn) -> Frame:
    """A request whose payload ends early, or has bytes after the map."""
    message = draw(valid_embeds())
    payload: bytes = msgpack.packb(message)
    id_end = 4 + len(msgpack.packb(message["id"]))  # the map header, "id", its value
    if draw(st.booleans()):
        cut = draw(st.integers(min_value=1, max_value=len(payload) - 1))
        reply_id = message["id"] if cut >= id_end else None
        return Frame(framed(payload[:cut]), Expected(reply_id, False, codes={"protocol_error"}))
    extra = draw(st.binary(min_size=1, max_size=6))
    return Frame(framed(payload + extra), Expected(message["id"], False, codes={"protocol_error"}))


@st.composite
def generated_frames(draw: st.DrawFn, model: str) -> Frame:
    kind = draw(st.sampled_from(["map", "map", "map", "corrupted", "cut", "value", "bytes"]))
    if kind == "map":
        message = draw(maybe_without_id)
        return Frame(framed(msgpack.packb(message)), expected_for_map(message, model))
    if kind == "corrupted":
        return draw(corrupted_requests(model))
    if kind == "cut":
        return draw(cut_or_padded_requests())
    if kind == "value":  # a msgpack value that is not a map
        value = draw(values.filter(lambda value: not isinstance(value, dict)))
        return Frame(framed(msgpack.packb(value)), Expected(None, False, codes={"protocol_error"}))
    # random bytes that do not begin with a map header (then no id can be in them)
    data = draw(
        st.binary(min_size=1, max_size=40).filter(
            lambda data: data[0] & 0xF0 != 0x80 and data[0] not in (0xDE, 0xDF)
        )
    )
    return Frame(framed(data), Expected(None, False, codes={"protocol_error"}))


@st.composite
def duplicate_pairs(draw: st.DrawFn) -> list[Frame]:
    """An embed and, right behind it, another request with the same id."""
    request_id = draw(st.integers(min_value=0, max_value=MAX_ID))
    first = {"id": request_id, "op": "embed", "inputs": ["a sentence to embed"] * MAX_TEXTS}
    second = {"id": request_id, "op": draw(st.sampled_from(["ping", "embed", "health"]))}
    if second["op"] == "embed":
        second["inputs"] = ["again"]
    return [
        Frame(framed(msgpack.packb(first)), Expected(request_id, True, "embed", MAX_TEXTS)),
        Frame(
            framed(msgpack.packb(second)),
            Expected(request_id, True, second["op"], 1 if second["op"] != "ping" else 0),
        ),
    ]


@st.composite
def examples(draw: st.DrawFn, model: str) -> tuple[list[Frame], str | None]:
    frames: list[Frame] = []
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        if draw(st.integers(min_value=0, max_value=9)) == 0:
            frames += draw(duplicate_pairs())
        else:
            frames.append(draw(generated_frames(model)))
    ending = draw(st.sampled_from([None] * 12 + ["cut", "oversized", "eof", "shutdown"]))
    return frames, ending


# -- the worker ------------------------------------------------------------------------------


class Workers:
    """One worker with the small limits at a time; a new one when the last has ended."""

    def __init__(self) -> None:
        self.current: RawWorker | None = None
        self.started = 0

    def get(self) -> RawWorker:
        if self.current is None or self.current.process.poll() is not None:
            if self.current is not None:
                assert "Traceback" not in self.current.stderr()
                self.current.kill()
            self.current = RawWorker(WORKER_ARGS)
            self.started += 1
            assert self.current.hello["ok"] is True
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.kill()


@pytest.fixture(scope="module")
def workers(metadata: ModelMetadata) -> Iterator[Workers]:
    pool = Workers()
    yield pool
    pool.close()


_sentinels = itertools.count(1)


def check_reply(reply: dict[str, Any], expected: Expected, dimension: int) -> None:
    if expected.ok:
        assert reply["ok"] is True, reply
        if expected.op == "ping":
            assert reply == {"id": reply["id"], "ok": True}
        elif expected.op == "info":
            assert reply.get("dimension") == dimension
        elif expected.op == "health":
            assert reply.get("status") == "ok"
        else:
            assert reply.get("shape") == [expected.texts, dimension]
            assert len(reply["embeddings"]) == expected.texts * dimension * 4
        return
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert error["code"] in expected.codes, reply
    assert isinstance(error["message"], str) and error["message"], reply
    if expected.index is not None or expected.check_index:
        assert error.get("index") == expected.index, reply


def check_group(replies: list[dict[str, Any]], frames: list[Frame], dimension: int) -> None:
    """Frames that share an id: each reply is one frame's, or the refusal of a duplicate."""
    assert len(replies) == len(frames)
    if len(frames) == 1:
        check_reply(replies[0], frames[0].expected, dimension)
        return
    for reply in replies:
        if reply["ok"] is False and "already in flight" in reply["error"]["message"]:
            assert reply["error"]["code"] == "invalid_input"
            continue
        matches = 0
        for frame in frames:
            try:
                check_reply(reply, frame.expected, dimension)
                matches += 1
            except AssertionError:
                pass
        assert matches, (reply, [frame.expected for frame in frames])


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_generated_frames_get_the_replies_and_exits_protocol_md_gives(
    workers: Workers, metadata: ModelMetadata, data: st.DataObject
) -> None:
    frames, ending = data.draw(examples(metadata.model))
    worker = workers.get()
    sent_ids = {id_key(frame.expected.reply_id) for frame in frames}
    sentinel = next(_sentinels)
    while id_key(sentinel) in sent_ids:
        sentinel = next(_sentinels)
    # the ending, as one more frame with the reply it gets
    if ending in (None, "shutdown"):
        message = {"id": sentinel, "op": "ping" if ending is None else "shutdown"}
        frames.append(Frame(framed(msgpack.packb(message)), Expected(sentinel, True, "ping")))
    elif ending == "cut":  # then EOF inside the frame
        broken = Expected(None, False, codes={"protocol_error"})
        frames.append(Frame(LENGTH_PREFIX.pack(100) + b"\x82\xa2id", broken))
    elif ending == "oversized":
        broken = Expected(None, False, codes={"protocol_error"})
        frames.append(Frame(LENGTH_PREFIX.pack(MAX_FRAME_BYTES + 1) + b"\x80" * 8, broken))
    worker.send_bytes(b"".join(frame.data for frame in frames))
    if ending in ("cut", "eof"):
        worker.close_stdin()

    # every frame on stdout is a reply map (the harness decodes each strictly)
    replies = [worker.recv() for _ in frames] if ending is None else worker.frames_until_end()
    groups: dict[tuple[str, object], list[Frame]] = {}
    for frame in frames:
        groups.setdefault(id_key(frame.expected.reply_id), []).append(frame)
    by_id: dict[tuple[str, object], list[dict[str, Any]]] = {}
    for reply in replies:
        assert set(reply) >= {"id", "ok"}, reply
        by_id.setdefault(id_key(reply["id"]), []).append(reply)
    assert Counter({key: len(group) for key, group in by_id.items()}) == Counter(
        {key: len(group) for key, group in groups.items()}
    )
    for key, group in groups.items():
        check_group(by_id[key], group, metadata.dimension)
    assert "Traceback" not in worker.stderr()
    if ending == "shutdown":
        assert replies[-1] == {"id": sentinel, "ok": True}  # after everything else
    if ending is not None:
        assert worker.wait(EXIT_TIMEOUT) == (3 if ending in ("cut", "oversized") else 0)


def test_the_last_worker_still_serves_after_all_this(workers: Workers) -> None:
    worker = workers.get()
    assert worker.request({"id": 1, "op": "ping"}) == {"id": 1, "ok": True}
    assert "Traceback" not in worker.stderr()
