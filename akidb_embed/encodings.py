"""What an ``embed`` reply may carry instead of full float32 vectors: ``dimensions`` and
``encoding`` (protocol.md, ``embed``), the one copy of that math, shared by the worker (which
applies it) and the host clients (which check a request and read the reply).

::

    pooled vectors (n, dimension) float32
        --first `dimensions` components-->  (sentence-transformers' truncate_dim)
        --L2-normalised when normalize is on-->  (its normalize_embeddings)
        --encoding-->
            float32   as they are                      (n, dimensions) <f4
            float16   rounded to half precision        (n, dimensions) <f2
            int8      floor((x - min) / step) - 128    (n, dimensions) i1   per-dimension min and
            uint8     floor((x - min) / step)          (n, dimensions) u1   step = (max - min) / 255
            binary    sign bits, np.packbits, - 128    (n, dimensions / 8) i1
            ubinary   sign bits, np.packbits           (n, dimensions / 8) u1

The packed and scalar forms are sentence-transformers' ``quantize_embeddings`` (6.x) bit for
bit. The int8/uint8 ranges are never taken from the request's own vectors (which would make a
text's codes depend on the batch it came in): they are the per-dimension min and max of the
model's *calibration vectors* (``calibration.npy`` in its directory, written at
provisioning; models/metadata.py) after the same truncation and normalisation, so a text
quantises the same alone and in any batch. Values outside the calibrated range are clipped to
0 or 255, as sentence-transformers clips them. numpy only: the host clients import this
module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from akidb_embed.errors import InvalidInput

__all__ = [
    "DEFAULT_ENCODING",
    "ENCODINGS",
    "PACKED_ENCODINGS",
    "RANGED_ENCODINGS",
    "TRUNCATION_SIDES",
    "OutputForm",
    "check_dimensions",
    "check_encoding",
    "check_truncation_side",
    "dequantize",
    "encoding_dtype",
    "quantization_ranges",
    "row_width",
]

DEFAULT_ENCODING = "float32"
ENCODINGS: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "binary": np.dtype("i1"),
    "ubinary": np.dtype("u1"),
}
"""Each encoding a request may ask for, and the numpy dtype of its values on the wire (the reply's
``dtype`` is the encoding's name; values are little-endian, row-major)."""
PACKED_ENCODINGS = ("binary", "ubinary")
"""One bit per component, eight components per byte."""
RANGED_ENCODINGS = ("int8", "uint8")
"""Scalar quantisation over per-dimension ranges from the model's calibration vectors."""
TRUNCATION_SIDES = ("right", "left")
"""Where an over-long input is cut: ``right`` keeps its start, ``left`` its end."""
_LEVELS = 255


def check_encoding(value: object) -> str:
    """``value`` as an encoding name, or ``InvalidInput`` naming the field and the choices."""
    if value is None:
        return DEFAULT_ENCODING
    if not isinstance(value, str) or value not in ENCODINGS:
        shown = repr(value) if isinstance(value, str) else f"a {type(value).__name__}"
        raise InvalidInput(f"encoding must be one of {', '.join(ENCODINGS)}, not {shown}")
    return value


def check_truncation_side(value: object) -> str:
    """``value`` as a truncation side, or ``InvalidInput`` naming the field and the choices."""
    if value is None:
        return TRUNCATION_SIDES[0]
    if not isinstance(value, str) or value not in TRUNCATION_SIDES:
        shown = repr(value) if isinstance(value, str) else f"a {type(value).__name__}"
        raise InvalidInput(f"truncation_side must be 'right' or 'left', not {shown}")
    return value


def check_dimensions(value: object, model_dimension: int, encoding: str, model: str) -> int:
    """The components kept for a request's ``dimensions`` (None: all of them), or
    ``InvalidInput`` naming the field: not an integer, below 1, above the model's dimension, or
    not a multiple of 8 for a packed encoding."""
    if value is None:
        kept = model_dimension
    elif not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"dimensions must be an integer or nil, not a {type(value).__name__}")
    elif not 1 <= value <= model_dimension:
        raise InvalidInput(
            f"dimensions must be from 1 to {model_dimension} (the dimension of {model}), "
            f"not {value}"
        )
    else:
        kept = value
    if encoding in PACKED_ENCODINGS and kept % 8:
        raise InvalidInput(
            f"dimensions {kept} is not a multiple of 8, which encoding {encoding!r} packs "
            "into bytes"
        )
    return kept


