"""Bulk embedding of a file: a reader per input format, a writer per output format, and the
resumable job that streams one into the other (``akidb-embed embed --input F --output F``).

::

    input (.txt | .jsonl | .parquet | stdin)
      --read_records--> Record(number, text, id) or a bad one (number, problem)
      --chunks--> Chunk k: the next CHUNK_TEXTS good texts (+ the bad records met on the way)
      --embedder--> vectors      local: EmbeddingClient, IN_FLIGHT_CHUNKS chunks in flight
                                 Ray: akidb_embed.ray, the same chunks through map_batches
      --in order--> Output.write: the vector writer (.npy | .jsonl | .parquet) and, with
                    skip_bad, OUTPUT.skipped.jsonl
      --commit--> OUTPUT.progress.json, rewritten after every chunk

Memory is bounded by the chunks in flight, never by the file: the reader is a generator, the
embedder holds at most ``IN_FLIGHT_CHUNKS`` chunks, and the writer appends and forgets.

Resume. A chunk is the commit unit. After chunk k is written, the writer flushes its file to
the OS (and fsyncs it) and reports what resuming needs (``commit()``); then the progress file is
replaced atomically with: the chunks, rows and skipped records committed, the input position of
the next record (a byte offset for line formats, a row for Parquet), each writer's commit, the
input's size and mtime and the options that shape the output. ``--resume`` checks the input and
options, cuts every output back to its commit (``.npy`` and ``.jsonl``: truncated to the
committed byte length; Parquet: parts past the committed count deleted), seeks the reader to the
next record and goes on. Chunks hold a fixed number of good texts counted from the start of the
file, so the chunks after a resume are the chunks an uninterrupted run would have made, and the
finished file is the same, bit for bit. The progress file is deleted when the job finishes.

- ``.npy``: a 128-byte version 1.0 header whose shape is rewritten at every commit, then the
  float32 rows; the file is a valid ``.npy`` of the committed rows after every commit.
- ``.jsonl``: one ``{"id", "text", "embedding"}`` object per line.
- ``.parquet``: Parquet cannot be appended to, so while the job runs each chunk is a complete
  file ``OUTPUT.parts/part-NNNNNNNN.parquet`` (a Parquet dataset pyarrow reads as it is); at
  the end the parts are copied into OUTPUT in row groups of ``PARQUET_ROW_GROUP_ROWS`` rows.

Ctrl-C (SIGINT) or SIGTERM: no further chunk is sent, the chunks in flight are written and
committed, the outputs end at that commit, and the job raises ``Interrupted``. A second Ctrl-C
stops at once; like a kill, it may leave bytes past the commit, which ``--resume`` cuts.

Bad records (invalid UTF-8 or JSON, not an object, a missing field, a text that is not a
string) are reported with their line (row) number: by default the job stops at the first one,
having committed every good record before it (the chunk it is in ends there), so that
``--resume --skip-bad`` goes on from that record; with ``skip_bad`` they are left out and
listed in OUTPUT.skipped.jsonl. A chunk so cut short is completed by the first chunk after a
resume, so chunks still start at multiples of the chunk size in good texts.

A job that fails before its first commit, or that finds no text at all, leaves no output
behind; one that fails later leaves the outputs at their last commit, which ``--resume`` takes
up.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol

import numpy as np
import numpy.typing as npt

from akidb_embed.encodings import DEFAULT_ENCODING, check_dimensions, encoding_dtype, row_width
from akidb_embed.errors import EmbeddingError, InvalidInput, ServiceUnavailable

__all__ = [
    "CHUNK_TEXTS",
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "BadRecord",
    "Chunk",
    "Embedded",
    "Embedder",
    "Interrupted",
    "JobOptions",
    "JobSummary",
    "Position",
    "Progress",
    "Record",
    "bad_record_error",
    "chunks",
    "read_records",
    "require_extra",
    "run_job",
]

INPUT_FORMATS = ("txt", "jsonl", "parquet")
OUTPUT_FORMATS = ("npy", "jsonl", "parquet")

CHUNK_TEXTS = 512
"""Good texts per chunk: the unit of embedding calls, commits and progress (about 2 s of work
for the default model on 2 cores)."""
IN_FLIGHT_CHUNKS = 3
"""Chunks sent to the worker and not yet written: enough to keep it busy while the previous
chunk is written, and within the client's default ``max_in_flight_texts``."""
PARQUET_READ_ROWS = 4096
PARQUET_ROW_GROUP_ROWS = 8192
NPY_HEADER_BYTES = 128
"""magic (6) + version (2) + header length (2) + the header dict padded with spaces and a
newline: 128 holds any row count below 10**40 and keeps the data 64-byte aligned."""
NPY_DTYPE: np.dtype[Any] = np.dtype("<f4")
"""The rows' dtype unless the job asks for another ``encoding``."""
PROGRESS_SUFFIX = ".progress.json"
SKIPPED_SUFFIX = ".skipped.jsonl"
PARTS_SUFFIX = ".parts"
PROGRESS_VERSION = 1


