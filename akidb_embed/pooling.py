"""Sentence vectors from token vectors: sentence-transformers' pooling modes and normalisation.

The one copy of this math in the project; the worker's engine uses it. Each mode reproduces
``sentence_transformers``' ``Pooling`` (6.x, padded path) over a *pooling mask*: the attention
mask with the prompt's tokens cleared when the model's pooling config says
``include_prompt: false`` (``pooling_mask``)::

    cls        the first token the pooling mask keeps (left padding and skipped prompts included)
    mean       sum of the kept token vectors / max(number kept, 1e-9)
    max        element-wise max over the kept tokens (-inf where none is kept)
    lasttoken  the last kept token (a zero vector when none is kept)

``l2_normalize`` is sentence-transformers' ``Normalize`` (torch.nn.functional.normalize).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["l2_normalize", "mean_pool", "pool", "pooling_mask"]

_MIN_TOKEN_COUNT = 1e-9
"""Floor of the masked token count, as in sentence-transformers (a row with no tokens is zero)."""
_MIN_NORM = 1e-12
"""Floor of the norm, as in torch.nn.functional.normalize (an all-zero row stays zero)."""

Hidden = npt.NDArray[np.floating[Any]]
Mask = npt.NDArray[np.integer[Any]]


def pooling_mask(attention_mask: Mask, skip_tokens: Sequence[int]) -> Mask:
    """``attention_mask`` with the first ``skip_tokens[row]`` real tokens of each row cleared
    (a prompt that pooling leaves out), whichever side the row is padded on."""
    if not any(skip_tokens):
        return attention_mask
    mask: Mask = attention_mask.copy()
    first_real = attention_mask.argmax(axis=1)
    positions = np.arange(mask.shape[1])[np.newaxis, :]
    skip = np.asarray(skip_tokens)[:, np.newaxis]
    mask[positions < first_real[:, np.newaxis] + skip] = 0
    return mask


def mean_pool(last_hidden_state: Hidden, mask: Mask) -> npt.NDArray[np.float32]:
    """The mean of each row's token vectors where ``mask`` is 1.

    ``last_hidden_state`` is (batch, tokens, dimension); ``mask`` is (batch, tokens).
    Returns (batch, dimension) float32.
    """
    weights = mask.astype(np.float32)[:, :, np.newaxis]
    summed = (last_hidden_state.astype(np.float32, copy=False) * weights).sum(axis=1)
    counts = np.maximum(weights.sum(axis=1), _MIN_TOKEN_COUNT)
    pooled: npt.NDArray[np.float32] = (summed / counts).astype(np.float32, copy=False)
    return pooled


def pool(mode: str, last_hidden_state: Hidden, mask: Mask) -> npt.NDArray[np.float32]:
    """(batch, dimension) float32 sentence vectors by ``mode`` (cls, mean, max or lasttoken)
    from (batch, tokens, dimension) token vectors under the (batch, tokens) pooling mask."""
    hidden = last_hidden_state.astype(np.float32, copy=False)
    rows = np.arange(hidden.shape[0])
    if mode == "mean":
        return mean_pool(hidden, mask)
    if mode == "cls":
        return np.ascontiguousarray(hidden[rows, mask.argmax(axis=1)])
    if mode == "max":
        kept = mask.astype(bool)[:, :, np.newaxis]
        maxed: npt.NDArray[np.float32] = np.where(kept, hidden, np.float32(-np.inf)).max(axis=1)
        return maxed.astype(np.float32, copy=False)
    if mode == "lasttoken":
        tokens = mask.shape[1]
        from_end = mask[:, ::-1].argmax(axis=1)
        last = np.where(mask.max(axis=1) == 0, 0, tokens - 1 - from_end)
        chosen = hidden[rows, last] * mask[rows, last].astype(np.float32)[:, np.newaxis]
        return np.ascontiguousarray(chosen, dtype=np.float32)
    raise ValueError(f"unknown pooling mode {mode!r}")


def l2_normalize(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """Each row of ``x`` scaled to unit Euclidean length (all-zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    unit: npt.NDArray[np.float32] = (x / np.maximum(norms, _MIN_NORM)).astype(
        np.float32, copy=False
    )
    return unit
