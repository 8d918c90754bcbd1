"""The output side of a bulk job: one vector writer per format, each appending a chunk's rows,
committing them (the file flushed and synced, and what a resume needs to cut it back to exactly
that point), rolling back to the last commit, and finishing the file.

- ``.npy``: a 128-byte version 1.0 header whose shape is rewritten at every commit, then the
  float32 rows; the file is a valid ``.npy`` of the committed rows after every commit.
- ``.jsonl``: one ``{"id", "text", "embedding"}`` object per line.
- ``.parquet``: Parquet cannot be appended to, so while the job runs each chunk is a complete
  file ``OUTPUT.parts/part-NNNNNNNN.parquet`` (a Parquet dataset pyarrow reads as it is); at
  the end the parts are copied into OUTPUT in row groups of ``PARQUET_ROW_GROUP_ROWS`` rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from akidb_embed.bulk.embedder import Vectors
from akidb_embed.bulk.extras import require_pyarrow
from akidb_embed.bulk.readers import Chunk
from akidb_embed.errors import InvalidInput

__all__ = [
    "NPY_DTYPE",
    "OUTPUT_FORMATS",
    "PARTS_SUFFIX",
    "AppendFile",
    "JsonlWriter",
    "NpyWriter",
    "ParquetWriter",
    "VectorWriter",
    "open_writer",
]

OUTPUT_FORMATS = ("npy", "jsonl", "parquet")
PARQUET_ROW_GROUP_ROWS = 8192
NPY_HEADER_BYTES = 128
"""magic (6) + version (2) + header length (2) + the header dict padded with spaces and a
newline: 128 holds any row count below 10**40 and keeps the data 64-byte aligned."""
NPY_DTYPE: np.dtype[Any] = np.dtype("<f4")
"""The rows' dtype unless the job asks for another ``encoding``."""
PARTS_SUFFIX = ".parts"


class VectorWriter(Protocol):
    """One output format. ``write`` appends a chunk's rows; ``commit`` makes them durable and
    returns what ``resume`` needs to cut the file back to exactly this point; ``finish`` makes
    the final file; ``rollback`` cuts the file back to the last commit; ``discard`` removes
    what it wrote."""

    def write(self, chunk: Chunk, vectors: Vectors) -> None: ...
    def commit(self) -> dict[str, Any]: ...
    def finish(self) -> None: ...
    def rollback(self) -> None: ...
    def discard(self) -> None: ...


def _sync(stream: IO[bytes]) -> None:
    stream.flush()
    with contextlib.suppress(OSError):  # a pipe cannot be synced, and need not be
        os.fsync(stream.fileno())


class AppendFile:
    """A byte file appended to, committed by length, cut back to a committed length."""

    def __init__(self, path: Path, resume: dict[str, Any] | None) -> None:
        self.path = path
        if resume is None:
            self.stream: IO[bytes] = open(path, "wb")  # noqa: SIM115 (closed by close())
            self.committed = 0
        else:
            self.stream = open(path, "r+b")  # noqa: SIM115
            self.committed = int(resume["bytes"])
            self.stream.truncate(self.committed)
            self.stream.seek(self.committed)

    def commit(self) -> int:
        _sync(self.stream)
        self.committed = self.stream.tell()
        return self.committed

    def rollback(self) -> None:
        if not self.stream.closed:
            self.stream.flush()
            self.stream.truncate(self.committed)
            self.stream.close()

    def close(self) -> None:
        self.stream.close()

    def discard(self) -> None:
        self.stream.close()
        self.path.unlink(missing_ok=True)