class Interrupted(Exception):
    """The job stopped on SIGINT/SIGTERM after committing ``rows`` rows."""

    def __init__(self, rows: int, progress_file: Path | None) -> None:
        where = ""
        if progress_file is not None and progress_file.exists():
            where = f"; run the same command with --resume to continue ({progress_file})"
        super().__init__(f"interrupted: {rows} rows written and committed{where}")
        self.rows = rows


def require_extra(module: str, extra: str, purpose: str) -> Any:
    """``module`` imported, or ``ServiceUnavailable`` naming the extra of akidb-embed that
    installs it (checked before any work, so that a missing one costs nothing)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ServiceUnavailable(
            f"{purpose} needs {module.split('.')[0]}, which the `{extra}` extra installs "
            f"(pip install -e '.[{extra}]' in the checkout)"
        ) from None


def require_pyarrow() -> Any:
    return require_extra("pyarrow.parquet", "files", "Parquet input and output")


# -- records and chunks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """Where the next record starts: ``offset`` in bytes (line formats) or rows (Parquet), and
    its line (row) number counted from 1."""

    offset: int = 0
    number: int = 1


@dataclass(slots=True)
class Record:
    """One input record; ``problem`` set means a bad one (``text`` is then None)."""

    number: int
    end: int
    """The reader's offset just past this record."""
    text: str | None
    id: Any = None
    problem: str | None = None


@dataclass(frozen=True)
class BadRecord:
    number: int
    problem: str


@dataclass
class Chunk:
    index: int
    texts: list[str]
    ids: list[Any] | None
    bad: list[BadRecord]
    """The bad records met since the previous chunk, left out (``skip_bad``)."""
    end: Position
    """Where the record after this chunk starts: what a resume seeks to."""
    records: int
    """Records consumed, good and bad."""
    stop: BadRecord | None = None
    """The bad record the job stops at (without ``skip_bad``): this chunk ends just before it
    and is the last one."""


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line


def _decode(line: bytes) -> str:
    try:
        return _strip_eol(line).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start}") from None


def _line_records(
    stream: IO[bytes], start: Position, parse: Callable[[str], tuple[str, Any]]
) -> Iterator[Record]:
    if start.offset:
        stream.seek(start.offset)
    offset, number = start.offset, start.number
    for line in stream:
        offset += len(line)
        try:
            text, record_id = parse(_decode(line))
        except ValueError as exc:
            yield Record(number, offset, None, problem=str(exc))
        else:
            yield Record(number, offset, text, record_id)
        number += 1


def _whole_line(line: str) -> tuple[str, Any]:
    return line, None


_JSON_TYPES = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    list: "an array",
    dict: "an object",
}


