"""Embedding on a Ray cluster: an actor class for ``ray.data.Dataset.map_batches`` and the
file job of ``akidb-embed embed --ray [ADDRESS]`` built on it (the ``ray`` extra).

::

    driver: the input's chunks (akidb_embed.bulk's readers and chunker), kept as positions only
      --> ray.data.from_items([{chunk, offset, number, texts}, ...])  (resume: the pending ones)
      --> map_batches(read_chunk)          a task seeks the input to the chunk and reads it with
                                           the same reader: rows {chunk, text, id}
      --> map_batches(EmbeddingActor, concurrency=N)   each actor holds one in-process Engine
                                           (worker/engine.py) and adds an ``embedding`` column
      --> driver, in order (preserve_order): bulk.Output writes and commits chunk by chunk,
          exactly as the local job does (same writers, progress file, --resume, bad records)

Inside a Ray actor the engine runs in the actor's own process: Ray already supervises it, so
no worker subprocess is spawned. The input path must be readable from every node (a shared
file system), as for Ray's own readers.

Use the actor on a dataset of your own::

    ds.map_batches(EmbeddingActor, fn_constructor_kwargs={"model_dir": "/models/minilm"},
                   concurrency=4, batch_size=256)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from akidb_embed.bulk import (
    Chunk,
    JobOptions,
    JobSummary,
    Output,
    Position,
    Progress,
    bad_record_error,
    chunks,
    pending_chunks,
    read_records,
    require_extra,
)
from akidb_embed.errors import InvalidInput

__all__ = ["EmbeddingActor", "run_ray_job"]


class EmbeddingActor:
    """Holds an in-process ``Engine``; called with a batch (a dict of columns), returns it with
    an ``embedding`` column of float32 vectors, row for row."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        normalize: bool | None = None,
        prompt_name: str | None = None,
        text_column: str = "text",
        threads: int = 1,
    ) -> None:
        from akidb_embed.worker.config import WorkerConfig
        from akidb_embed.worker.engine import Engine

        config = WorkerConfig(threads=threads)
        if model_dir is not None:
            config = replace(config, model_dir=Path(model_dir))
        self._engine = Engine.load(config)
        self._normalize = normalize
        self._prompt_name = prompt_name
        self._text_column = text_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        texts = [str(text) for text in batch[self._text_column]]
        batch["embedding"] = self._engine.embed(
            texts, self._normalize, truncate=True, prompt_name=self._prompt_name
        )
        return batch


def _read_chunks(batch: dict[str, Any], options: JobOptions) -> dict[str, Any]:
    """The rows of the chunks named in ``batch``: each chunk's good texts, read from its start
    position."""
    chunk_column: list[int] = []
    texts: list[str] = []
    ids: list[Any] = []
    named = zip(batch["chunk"], batch["offset"], batch["number"], batch["texts"], strict=True)
    for index, offset, number, count in named:
        start = Position(int(offset), int(number))
        records = read_records(
            options.input, options.input_format, options.text_field, options.id_field, start
        )
        chunk = next(chunks(records, int(count), start, int(index), with_ids=True))
        chunk_column += [int(index)] * len(chunk.texts)
        texts += chunk.texts
        ids += chunk.ids or []
    return {"chunk": np.array(chunk_column, np.int64), "text": texts, "id": ids}


class _Metadata:
    """What ``bulk.Output`` needs of an embedder, read from the model directory."""

    def __init__(self, model_dir: Path | None) -> None:
        from akidb_embed.models import default_model_dir, load_metadata

        metadata = load_metadata(model_dir or default_model_dir())
        self.dimension = metadata.dimension
        self.model = metadata.model

    def submit(self, texts: list[str]) -> Any:  # pragma: no cover - the job does not submit
        raise NotImplementedError


def run_ray_job(
    options: JobOptions,
    address: str,
    actors: int | None = None,
    model_dir: Path | None = None,
    progress: Progress | None = None,
) -> JobSummary:
    """``bulk.run_job`` on Ray: the same chunks, outputs, commits and errors; ``address``
    ``"local"`` starts a local Ray."""
    import time

    # typed as Any: the ray extra may or may not be installed where mypy runs
    ray: Any = require_extra("ray", "ray", "--ray")
    require_extra("ray.data", "ray", "--ray")

    if options.input is None or options.texts is not None:
        raise InvalidInput("--ray reads an input file (--input), not stdin or arguments")
    options = replace(options, input=options.input.resolve())
    model = _Metadata(model_dir)
    output = Output(options, model)
    summary = JobSummary(tokens=None, resumed_at=output.state["rows"])  # actors do not count
    started = time.perf_counter()
    if progress is not None:
        progress.start(output.state["records"])
    with output.committing():
        # the driver's pass: chunk boundaries and bad records, no texts kept
        plan: list[tuple[Chunk, Position]] = []
        start = output.start
        for chunk in pending_chunks(options, output):
            plan.append((replace(chunk, texts=[""] * len(chunk.texts), ids=None), start))
            start = chunk.end
        if not ray.is_initialized():
            ray.init(address=None if address == "local" else address, log_to_driver=False)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        dataset = ray.data.from_items(
            [
                {
                    "chunk": chunk.index,
                    "offset": start.offset,
                    "number": start.number,
                    "texts": len(chunk.texts),
                }
                for chunk, start in plan
                if chunk.texts
            ]
        )
        embedded = dataset.map_batches(
            _read_chunks, batch_size=1, fn_kwargs={"options": options}, num_cpus=0
        ).map_batches(
            EmbeddingActor,
            fn_constructor_kwargs={
                "model_dir": str(model_dir) if model_dir else None,
                "normalize": options.normalize,
                "prompt_name": options.prompt_name,
            },
            concurrency=actors or max(1, cpus),
            batch_size=options.chunk_texts,
            num_cpus=1,
        )
        rows = iter(embedded.iter_rows()) if plan else iter(())
        for chunk, _ in plan:
            received = [next(rows) for _ in chunk.texts]
            assert all(row["chunk"] == chunk.index for row in received)
            ids = [row["id"] for row in received] if options.id_field is not None else None
            vectors = np.array([row["embedding"] for row in received], dtype=np.float32)
            texts = [str(row["text"]) for row in received]
            output.write(replace(chunk, texts=texts, ids=ids), vectors.reshape(-1, model.dimension))
            summary.texts += len(texts)
            summary.skipped += len(chunk.bad)
            if progress is not None:
                progress.advance(chunk.records)
            if chunk.stop is not None:  # the good records before it are committed
                raise bad_record_error(chunk.stop, output.state["rows"], options)
    summary.seconds = time.perf_counter() - started
    return summary