def _npy_header(rows: int, dimension: int, dtype: np.dtype[Any] = NPY_DTYPE) -> bytes:
    shape = f"({rows}, {dimension})"
    descr: str = dtype.str  # "<f4", "<f2", "|i1", "|u1"
    described = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }"
    body = described.ljust(NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class NpyWriter:
    """float32 rows (or the ``encoding``'s dtype) after a header rewritten with the row count at
    every commit. To stdout the file is spooled to a temporary file first (the header needs the
    final count)."""

    def __init__(
        self,
        path: Path | None,
        dimension: int,
        resume: dict[str, Any] | None,
        dtype: np.dtype[Any] = NPY_DTYPE,
    ) -> None:
        self._dtype = dtype
        self._stdout = path is None
        if path is None:
            spool = tempfile.NamedTemporaryFile(suffix=".npy", delete=False)  # noqa: SIM115
            spool.close()
            path = Path(spool.name)
        self._file = AppendFile(path, resume)
        self._dimension = dimension
        self.rows = 0 if resume is None else int(resume["rows"])
        if resume is None:
            self.commit()  # the header: a valid empty .npy from the start

    def write(self, chunk: Chunk, vectors: Vectors) -> None:
        self._file.stream.write(np.ascontiguousarray(vectors, dtype=self._dtype).tobytes())
        self.rows += len(vectors)

    def commit(self) -> dict[str, Any]:
        stream = self._file.stream
        end = max(stream.tell(), NPY_HEADER_BYTES)
        stream.seek(0)
        stream.write(_npy_header(self.rows, self._dimension, self._dtype))
        stream.seek(end)
        return {"bytes": self._file.commit(), "rows": self.rows}

    def finish(self) -> None:
        self.commit()
        self._file.close()
        if self._stdout:
            with open(self._file.path, "rb") as spool:
                shutil.copyfileobj(spool, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            self._file.path.unlink()

    def rollback(self) -> None:
        self._file.rollback()
        if self._stdout:
            self._file.path.unlink(missing_ok=True)

    def discard(self) -> None:
        self._file.discard()


def _row_fields(include_text: bool, text: str, record_id: Any, with_ids: bool) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if with_ids:
        row["id"] = record_id
    if include_text:
        row["text"] = text
    return row


class JsonlWriter:
    """One ``{"id", "text", "embedding"}`` JSON object per line (id with an id field, text
    unless left out)."""

    def __init__(
        self, path: Path | None, include_text: bool, resume: dict[str, Any] | None
    ) -> None:
        self._file = None if path is None else AppendFile(path, resume)
        self._stream = sys.stdout.buffer if self._file is None else self._file.stream
        self._include_text = include_text

    def write(self, chunk: Chunk, vectors: Vectors) -> None:
        ids = chunk.ids if chunk.ids is not None else [None] * len(chunk.texts)
        lines = []
        for text, record_id, vector in zip(chunk.texts, ids, vectors, strict=True):
            row = _row_fields(self._include_text, text, record_id, chunk.ids is not None)
            row["embedding"] = vector.tolist()
            lines.append(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        self._stream.write("".join(lines).encode("utf-8"))

    def commit(self) -> dict[str, Any]:
        if self._file is None:
            self._stream.flush()
            return {}
        return {"bytes": self._file.commit()}

    def finish(self) -> None:
        self.commit()
        if self._file is not None:
            self._file.close()

    def rollback(self) -> None:
        if self._file is not None:
            self._file.rollback()

    def discard(self) -> None:
        if self._file is not None:
            self._file.discard()


class ParquetWriter:
    """Columns ``id`` (with an id field), ``text`` (unless left out) and ``embedding``, a
    fixed-size list of float32. Each chunk is first a complete part file in OUTPUT.parts/
    (a temporary directory for stdout); ``finish`` copies the parts into the output."""

    def __init__(
        self,
        path: Path | None,
        dimension: int,
        include_text: bool,
        resume: dict[str, Any] | None,
        dtype: np.dtype[Any] = NPY_DTYPE,
    ) -> None:
        require_pyarrow()  # before the first chunk is embedded, not after
        self._dtype = dtype
        self._path = path
        self._parts = (
            Path(tempfile.mkdtemp(suffix=PARTS_SUFFIX))
            if path is None
            else path.with_name(path.name + PARTS_SUFFIX)
        )
        self._dimension = dimension
        self._include_text = include_text
        self.count = 0 if resume is None else int(resume["parts"])
        if resume is None and self._parts.exists():
            shutil.rmtree(self._parts)
        self._parts.mkdir(exist_ok=True)
        self.rollback_parts()

    def _part(self, index: int) -> Path:
        return self._parts / f"part-{index:08d}.parquet"

    def rollback_parts(self) -> None:
        for part in self._parts.iterdir():
            if not part.name.startswith("part-") or int(part.name[5:13]) >= self.count:
                part.unlink()

    def write(self, chunk: Chunk, vectors: Vectors) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns: dict[str, Any] = {}
        if chunk.ids is not None:
            columns["id"] = pa.array(chunk.ids)
        if self._include_text:
            columns["text"] = pa.array(chunk.texts, pa.string())
        flat = pa.array(np.ascontiguousarray(vectors, dtype=self._dtype).reshape(-1))
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, self._dimension)
        temporary = self._parts / f".writing-{self.count:08d}"
        pq.write_table(pa.table(columns), temporary)
        os.replace(temporary, self._part(self.count))
        self.count += 1

    def commit(self) -> dict[str, Any]:
        return {"parts": self.count}

    def finish(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = [self._part(index) for index in range(self.count)]
        if not parts:
            schema = pa.schema(
                [
                    *([pa.field("text", pa.string())] if self._include_text else []),
                    pa.field(
                        "embedding",
                        pa.list_(pa.from_numpy_dtype(self._dtype), self._dimension),
                    ),
                ]
            )
        else:
            schema = pq.read_schema(parts[0])
        sink: Any = str(self._path) if self._path is not None else sys.stdout.buffer
        # fixed row groups whatever the parts: the file depends on the rows alone
        with pq.ParquetWriter(sink, schema) as writer:
            pending: list[Any] = []
            pending_rows = 0
            for part in parts:
                table = pq.read_table(part)
                pending.append(table)
                pending_rows += table.num_rows
                while pending_rows >= PARQUET_ROW_GROUP_ROWS:
                    merged = pa.concat_tables(pending)
                    writer.write_table(merged.slice(0, PARQUET_ROW_GROUP_ROWS))
                    rest = merged.slice(PARQUET_ROW_GROUP_ROWS)
                    pending, pending_rows = [rest], rest.num_rows
            if pending_rows:
                writer.write_table(pa.concat_tables(pending))
        shutil.rmtree(self._parts)

    def rollback(self) -> None:
        if self._path is None:
            shutil.rmtree(self._parts, ignore_errors=True)
        else:
            self.rollback_parts()

    def discard(self) -> None:
        shutil.rmtree(self._parts, ignore_errors=True)


def open_writer(
    output_format: str,
    path: Path | None,
    dimension: int,
    include_text: bool,
    resume: dict[str, Any] | None = None,
    dtype: np.dtype[Any] = NPY_DTYPE,
) -> VectorWriter:
    """The writer of ``output_format`` to ``path`` (None: stdout), new or cut back to the
    commit ``resume``; rows of ``dimension`` values of ``dtype``."""
    if output_format == "npy":
        return NpyWriter(path, dimension, resume, dtype)
    if output_format == "jsonl":
        return JsonlWriter(path, include_text, resume)
    if output_format == "parquet":
        return ParquetWriter(path, dimension, include_text, resume, dtype)
    raise InvalidInput(f"unknown output format {output_format!r}; one of {OUTPUT_FORMATS}")