def _json_type(value: Any) -> str:
    """``value``'s JSON type with its article, for messages: "null", "a number"."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _jsonl_parser(text_field: str, id_field: str | None) -> Callable[[str], tuple[str, Any]]:
    def parse(line: str) -> tuple[str, Any]:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(item, dict):
            raise ValueError(f"not a JSON object but {_json_type(item)}")
        if text_field not in item:
            raise ValueError(f"no field {text_field!r}")
        text = item[text_field]
        if not isinstance(text, str):
            raise ValueError(f"field {text_field!r} is {_json_type(text)}, not a string")
        if id_field is None:
            return text, None
        if id_field not in item:
            raise ValueError(f"no field {id_field!r}")
        return text, item[id_field]

    return parse


def _parquet_records(
    path: Path, start: Position, text_field: str, id_field: str | None
) -> Iterator[Record]:
    require_pyarrow()
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    for name in (text_field, id_field):
        if name is not None and name not in schema.names:
            raise InvalidInput(f"{path} has no column {name!r}; its columns: {schema.names}")
    text_type = schema.field(text_field).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise InvalidInput(f"{path}: column {text_field!r} holds {text_type}, not strings")
    columns = [text_field] if id_field is None else [text_field, id_field]
    # start at the row group holding the start row: a resume does not read what it skips
    row, groups = 0, list(range(parquet.num_row_groups))
    while groups and row + parquet.metadata.row_group(groups[0]).num_rows <= start.offset:
        row += parquet.metadata.row_group(groups.pop(0)).num_rows
    if not groups:
        return
    for batch in parquet.iter_batches(PARQUET_READ_ROWS, row_groups=groups, columns=columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if id_field is not None else [None] * len(texts)
        for text, record_id in zip(texts, ids, strict=True):
            row += 1
            if row <= start.offset:
                continue
            if text is None:
                yield Record(row, row, None, problem=f"column {text_field!r} is null")
            else:
                yield Record(row, row, text, record_id)


def read_records(
    source: Path | None,
    input_format: str,
    text_field: str = "text",
    id_field: str | None = None,
    start: Position = Position(),
) -> Iterator[Record]:
    """The records of ``source`` (None: stdin) from ``start``, good and bad, in order."""
    if input_format == "parquet":
        if source is None:
            raise InvalidInput("Parquet input must be a file, not stdin")
        yield from _parquet_records(source, start, text_field, id_field)
        return
    parse: Callable[[str], tuple[str, Any]] = _jsonl_parser(text_field, id_field)
    if input_format == "txt":
        if id_field is not None:
            raise InvalidInput("--id-field needs .jsonl or .parquet input")
        parse = _whole_line
    if source is None:
        yield from _line_records(sys.stdin.buffer, start, parse)
        return
    with open(source, "rb") as stream:
        yield from _line_records(stream, start, parse)


def count_records(source: Path | None, input_format: str) -> int | None:
    """Records in ``source`` for the progress bar's total (None: unknown, stdin), at the cost of
    one fast pass over the newlines (or none: Parquet's footer)."""
    if source is None:
        return None
    if input_format == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(source).metadata.num_rows)
    lines, last = 0, b"\n"
    with open(source, "rb") as stream:
        while block := stream.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def chunks(
    records: Iterator[Record],
    size: int = CHUNK_TEXTS,
    start: Position = Position(),
    first_index: int = 0,
    with_ids: bool = False,
    *,
    done: int = 0,
    stop_at_bad: bool = False,
) -> Iterator[Chunk]:
    """``records`` cut into chunks of ``size`` good texts counted from the start of the input
    (``done``: the good texts before ``start``; the first chunk completes a chunk cut short),
    the last one shorter, each with the bad records met since the previous chunk.
    ``stop_at_bad``: the first bad record ends the chunk before it (``Chunk.stop``), and the
    cutting."""
    index, end = first_index, start
    wanted = size - done % size
    texts: list[str] = []
    ids: list[Any] = []
    bad: list[BadRecord] = []
    consumed = 0
    for record in records:
        if record.problem is not None or record.text is None:
            problem = BadRecord(record.number, record.problem or "no text")
            if stop_at_bad:
                ids_kept = ids if with_ids else None
                yield Chunk(index, texts, ids_kept, bad, end, consumed, stop=problem)
                return
            bad.append(problem)
        else:
            texts.append(record.text)
            ids.append(record.id)
        consumed += 1
        end = Position(record.end, record.number + 1)
        if len(texts) == wanted:
            yield Chunk(index, texts, ids if with_ids else None, bad, end, consumed)
            index, texts, ids, bad, consumed, wanted = index + 1, [], [], [], 0, size
    if texts or bad:
        yield Chunk(index, texts, ids if with_ids else None, bad, end, consumed)


