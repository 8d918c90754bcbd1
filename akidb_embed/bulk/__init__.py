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

One module per concern, each opening with its part of the design:

    options.py    JobOptions: what a job is asked to do, and the sizes of its chunks
    readers.py    the input's records, good and bad, and their cutting into chunks
    embedder.py   the Embedder protocol and the local ClientEmbedder
    writers.py    the .npy, .jsonl and .parquet writers, each committed and rolled back
    output.py     the resumable outputs: commits, the progress file, --resume
    job.py        run_job: chunks in flight, in order; signals; errors that say how to go on
    extras.py     the optional extras (pyarrow, Ray), named in a one-line error when missing
"""

from __future__ import annotations

from akidb_embed.bulk.embedder import ClientEmbedder, Embedded, Embedder, Vectors
from akidb_embed.bulk.extras import require_extra, require_pyarrow
from akidb_embed.bulk.job import (
    Interrupted,
    JobSummary,
    Progress,
    bad_record_error,
    pending_chunks,
    run_job,
)
from akidb_embed.bulk.options import CHUNK_TEXTS, IN_FLIGHT_CHUNKS, JobOptions
from akidb_embed.bulk.output import Output
from akidb_embed.bulk.readers import (
    INPUT_FORMATS,
    BadRecord,
    Chunk,
    Position,
    Record,
    chunks,
    count_records,
    read_records,
)
from akidb_embed.bulk.writers import OUTPUT_FORMATS, open_writer

__all__ = [
    "CHUNK_TEXTS",
    "INPUT_FORMATS",
    "IN_FLIGHT_CHUNKS",
    "OUTPUT_FORMATS",
    "BadRecord",
    "Chunk",
    "ClientEmbedder",
    "Embedded",
    "Embedder",
    "Interrupted",
    "JobOptions",
    "JobSummary",
    "Output",
    "Position",
    "Progress",
    "Record",
    "Vectors",
    "bad_record_error",
    "chunks",
    "count_records",
    "open_writer",
    "pending_chunks",
    "read_records",
    "require_extra",
    "require_pyarrow",
    "run_job",
]
