"""The resumable outputs of a bulk job: the vector writer, the skipped-records file and the
progress file that commits both, together (``Output``).

A chunk is the commit unit. After chunk k is written, the writer flushes its file to the OS (and
fsyncs it) and reports what resuming needs (``commit()``); then the progress file is replaced
atomically with: the chunks, rows and skipped records committed, the input position of the next
record (a byte offset for line formats, a row for Parquet), each writer's commit, the input's
size and mtime and the options that shape the output. ``--resume`` checks the input and options,
cuts every output back to its commit (``.npy`` and ``.jsonl``: truncated to the committed byte
length; Parquet: parts past the committed count deleted), seeks the reader to the next record
and goes on. Chunks hold a fixed number of good texts counted from the start of the file, so the
chunks after a resume are the chunks an uninterrupted run would have made, and the finished file
is the same, bit for bit. The progress file is deleted when the job finishes.

A job that fails before its first commit, or that finds no text at all, leaves no output
behind; one that fails later leaves the outputs at their last commit, which ``--resume`` takes
up.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from akidb_embed.bulk.embedder import Embedder, Vectors
from akidb_embed.bulk.options import JobOptions
from akidb_embed.bulk.readers import Chunk, Position
from akidb_embed.bulk.writers import AppendFile, open_writer
from akidb_embed.encodings import encoding_dtype
from akidb_embed.errors import InvalidInput

__all__ = ["Output"]

PROGRESS_VERSION = 1


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

    def _open_skipped(self, state: dict[str, Any] | None) -> AppendFile | None:
        """The skipped-records file: new, cut back to its commit, or None (no ``skip_bad``
        and none written before)."""
        path, committed = self.options.skipped_path, state["skipped"] if state else None
        if path is None:
            return None
        if committed is not None and committed["count"] == 0:
            committed = None  # nothing skipped yet (a run without --skip-bad, say): start it
        if committed is None:
            return AppendFile(path, None) if self.options.skip_bad else None
        if not path.exists():
            raise InvalidInput(
                f"cannot resume: {path} is missing; it listed the {committed['count']} bad "
                "records skipped so far"
            )
        return AppendFile(path, committed)

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