# -- writers -----------------------------------------------------------------------------------

Vectors = npt.NDArray[Any]
"""float32 rows, or the job's ``encoding``'s."""


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


class _AppendFile:
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
        self._file = _AppendFile(path, resume)
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
        self._file = None if path is None else _AppendFile(path, resume)
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


# -- the job -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedded:
    vectors: Vectors
    tokens: int


class Embedder(Protocol):
    """What the job embeds with: a model's dimension, and chunks submitted in order."""

    dimension: int
    model: str

    def submit(self, texts: list[str]) -> Future[Embedded]: ...


@dataclass(frozen=True)
class JobOptions:
    """One file job. The fields under "shape the output" must match on ``--resume``."""

    input: Path | None
    output: Path | None
    input_format: str
    output_format: str
    text_field: str = "text"
    id_field: str | None = None
    include_text: bool = True
    normalize: bool | None = None
    prompt_name: str | None = None
    dimensions: int | None = None
    encoding: str = DEFAULT_ENCODING
    skip_bad: bool = False
    resume: bool = False
    chunk_texts: int = CHUNK_TEXTS
    skipped_file: Path | None = field(default=None)
    texts: tuple[str, ...] | None = None
    """Texts given directly (the command's arguments) instead of an input file."""

    def shape(self, model: str) -> dict[str, Any]:
        """The facts the output depends on, compared on resume."""
        return {
            "model": model,
            "input_format": self.input_format,
            "output_format": self.output_format,
            "text_field": self.text_field,
            "id_field": self.id_field,
            "include_text": self.include_text,
            "normalize": self.normalize,
            "prompt_name": self.prompt_name,
            "chunk_texts": self.chunk_texts,
            # only when asked for: a run started before these options existed still resumes
            **({"dimensions": self.dimensions} if self.dimensions is not None else {}),
            **({"encoding": self.encoding} if self.encoding != DEFAULT_ENCODING else {}),
        }

    @property
    def progress_file(self) -> Path | None:
        return None if self.output is None else _beside(self.output, PROGRESS_SUFFIX)

    @property
    def skipped_path(self) -> Path | None:
        if self.skipped_file is not None or self.output is None:
            return self.skipped_file
        return _beside(self.output, SKIPPED_SUFFIX)


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


@dataclass
class JobSummary:
    texts: int = 0
    tokens: int | None = 0
    """None: not counted (the Ray job's actors do not report tokens)."""
    skipped: int = 0
    seconds: float = 0.0
    resumed_at: int = 0
    """Rows already committed when this run started (``--resume``)."""

    def line(self) -> str:
        rate = self.texts / self.seconds if self.seconds > 0 else 0.0
        tokens = "" if self.tokens is None else f", {self.tokens} tokens"
        line = f"{self.texts} texts{tokens} in {self.seconds:.1f} s: {rate:.1f} texts/s"
        if self.skipped:
            line += f"; {self.skipped} bad record{'s' if self.skipped > 1 else ''} skipped"
        if self.resumed_at:
            line += f" (resumed after row {self.resumed_at})"
        return line


