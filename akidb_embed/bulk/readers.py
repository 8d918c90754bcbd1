"""The input side of a bulk job: the records of a ``.txt``, ``.jsonl`` or ``.parquet`` file (or
stdin), good and bad, from any position, and their cutting into chunks of good texts.

A record is good or bad (invalid UTF-8 or JSON, not an object, a missing field, a text that is
not a string); a bad one keeps its line (row) number and what is wrong with it. Chunks hold a
fixed number of good texts counted from the start of the input, so that the chunks after a
resume are the ones an uninterrupted run would have made.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from akidb_embed.bulk.extras import require_pyarrow
from akidb_embed.bulk.options import CHUNK_TEXTS
from akidb_embed.errors import InvalidInput

__all__ = [
    "INPUT_FORMATS",
    "BadRecord",
    "Chunk",
    "Position",
    "Record",
    "chunks",
    "count_records",
    "read_records",
]

INPUT_FORMATS = ("txt", "jsonl", "parquet")
PARQUET_READ_ROWS = 4096


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
