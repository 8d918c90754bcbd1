"""Sentence vectors from token vectors: mean pooling under the attention mask, L2 normalisation.

The one copy of this math in the project: the worker's engine uses it, and so does the parity
check of an exported model. It reproduces sentence-transformers' ``Pooling(mode="mean")``
followed by ``Normalize()``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["l2_normalize", "mean_pool"]

_MIN_TOKEN_COUNT = 1e-9
"""Floor of the masked token count, as in sentence-transformers (a row with no tokens is zero)."""
_MIN_NORM = 1e-12
"""Floor of the norm, as in torch.nn.functional.normalize (an all-zero row stays zero)."""


def mean_pool(
    last_hidden_state: npt.NDArray[np.floating[Any]], attention_mask: npt.NDArray[np.integer[Any]]
) -> npt.NDArray[np.float32]:
    """The mean of each row's token vectors where ``attention_mask`` is 1.

    ``last_hidden_state`` is (batch, tokens, dimension); ``attention_mask`` is (batch, tokens).
    Returns (batch, dimension) float32.
    """
    mask = attention_mask.astype(np.float32)[:, :, np.newaxis]
    summed = (last_hidden_state.astype(np.float32, copy=False) * mask).sum(axis=1)
    counts = np.maximum(mask.sum(axis=1), _MIN_TOKEN_COUNT)
    pooled: npt.NDArray[np.float32] = (summed / counts).astype(np.float32, copy=False)
    return pooled


def l2_normalize(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """Each row of ``x`` scaled to unit Euclidean length (all-zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    unit: npt.NDArray[np.float32] = (x / np.maximum(norms, _MIN_NORM)).astype(
        np.float32, copy=False
    )
    return unit