def _input_identity(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Output:
    """The job's outputs together: the vector writer, the skipped-records file and the progress
    file that commits both."""

    def __init__(self, options: JobOptions, embedder: Embedder) -> None:
        self.options = options
        self.shape = options.shape(embedder.model)
        self.progress_file = options.progress_file
        state = self._load_state()
        if options.resume and (options.input is None or options.output is None):
            raise InvalidInput("--resume needs an input file and an output file, not stdin/stdout")
        self.state: dict[str, Any] = state or {
            "version": PROGRESS_VERSION,
            "input": _input_identity(options.input),
            "shape": self.shape,
            "chunks": 0,
            "rows": 0,
            "records": 0,
            "next": asdict(Position()),
            "writer": None,
            "skipped": {"bytes": 0, "count": 0},
        }
        self.writer = open_writer(
            options.output_format,
            options.output,
            embedder.dimension,
            options.include_text,
            self.state["writer"],
            encoding_dtype(options.encoding),
        )
        self.skipped = self._open_skipped(state)

    def _open_skipped(self, state: dict[str, Any] | None) -> _AppendFile | None:
        """The skipped-records file: new, cut back to its commit, or None (no ``skip_bad``
        and none written before)."""
        path, committed = self.options.skipped_path, state["skipped"] if state else None
        if path is None:
            return None
        if committed is not None and committed["count"] == 0:
            committed = None  # nothing skipped yet (a run without --skip-bad, say): start it
        if committed is None:
            return _AppendFile(path, None) if self.options.skip_bad else None
        if not path.exists():
            raise InvalidInput(
                f"cannot resume: {path} is missing; it listed the {committed['count']} bad "
                "records skipped so far"
            )
        return _AppendFile(path, committed)

    def _load_state(self) -> dict[str, Any] | None:
        options, progress = self.options, self.progress_file
        if progress is None or not progress.exists():
            if options.resume and options.output is not None and options.output.exists():
                raise InvalidInput(
                    f"nothing to resume: {options.output} exists without {progress} "
                    "(it is complete, or was not written by this command)"
                )
            return None
        if not options.resume:
            raise InvalidInput(
                f"{progress} records an interrupted run: pass --resume to continue it, "
                "or delete it to start again"
            )
        state: dict[str, Any] = json.loads(progress.read_text(encoding="utf-8"))
        if state.get("version") != PROGRESS_VERSION:
            raise InvalidInput(f"{progress} was written by another version; delete it")
        if state["input"] != _input_identity(options.input):
            raise InvalidInput(
                f"cannot resume: the input is not the one {progress} was started on "
                f"(recorded {state['input']})"
            )
        if state["shape"] != self.shape:
            changed = sorted(k for k in self.shape if state["shape"].get(k) != self.shape[k])
            raise InvalidInput(
                f"cannot resume: options differ from the interrupted run's ({', '.join(changed)}: "
                f"{', '.join(repr(state['shape'].get(k)) for k in changed)})"
            )
        return state

    @property
    def start(self) -> Position:
        return Position(**self.state["next"])

    def write(self, chunk: Chunk, vectors: Vectors) -> None:
        """Append one chunk and commit it (its bad records are already checked by the job)."""
        if len(chunk.texts):
            self.writer.write(chunk, vectors)
        if chunk.bad and self.skipped is not None:
            self.skipped.stream.write(
                "".join(
                    json.dumps({"line": bad.number, "problem": bad.problem}) + "\n"
                    for bad in chunk.bad
                ).encode("utf-8")
            )
        state = self.state
        state["writer"] = self.writer.commit()
        if self.skipped is not None:
            state["skipped"] = {
                "bytes": self.skipped.commit(),
                "count": state["skipped"]["count"] + len(chunk.bad),
            }
        state["chunks"] = chunk.index + 1
        state["rows"] += len(chunk.texts)
        state["records"] += chunk.records
        state["next"] = asdict(chunk.end)
        if self.progress_file is not None:
            temporary = self.progress_file.with_name(self.progress_file.name + ".tmp")
            temporary.write_text(json.dumps(state), encoding="utf-8")
            os.replace(temporary, self.progress_file)

    def finish(self) -> None:
        self.writer.finish()
        if self.skipped is not None:
            self.skipped.close()
            if self.state["skipped"]["count"] == 0:
                self.skipped.path.unlink()
        if self.progress_file is not None:
            self.progress_file.unlink(missing_ok=True)

    def rollback(self) -> None:
        """Cut every output back to the last commit (on an interruption or an error)."""
        self.writer.rollback()
        if self.skipped is not None:
            self.skipped.rollback()

    def discard(self) -> None:
        """Remove every output: nothing was committed, or there is nothing to keep."""
        self.writer.discard()
        if self.skipped is not None:
            self.skipped.discard()
        if self.progress_file is not None:
            self.progress_file.unlink(missing_ok=True)

    @property
    def resumable(self) -> bool:
        """Whether a progress file records a commit that ``--resume`` can take up."""
        return self.progress_file is not None and self.state["chunks"] > 0

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """The job's block. On any exception (the finish's own included) the outputs are cut
        back to the last commit, or removed when nothing was committed; when the block ends
        with no row written at all, they are removed and ``InvalidInput`` says so; else
        ``finish``."""
        try:
            yield
            if self.state["rows"] == 0:
                raise _NoTexts
            self.finish()
        except _NoTexts:
            self.discard()
            skipped = self.state["skipped"]["count"]
            raise InvalidInput(
                "no texts to embed"
                + (f": every record was bad ({skipped} skipped)" if skipped else "")
            ) from None
        except BaseException:
            if self.state["chunks"] == 0:
                self.discard()
            else:
                self.rollback()
            raise


class _NoTexts(Exception):
    """The job ended without a single good text."""


def _written(options: JobOptions, rows: str) -> str:
    """``rows`` ("the 5 rows before it") and where they are, for a job stopped by an error."""
    if options.output is None:
        return f"{rows} were written"
    where = str(options.output)
    if options.output_format == "parquet":
        where = f"{options.output}{PARTS_SUFFIX}/ ({options.output} is written at the end)"
    return f"{rows} are committed to {where}"


def bad_record_error(bad: BadRecord, rows: int, options: JobOptions) -> InvalidInput:
    """The error of a job stopped at the bad record ``bad``, with ``rows`` rows committed: what
    is wrong, what was written, how to go on."""
    unit = "row" if options.input_format == "parquet" else "line"
    written = _written(options, f"the {rows} rows before it")
    stopped = f"{unit} {bad.number}: {bad.problem}. Stopped there: {written}"
    if options.output is None:
        return InvalidInput(f"{stopped}; --skip-bad leaves such records out")
    return InvalidInput(
        f"{stopped}; run the same command with --resume --skip-bad to go on from {unit} "
        f"{bad.number}, leaving such records out (listed in {options.skipped_path})"
    )


def _failed_after_commits(error: EmbeddingError, output: Output) -> EmbeddingError:
    """``error`` (the embedder's) with what was committed and how to resume, if anything was."""
    if not output.resumable:
        return error
    written = _written(output.options, f"{output.state['rows']} rows")
    message = (
        f"{error.message}. Stopped: {written}; "
        f"run the same command with --resume to go on ({output.progress_file})"
    )
    if isinstance(error, InvalidInput):
        return InvalidInput(message, error.index)
    return type(error)(message)


class _StopOnSignal:
    """SIGINT/SIGTERM ask the job to stop after the chunks in flight; a second one stops at
    once (KeyboardInterrupt). Installed only in the main thread, where Python delivers them."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nakidb-embed: stopping after the chunks in flight", file=sys.stderr)

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def pending_chunks(options: JobOptions, output: Output) -> Iterator[Chunk]:
    """The chunks of the input not committed yet; without ``skip_bad`` the last one ends
    before the first bad record."""
    start = output.start
    if options.texts is not None:
        records: Iterator[Record] = (
            Record(number, number, text) for number, text in enumerate(options.texts, 1)
        )
    else:
        records = read_records(
            options.input, options.input_format, options.text_field, options.id_field, start
        )
    return chunks(
        records,
        options.chunk_texts,
        start,
        first_index=output.state["chunks"],
        with_ids=options.id_field is not None,
        done=output.state["rows"],
        stop_at_bad=not options.skip_bad,
    )


class Progress(Protocol):
    """Told the records already done when the job starts, then the records of each chunk."""

    def start(self, done: int) -> None: ...
    def advance(self, records: int) -> None: ...


def run_job(
    options: JobOptions,
    embedder: Embedder,
    progress: Progress | None = None,
    in_flight: int = IN_FLIGHT_CHUNKS,
) -> JobSummary:
    """Embed ``options.input`` into ``options.output`` with ``embedder``, ``in_flight`` chunks
    at a time, committing after each chunk; ``progress`` follows the records written.
    Raises ``InvalidInput`` (a bad record without ``skip_bad``, unusable options or input, no
    text at all), the embedder's errors and ``Interrupted``; on any failure the outputs are
    left at their last commit (none: removed), and the message of an error says how to go
    on."""
    output = Output(options, embedder)
    summary = JobSummary(resumed_at=output.state["rows"])
    started = time.perf_counter()
    if progress is not None:
        progress.start(output.state["records"])
    waiting: deque[tuple[Chunk, Future[Embedded] | None]] = deque()

    def write_oldest() -> None:
        chunk, future = waiting.popleft()
        try:
            embedded = future.result() if future is not None else None
        except EmbeddingError as exc:
            raise _failed_after_commits(exc, output) from None
        vectors = embedded.vectors if embedded else np.zeros((0, embedder.dimension), NPY_DTYPE)
        output.write(chunk, vectors)
        summary.texts += len(chunk.texts)
        summary.tokens = (summary.tokens or 0) + (embedded.tokens if embedded else 0)
        summary.skipped += len(chunk.bad)
        if progress is not None:
            progress.advance(chunk.records)

    with output.committing(), _StopOnSignal() as stop:
        for chunk in pending_chunks(options, output):
            if stop.requested:
                break
            future = embedder.submit(chunk.texts) if chunk.texts else None
            waiting.append((chunk, future))
            if chunk.stop is not None:  # every good record before it is committed first
                while waiting:
                    write_oldest()
                raise bad_record_error(chunk.stop, output.state["rows"], options)
            if len(waiting) >= in_flight:
                write_oldest()
        while waiting:
            write_oldest()
        if stop.requested:
            raise Interrupted(output.state["rows"], options.progress_file)
    summary.seconds = time.perf_counter() - started
    return summary


class ClientEmbedder:
    """The local embedder: an ``EmbeddingClient`` called from a few threads, so that chunks are
    in flight together and the worker batches them while the job reads and writes."""

    def __init__(
        self,
        client: Any,
        model: str | None = None,
        normalize: bool | None = None,
        prompt_name: str | None = None,
        threads: int = IN_FLIGHT_CHUNKS,
        dimensions: int | None = None,
        encoding: str = DEFAULT_ENCODING,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from akidb_embed.host_client import BatchEmbeddingRequest

        info = client.model_info(model)
        kept = check_dimensions(dimensions, info.dimension, encoding, info.model)
        self.dimension: int = row_width(encoding, kept)
        """Values per row: the dimensions kept, or their bytes when bit-packed."""
        self.model: str = info.model
        self._client = client
        self._encoding = encoding
        self._request = partial(
            BatchEmbeddingRequest,
            info.model,
            normalize=normalize,
            prompt_name=prompt_name,
            dimensions=dimensions,
        )
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="akidb-embed-bulk")

    def _embed(self, texts: Sequence[str]) -> Embedded:
        response = self._client.embed_encoded(self._request(texts), self._encoding)
        return Embedded(response.embeddings, response.usage.total_tokens)

    def submit(self, texts: list[str]) -> Future[Embedded]:
        return self._pool.submit(self._embed, texts)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
