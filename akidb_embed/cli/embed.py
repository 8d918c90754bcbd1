"""``akidb-embed embed``: texts (arguments, stdin lines or a file) into JSON lines, .npy or
Parquet, through the resumable file job of ``akidb_embed.bulk`` (or its Ray twin,
``akidb_embed.ray``); what can be checked before the worker starts (files, formats, extras) is
checked first, and a tqdm bar follows the records on a terminal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from akidb_embed.bulk import (
    CHUNK_TEXTS,
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    ClientEmbedder,
    Interrupted,
    JobOptions,
    count_records,
    require_extra,
    require_pyarrow,
    run_job,
)
from akidb_embed.cli.common import EXIT_INTERRUPTED, open_client
from akidb_embed.encodings import DEFAULT_ENCODING, ENCODINGS, check_encoding
from akidb_embed.errors import InvalidInput

__all__ = ["add_parser"]


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    embed = commands.add_parser(
        "embed",
        parents=[common],
        help="embed texts (arguments, stdin lines or a file) into JSON lines, .npy or Parquet",
    )
    embed.add_argument("texts", nargs="*", help="texts to embed; none: read --input (or stdin)")
    embed.add_argument(
        "-i",
        "--input",
        default=None,
        help="input file: .txt (a text per line), .jsonl, .parquet; - or none: stdin lines",
    )
    embed.add_argument(
        "--input-format", choices=INPUT_FORMATS, default=None, help="(default: from the suffix)"
    )
    embed.add_argument("-o", "--output", default=None, help="output file; - or none: stdout")
    embed.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="output format (default: from the output's suffix, else jsonl)",
    )
    embed.add_argument(
        "--text-field", default="text", help="the text's field (.jsonl) or column (.parquet)"
    )
    embed.add_argument(
        "--id-field", default=None, help="a field (column) kept beside each vector as `id`"
    )
    embed.add_argument(
        "--no-text", action="store_true", help="leave the text out of .jsonl and .parquet output"
    )
    embed.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave bad records out and list them in OUTPUT.skipped.jsonl (default: stop at "
        "the first one)",
    )
    embed.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from OUTPUT.progress.json",
    )
    embed.add_argument(
        "--chunk-texts",
        type=int,
        default=CHUNK_TEXTS,
        help="texts per chunk: the unit of embedding calls and of commits (what a kill can lose)",
    )
    embed.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster (ray.init address, e.g. auto or ray://host:10001; none: "
        "a local Ray); needs the `ray` extra",
    )
    embed.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        help="embedding actors on Ray (default: one per CPU of the cluster)",
    )
    embed.add_argument(
        "--model", default=None, help="the model to embed with (default: the default model)"
    )
    embed.add_argument(
        "--prompt-name", default=None, help="one of the model's prompts (default: its own)"
    )
    embed.add_argument(
        "--dimensions",
        type=int,
        default=None,
        help="keep each vector's first N components, normalised again (default: all)",
    )
    embed.add_argument(
        "--encoding",
        default=DEFAULT_ENCODING,
        help=f"values written: {', '.join(ENCODINGS)} (binary/ubinary: packed sign bits, "
        "N/8 bytes per text; default float32)",
    )
    embed.add_argument(
        "--no-normalize",
        action="store_true",
        help="skip L2 normalisation (default: as the model's sentence-transformers configs say)",
    )
    embed.set_defaults(run=_cmd_embed)


@contextmanager
def _progress(total: int | None, description: str, initial: int = 0) -> Iterator[Any]:
    """A tqdm bar on stderr when stderr is a terminal and tqdm is installed; else a no-op."""
    bar: Any = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:  # the `cli` extra is optional: no bar, same output
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=total, initial=initial, desc=description, unit="text", file=sys.stderr)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


_SUFFIX_FORMATS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".npy": "npy",
}


def _file_argument(value: str | None) -> Path | None:
    return None if value in (None, "-") else Path(value)


def _format_of(path: Path | None, given: str | None, default: str, option: str) -> str:
    """The format ``given`` by ``option``, else the one of ``path``'s suffix (``default`` for
    stdin/stdout); an unknown suffix is refused rather than guessed."""
    if given is not None:
        return given
    if path is None:
        return default
    found = _SUFFIX_FORMATS.get(path.suffix.lower())
    if found is None:
        choices = INPUT_FORMATS if option == "--input-format" else OUTPUT_FORMATS
        known = ", ".join(suffix for suffix, name in _SUFFIX_FORMATS.items() if name in choices)
        raise InvalidInput(
            f"{path}: cannot tell its format from the suffix {path.suffix or '(none)'!r} "
            f"(known: {known}); name it with {option} {{{','.join(choices)}}}"
        )
    return found


class _Bar:
    """``bulk.Progress`` as a tqdm bar of records, with rate and ETA (see ``_progress``)."""

    def __init__(self, total: int | None, stack: ExitStack) -> None:
        self._total = total
        self._stack = stack
        self._bar: Any = None

    def start(self, done: int) -> None:
        self._bar = self._stack.enter_context(_progress(self._total, "embedding", done))

    def advance(self, records: int) -> None:
        if self._bar is not None:
            self._bar.update(records)


def _job_options(args: argparse.Namespace) -> JobOptions:
    """The job the arguments describe, checked as far as it can be without the worker."""
    source = _file_argument(args.input)
    output = _file_argument(args.output)
    if args.texts and source is not None:
        raise InvalidInput("give texts as arguments or --input, not both")
    if source is not None and not source.is_file():
        problem = "is not a file" if source.exists() else "does not exist"
        raise InvalidInput(f"input file {source} {problem}")
    output_format = _format_of(output, args.format, "jsonl", "--format")
    input_format = _format_of(source, args.input_format, "txt", "--input-format")
    if input_format not in INPUT_FORMATS:
        raise InvalidInput(f"input format {input_format!r} is not one of {INPUT_FORMATS}")
    if output_format not in OUTPUT_FORMATS:
        raise InvalidInput(f"output format {output_format!r} is not one of {OUTPUT_FORMATS}")
    if args.id_field is not None and output_format == "npy":
        raise InvalidInput(".npy holds vectors only: write .parquet or .jsonl to keep the ids")
    if args.id_field is not None and (args.texts or input_format == "txt"):
        raise InvalidInput("--id-field needs .jsonl or .parquet input")
    if args.resume and (source is None or output is None):
        raise InvalidInput("--resume needs an input file and an output file, not stdin/stdout")
    if "parquet" in (input_format, output_format):
        require_pyarrow()
    encoding = check_encoding(args.encoding)
    if args.ray is not None:
        if args.dimensions is not None or encoding != DEFAULT_ENCODING:
            raise InvalidInput("--dimensions and --encoding are not served with --ray")
        require_extra("ray.data", "ray", "--ray")
    return JobOptions(
        input=source,
        output=output,
        input_format=input_format,
        output_format=output_format,
        text_field=args.text_field,
        id_field=args.id_field,
        include_text=not args.no_text,
        normalize=False if args.no_normalize else None,  # None: the model's own convention
        prompt_name=args.prompt_name,
        dimensions=args.dimensions,
        encoding=encoding,
        skip_bad=args.skip_bad,
        resume=args.resume,
        chunk_texts=args.chunk_texts,
        texts=tuple(args.texts) if args.texts else None,
    )


def _cmd_embed(args: argparse.Namespace) -> int:
    options = _job_options(args)
    if options.output_format != "jsonl" and options.output is None and sys.stdout.isatty():
        raise InvalidInput(f"refusing to write .{options.output_format} to a terminal; use -o FILE")
    total = (
        len(options.texts) if options.texts else count_records(options.input, options.input_format)
    )
    if total == 0 and not options.resume:
        raise InvalidInput(f"no texts to embed: {options.input} is empty")
    with ExitStack() as stack:
        bar = _Bar(total, stack)
        try:
            if args.ray is not None:
                from akidb_embed.ray import run_ray_job

                model_dir = args.model_dir[0] if args.model_dir else None
                summary = run_ray_job(options, args.ray, args.ray_actors, model_dir, bar)
            else:
                client = stack.enter_context(open_client(args))
                embedder = ClientEmbedder(
                    client,
                    args.model,
                    options.normalize,
                    args.prompt_name,
                    dimensions=options.dimensions,
                    encoding=options.encoding,
                )
                stack.callback(embedder.close)
                summary = run_job(options, embedder, bar)
        except Interrupted as exc:
            print(f"akidb-embed: {exc}", file=sys.stderr)
            return EXIT_INTERRUPTED
    print(f"akidb-embed: {summary.line()}", file=sys.stderr)
    return 0
