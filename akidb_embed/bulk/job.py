"""The bulk job itself (``run_job``): the pending chunks read, embedded ``IN_FLIGHT_CHUNKS`` at a
time, written and committed in order; its stop on a signal and its errors, each saying what was
committed and how to go on.

Ctrl-C (SIGINT) or SIGTERM: no further chunk is sent, the chunks in flight are written and
committed, the outputs end at that commit, and the job raises ``Interrupted``. A second Ctrl-C
stops at once; like a kill, it may leave bytes past the commit, which ``--resume`` cuts.

Bad records (invalid UTF-8 or JSON, not an object, a missing field, a text that is not a
string) are reported with their line (row) number: by default the job stops at the first one,
having committed every good record before it (the chunk it is in ends there), so that
``--resume --skip-bad`` goes on from that record; with ``skip_bad`` they are left out and
listed in OUTPUT.skipped.jsonl. A chunk so cut short is completed by the first chunk after a
resume, so chunks still start at multiples of the chunk size in good texts.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import numpy as np

from akidb_embed.bulk.embedder import Embedded, Embedder
from akidb_embed.bulk.options import IN_FLIGHT_CHUNKS, JobOptions
from akidb_embed.bulk.output import Output
from akidb_embed.bulk.readers import BadRecord, Chunk, Record, chunks, read_records
from akidb_embed.bulk.writers import NPY_DTYPE, PARTS_SUFFIX
from akidb_embed.errors import EmbeddingError, InvalidInput

__all__ = [
    "Interrupted",
    "JobSummary",
    "Progress",
    "bad_record_error",
    "pending_chunks",
    "run_job",
]


class Interrupted(Exception):
    """The job stopped on SIGINT/SIGTERM after committing ``rows`` rows."""

    def __init__(self, rows: int, progress_file: Path | None) -> None:
        where = ""
        if progress_file is not None and progress_file.exists():
            where = f"; run the same command with --resume to continue ({progress_file})"
        super().__init__(f"interrupted: {rows} rows written and committed{where}")
        self.rows = rows


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
