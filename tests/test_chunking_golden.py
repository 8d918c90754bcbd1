"""The Python client cuts calls into wire requests as protocol.md section 10 defines: the cases
of tests/golden/chunking.json, which the Rust client's chunking.rs checks too. Pure: no worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from akidb_embed.host_client import ModelInfo
from akidb_embed.host_client.chunking import (
    ChunkLimits,
    chunk_end,
    estimated_tokens,
    utf8_size,
)

GOLDEN = Path(__file__).parent / "golden" / "chunking.json"
CASES: list[dict[str, Any]] = json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]


def expand(entries: list[str | dict[str, Any]]) -> list[str]:
    """The texts a case lists: a string is one text, a ``repeat`` entry ``count`` of them."""
    texts: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            texts.append(entry)
        else:
            texts += [entry["repeat"] * entry["times"]] * entry.get("count", 1)
    return texts


def limits_of(case: dict[str, Any]) -> ChunkLimits:
    model = case["model"]
    served = ModelInfo(
        model=model["model"],
        dimension=model["dimension"],
        max_tokens=model["max_tokens"],
        normalize_default=model["normalize_default"],
    )
    call = case["call"]
    return ChunkLimits.compute(
        case["limits"], served, call["max_in_flight_texts"], call["model"], call["prompt_name"]
    )


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_calls_are_cut_as_the_golden_cases_say(case: dict[str, Any]) -> None:
    limits = limits_of(case)
    expected = case["expected"]
    derived = {
        name: getattr(limits, name) for name in expected if name not in ("cuts", "cut_tokens")
    }
    assert derived == {name: expected[name] for name in derived}

    texts = expand(case["texts"])
    sizes = [utf8_size(text, index) for index, text in enumerate(texts)]
    assert all(size <= limits.max_text_bytes for size in sizes), "a case sends only texts it may"
    cuts: list[list[int]] = []
    start = 0
    while start < len(texts):
        stop = chunk_end(texts, sizes, start, limits)
        cuts.append([start, stop])
        start = stop
    assert cuts == expected["cuts"]
    tokens = [
        sum(estimated_tokens(text, limits.max_tokens_per_text) for text in texts[start:stop])
        for start, stop in cuts
    ]
    assert tokens == expected["cut_tokens"]