def encoding_dtype(encoding: str) -> np.dtype[Any]:
    return ENCODINGS[encoding]


def row_width(encoding: str, dimensions: int) -> int:
    """Values per row on the wire: ``dimensions``, or ``dimensions / 8`` bytes when packed."""
    return dimensions // 8 if encoding in PACKED_ENCODINGS else dimensions


def _shortened(
    vectors: npt.NDArray[np.float32], dimensions: int, normalize: bool
) -> npt.NDArray[np.float32]:
    """The first ``dimensions`` components of each row, L2-normalised when ``normalize``."""
    kept = vectors[:, :dimensions]
    if not normalize:
        return kept
    norms = np.linalg.norm(kept, axis=1, keepdims=True)
    unit: npt.NDArray[np.float32] = (kept / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


def quantization_ranges(
    calibration: npt.NDArray[np.float32], dimensions: int, normalize: bool
) -> npt.NDArray[np.float32]:
    """The (2, dimensions) per-dimension min and max of the calibration vectors after the
    same truncation and normalisation as a request's vectors."""
    shaped = _shortened(np.asarray(calibration, dtype=np.float32), dimensions, normalize)
    return np.vstack((shaped.min(axis=0), shaped.max(axis=0))).astype(np.float32)


def dequantize(
    codes: npt.NDArray[Any], encoding: str, ranges: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """int8/uint8 ``codes`` mapped back onto the float scale of ``ranges`` (the bottom of each
    code's step, as sentence-transformers' ``_dequantize_embeddings``). Compare codes this way:
    their raw dot product weighs each dimension by its own offset and step."""
    steps = (ranges[1] - ranges[0]) / _LEVELS
    steps = np.where(steps == 0, 1, steps)
    levels = codes.astype(np.float32) + (128 if encoding == "int8" else 0)
    restored: npt.NDArray[np.float32] = (levels * steps + ranges[0]).astype(np.float32)
    return restored


@dataclass(frozen=True)
class OutputForm:
    """What one request's vectors become on the wire (see the module's picture)."""

    dimensions: int
    """Components kept (the model's dimension: all)."""
    normalize: bool
    encoding: str = DEFAULT_ENCODING
    ranges: npt.NDArray[np.float32] | None = None
    """(2, dimensions) min and max per dimension; required for int8 and uint8."""

    def shortens(self, model_dimension: int) -> bool:
        """Whether normalisation must wait for the truncation (it applies to the kept part)."""
        return self.dimensions < model_dimension

    def apply(self, vectors: npt.NDArray[np.float32], normalized: bool) -> npt.NDArray[Any]:
        """``vectors`` (pooled; already L2-normalised when ``normalized``) in this form."""
        shaped = _shortened(vectors, self.dimensions, self.normalize and not normalized)
        encoding = self.encoding
        if encoding == "float32":
            return np.ascontiguousarray(shaped, dtype=np.float32)
        if encoding == "float16":
            return shaped.astype(np.float16)
        if encoding in PACKED_ENCODINGS:
            bits = np.packbits(shaped > 0, axis=-1)
            return (bits - 128).astype(np.int8) if encoding == "binary" else bits
        assert self.ranges is not None, "int8/uint8 need calibrated ranges"
        starts = self.ranges[0]
        steps = (self.ranges[1] - starts) / _LEVELS
        steps = np.where(steps == 0, 1, steps)
        levels: npt.NDArray[np.float32] = np.clip(np.floor((shaped - starts) / steps), 0, _LEVELS)
        return (levels - 128).astype(np.int8) if encoding == "int8" else levels.astype(np.uint8)
