"""The ``akidb-embed`` command: embed texts, inspect the model, check health, demo and bench.

Every subcommand goes through the host client (``akidb_embed.host_client``), so it exercises the
same worker process a Rust host would spawn; only ``bench`` also runs ONNX Runtime in-process,
as the reference the bridge is measured against.

    akidb-embed embed "first text" "second text"        # JSON lines on stdout
    cat texts.txt | akidb-embed embed --format npy -o vectors.npy
    akidb-embed embed --model-dir A --model-dir B --model ID --prompt-name query "text"
    akidb-embed embed --dimensions 256 --encoding int8 -i docs.txt -o codes.npy
    akidb-embed info | health | demo | bench
    akidb-embed serve --port 8081          # OpenAI's /v1/embeddings over HTTP (`serve` extra)

Every error is one line on stderr and exit code 2 (130: interrupted); what can be checked
before the worker starts (files, formats, extras) is checked first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

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
from akidb_embed.cores import CPUS_PER_WORKER, LONE_QUERY_THREADS
from akidb_embed.encodings import DEFAULT_ENCODING, ENCODINGS, check_encoding
from akidb_embed.errors import EmbeddingError, InvalidInput

__all__ = ["main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

DEMO_SENTENCES = (
    "A cat sleeps on the warm windowsill.",
    "The kitten is napping in the sun by the window.",
    "Interest rates rose again this quarter.",
    "The central bank raised borrowing costs.",
    "Rust's borrow checker prevents data races at compile time.",
    "Memory safety in systems languages without a garbage collector.",
)


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


def _client(args: argparse.Namespace) -> Any:
    from akidb_embed.host_client import EmbeddingClient

    return EmbeddingClient(
        args.model_dir,
        provider=args.provider,
        workers=args.workers,
        threads=args.threads,
        lanes=args.lanes,
    )


def _workers(text: str) -> int | str:
    """``--workers``: a positive number or ``auto``."""
    if text == "auto":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 or auto, got {value}")
    return value


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
                client = stack.enter_context(_client(args))
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


def _cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_info()
        models = [asdict(model) for model in client.models()]
        print(
            json.dumps(
                {
                    "model": info.model,
                    "dimension": info.dimension,
                    "max_tokens": info.max_tokens,
                    "models": models,
                    "providers": list(client.providers),
                    "workers": client.config.workers,
                    "lanes": client.lanes,
                    "threads": client.threads,
                    "limits": dict(client.limits),
                },
                indent=2,
            )
        )
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.health_check()
    print("ok")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _client(args) as client:
        ready_ms = (time.perf_counter() - started) * 1000
        info = client.model_info()
        call_started = time.perf_counter()
        vectors = client.embed(list(DEMO_SENTENCES))
        batch_ms = (time.perf_counter() - call_started) * 1000
        single_ms = []
        for sentence in DEMO_SENTENCES * 5:
            call_started = time.perf_counter()
            client.embed([sentence])
            single_ms.append((time.perf_counter() - call_started) * 1000)
    similarity = vectors @ vectors.T
    print(f"model {info.model}: {info.dimension} dimensions, up to {info.max_tokens} tokens\n")
    for index, sentence in enumerate(DEMO_SENTENCES, start=1):
        print(f"  [{index}] {sentence}")
    print("\ncosine similarity")
    print("     " + "".join(f"{f'[{i}]':>7}" for i in range(1, len(DEMO_SENTENCES) + 1)))
    for index, row in enumerate(similarity, start=1):
        print(f"  [{index}]" + "".join(f"{value:7.2f}" for value in row))
    best = [
        int(np.argsort(row)[-2]) + 1  # the closest other sentence
        for row in similarity
    ]
    print("\nclosest other sentence: " + ", ".join(f"[{i}]->[{j}]" for i, j in enumerate(best, 1)))
    print(
        f"\nlatency: worker ready in {ready_ms:.0f} ms; {len(DEMO_SENTENCES)} sentences in one "
        f"call {batch_ms:.1f} ms; one sentence per call p50 {np.median(single_ms):.1f} ms "
        f"(over {len(single_ms)} calls)"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from akidb_embed.serve import API_KEY_ENV, ServeOptions, run_server
    except ImportError as exc:
        print(
            f"akidb-embed: serve needs the `serve` extra (pip install 'akidb-embed[serve]'): "
            f"{exc.name or exc} is not installed",
            file=sys.stderr,
        )
        return 2
    from akidb_embed.host_client import AsyncEmbeddingClient

    client = AsyncEmbeddingClient(
        args.model_dir,
        provider=args.provider,
        workers=args.workers,
        threads=args.threads,
        lanes=args.lanes,
        request_timeout=args.request_timeout,
        start_timeout=args.start_timeout,
        close_timeout=args.close_timeout,
        max_attempts=args.max_attempts,
        restart_limit=args.restart_limit,
        stable_start_time=args.stable_start_time,
        max_in_flight_texts=args.max_in_flight_texts,
        worker_args=args.worker_arg or (),
    )
    given = {
        "host": args.host,
        "port": args.port,
        "api_key": args.api_key or os.environ.get(API_KEY_ENV) or None,
        "max_body_bytes": args.max_body_bytes,
        "log_level": args.log_level,
    }  # what is not given keeps ServeOptions' default
    options = ServeOptions(**{name: value for name, value in given.items() if value is not None})

    def announce(line: str) -> None:
        print(f"akidb-embed serve: {line}", file=sys.stderr, flush=True)

    return run_server(client, options, announce)


def _serve_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    from akidb_embed.host_client import ClientConfig

    defaults = ClientConfig()  # the client's defaults, defined once there

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="serve OpenAI's POST /v1/embeddings (and /v1/models, /health, /metrics) over HTTP",
    )
    serve.add_argument("--host", help="address to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument(
        "--port", type=int, help="port to bind; 0: any free port (default: 8081, AkiDB's)"
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on every route but /health (default: "
        "$AKIDB_EMBED_API_KEY; none: no key)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        help="larger request bodies are refused with 413 (default: 16 MiB)",
    )
    serve.add_argument("--log-level", help="uvicorn's log level (default: warning)")
    for name, kind, value, meaning in (
        ("request-timeout", float, defaults.request_timeout, "seconds a worker may go "
         "without answering before it is replaced"),
        ("start-timeout", float, defaults.start_timeout, "seconds for a worker's hello"),
        ("close-timeout", float, defaults.close_timeout, "seconds the workers get to "
         "answer what they hold at shutdown"),
        ("stable-start-time", float, defaults.stable_start_time, "seconds of service "
         "that reset a slot's restart budget"),
        ("max-attempts", int, defaults.max_attempts, "workers one request may be "
         "sent to"),
        ("restart-limit", int, defaults.restart_limit, "consecutive restarts of a "
         "worker slot before it gives up"),
        ("max-in-flight-texts", int, defaults.max_in_flight_texts, "texts at the "
         "workers at once; more wait in the server"),
    ):  # fmt: skip
        serve.add_argument(f"--{name}", type=kind, default=value, help=f"{meaning} ({value})")
    serve.add_argument(
        "--worker-arg",
        action="append",
        default=None,
        metavar="ARG",
        help="an option for every worker, e.g. --worker-arg=--max-batch-tokens=1024 (repeatable)",
    )
    serve.set_defaults(run=_cmd_serve)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.lone or args.breakdown:
        from akidb_embed.bench.lone import BREAKDOWN_CALLS, run_breakdown, run_lone_benchmark
        from akidb_embed.worker.config import default_threads

        threads = default_threads() or 2
        model_dir = args.model_dir[0] if args.model_dir else None
        if args.breakdown:
            return run_breakdown(
                model_dir=model_dir,
                threads=threads,
                calls=min(BREAKDOWN_CALLS, 20) if args.quick else BREAKDOWN_CALLS,
                output=args.output.with_name("bench-breakdown.json"),
                rust=not args.no_rust,
            )
        return run_lone_benchmark(
            model_dir=model_dir,
            threads=threads,
            corpus_size=args.corpus_size,
            output=args.output.with_name("bench-lone.json"),
            quick=args.quick,
            rust=not args.no_rust,
        )
    if args.sweep:
        from akidb_embed.bench.sweep import run_sweep

        return run_sweep(
            model_dir=args.model_dir[0] if args.model_dir else None,
            provider=args.provider,
            output=args.output.with_name("bench-sweep.json"),
            quick=args.quick,
            corpus_size=args.corpus_size,
            calls=args.single_calls,
        )
    if args.two_models:
        from akidb_embed.bench.two_models import run_two_model_benchmark
        from akidb_embed.worker.config import default_threads

        model_dirs = args.model_dir or []
        return run_two_model_benchmark(
            model_dir=model_dirs[0] if model_dirs else None,
            second_model_dir=model_dirs[1] if len(model_dirs) > 1 else None,
            threads=default_threads() or 2,
            calls=min(args.single_calls, 32) if args.quick else args.single_calls,
            output=args.output.with_name("bench-two-models.json"),
        )
    from akidb_embed.bench.runner import run_benchmark

    return run_benchmark(
        model_dir=args.model_dir[0] if args.model_dir else None,
        provider=args.provider,
        corpus_size=args.corpus_size,
        single_calls=args.single_calls,
        output=args.output,
        quick=args.quick,
    )


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, as every other error of the command
    (the subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="akidb-embed", description=__doc__.splitlines()[0])
    common = _Parser(add_help=False)
    common.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        default=None,
        help="model directory; repeat it to serve several models, the first being the default "
        "(default: $AKIDB_EMBED_MODEL_DIR, the checkout's models/, or the per-user cache)",
    )
    common.add_argument(
        "--provider",
        default="auto",
        help="execution provider: auto (CoreML on macOS, then CUDA, then CPU), coreml, cuda, cpu",
    )
    common.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        help="worker processes, each holding every model (default: auto, one per "
        f"{CPUS_PER_WORKER} usable CPUs)",
    )
    common.add_argument(
        "--lanes",
        type=int,
        default=None,
        help="ONNX Runtime runs at once in each worker (default: the worker's, sized to fill "
        "its share of the cores)",
    )
    common.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ONNX Runtime intra-op threads of each worker's session (default: the worker's, "
        f"at most {LONE_QUERY_THREADS})",
    )
    commands = parser.add_subparsers(dest="command", required=True)

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

    for name, run, summary in (
        ("info", _cmd_info, "model, providers and limits"),
        ("health", _cmd_health, "run the worker's health check"),
        ("demo", _cmd_demo, "similarity matrix of a few sentences, with latency"),
    ):
        commands.add_parser(name, parents=[common], help=summary).set_defaults(run=run)

    _serve_parser(commands, common)

    bench = commands.add_parser("bench", parents=[common], help="side-by-side benchmark")
    bench.add_argument("--corpus-size", type=int, default=1000, help="texts in the bulk corpus")
    bench.add_argument("--single-calls", type=int, default=300, help="calls per latency workload")
    bench.add_argument(
        "-o", "--output", type=Path, default=Path("bench-results/bench.json"), help="JSON results"
    )
    bench.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    bench.add_argument(
        "--two-models",
        action="store_true",
        help="one worker serving two models against two one-model workers (the second "
        "--model-dir, else the default model provisioned again under another id)",
    )
    bench.add_argument(
        "--sweep",
        action="store_true",
        help="in-process sessions beside the default client and a grid of workers x lanes x "
        "threads that fill the cores: lone, 16 and 64 callers, bulk, RSS",
    )
    bench.add_argument(
        "--lone",
        action="store_true",
        help="one query at a time: overhead over in-process, first calls, ready time, with and "
        "without --spin-wait (Python client, raw frames, Rust client)",
    )
    bench.add_argument(
        "--breakdown",
        action="store_true",
        help="the stages of one lone request in microseconds (Python client, raw frames, Rust)",
    )
    bench.add_argument(
        "--no-rust", action="store_true", help="leave the Rust client's column out (no cargo)"
    )
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # the clients' warnings (a worker replaced during a long run); errors are printed below
    logging.basicConfig(level=logging.WARNING, format="akidb-embed: %(message)s")
    try:
        return int(args.run(args))
    except EmbeddingError as exc:
        print(f"akidb-embed: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
    except OSError as exc:  # a file that cannot be read or written, a closed stdout
        print(f"akidb-embed: {_one_line(str(exc))}", file=sys.stderr)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_ERROR


def _one_line(message: str) -> str:
    """``message`` on one line (a worker's stderr tail may span several)."""
    return " | ".join(line.strip() for line in message.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
