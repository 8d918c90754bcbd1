"""What a bulk job is asked to do: ``JobOptions`` (the input, the output, the options that shape
it and are compared on ``--resume``, the files kept beside the output) and the job's sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from akidb_embed.encodings import DEFAULT_ENCODING

__all__ = ["CHUNK_TEXTS", "IN_FLIGHT_CHUNKS", "PROGRESS_SUFFIX", "SKIPPED_SUFFIX", "JobOptions"]

CHUNK_TEXTS = 512
"""Good texts per chunk: the unit of embedding calls, commits and progress (about 2 s of work
for the default model on 2 cores)."""
IN_FLIGHT_CHUNKS = 3
"""Chunks sent to the worker and not yet written: enough to keep it busy while the previous
chunk is written, and within the client's default ``max_in_flight_texts``."""
PROGRESS_SUFFIX = ".progress.json"
SKIPPED_SUFFIX = ".skipped.jsonl"


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
