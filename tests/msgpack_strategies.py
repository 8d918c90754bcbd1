"""Hypothesis strategies for any msgpack value, shared by the tests that throw generated
requests at the worker's parser (test_worker_pure.py) and at a live worker
(test_worker_generated_frames.py, which keeps them small enough for its frame limits)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

MAX_UINT64 = 2**64 - 1


def any_msgpack_value(
    *,
    max_leaves: int,
    text_size: int,
    binary_size: int,
    list_size: int,
    key_size: int,
    map_size: int,
) -> st.SearchStrategy[Any]:
    """Nil, booleans, integers of every msgpack width, floats, strings and binaries, nested in
    arrays and maps (string keys) up to ``max_leaves`` values in all."""
    scalars = (
        st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=MAX_UINT64)
        | st.floats() | st.text(max_size=text_size) | st.binary(max_size=binary_size)
    )  # fmt: skip
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=list_size)
            | st.dictionaries(st.text(max_size=key_size), inner, max_size=map_size)
        ),
        max_leaves=max_leaves,
    )
