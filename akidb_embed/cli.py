"""The ``akidb-embed`` command: embed texts, inspect the model, check health, demo and bench.

Every subcommand goes through the host client (``akidb_embed.host_client``), so it exercises the
same worker process a Rust host would spawn; only ``bench`` also runs ONNX Runtime in-process,
as the reference the bridge is measured against.

    akidb-embed embed "first text" "second text"        # JSON lines on stdout
    cat texts.txt | akidb-embed embed --format npy -o vectors.npy
    akidb-embed --model-dir A --model-dir B embed --model ID --prompt-name query "text"
    akidb-embed info | health | demo | bench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from akidb_embed.errors import EmbeddingError

__all__ = ["main"]

EMBED_CHUNK_TEXTS = 256
"""Texts per embed_batch call of ``akidb-embed embed``; sets how often the progress bar moves."""

DEMO_SENTENCES = (
    "A cat sleeps on the warm windowsill.",
    "The kitten is napping in the sun by the window.",
    "Interest rates rose again this quarter.",
    "The central bank raised borrowing costs.",
    "Rust's borrow checker prevents data races at compile time.",
    "Memory safety in systems languages without a garbage collector.",
)


@contextmanager
def _progress(total: int, description: str) -> Iterator[Any]:
    """A tqdm bar on stderr when stderr is a terminal and tqdm is installed; else a no-op."""
    bar: Any = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:  # the `cli` extra is optional: no bar, same output
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=total, desc=description, unit="text", file=sys.stderr)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _client(args: argparse.Namespace) -> Any:
    from akidb_embed.host_client import EmbeddingClient

    return EmbeddingClient(args.model_dir, provider=args.provider)


def _read_texts(args: argparse.Namespace, stdin: TextIO) -> list[str]:
    if args.texts:
        return list(args.texts)
    return [line.rstrip("\n") for line in stdin]


def _cmd_embed(args: argparse.Namespace) -> int:
    texts = _read_texts(args, sys.stdin)
    if not texts:
        print("akidb-embed: no texts to embed", file=sys.stderr)
        return 2
    if args.format == "npy" and args.output is None and sys.stdout.isatty():
        print("akidb-embed: refusing to write .npy to a terminal; use -o FILE", file=sys.stderr)
        return 2
    normalize = False if args.no_normalize else None  # None: the model's own convention
    with _client(args) as client, _progress(len(texts), "embedding") as bar:
        chunks = []
        for start in range(0, len(texts), EMBED_CHUNK_TEXTS):
            chunk = texts[start : start + EMBED_CHUNK_TEXTS]
            vectors = client.embed(chunk, normalize, model=args.model, prompt_name=args.prompt_name)
            chunks.append(vectors)
            if bar is not None:
                bar.update(len(chunk))
        dimension = client.model_info(args.model).dimension
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, dimension), np.float32)
    if args.format == "npy":
        if args.output is None:
            np.save(sys.stdout.buffer, vectors)
        else:
            np.save(args.output, vectors)
        return 0
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for text, vector in zip(texts, vectors, strict=True):
            out.write(json.dumps({"text": text, "embedding": vector.tolist()}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
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


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.pool:
        from akidb_embed.bench.pool import ROUNDS, run_pool_benchmark
        from akidb_embed.worker.config import default_threads

        return run_pool_benchmark(
            model_dir=args.model_dir[0] if args.model_dir else None,
            provider=args.provider,
            cores=default_threads() or 2,
            corpus_size=min(args.corpus_size, 64) if args.quick else args.corpus_size,
            calls=min(args.single_calls, 32) if args.quick else args.single_calls,
            output=args.output.with_name("bench-pool.json"),
            rounds=1 if args.quick else ROUNDS,
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="akidb-embed", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
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
    commands = parser.add_subparsers(dest="command", required=True)

    embed = commands.add_parser(
        "embed", parents=[common], help="embed texts (arguments, or stdin lines)"
    )
    embed.add_argument("texts", nargs="*", help="texts to embed; none: one text per stdin line")
    embed.add_argument("--format", choices=("jsonl", "npy"), default="jsonl")
    embed.add_argument("-o", "--output", type=Path, default=None, help="file (default: stdout)")
    embed.add_argument(
        "--model", default=None, help="the model to embed with (default: the default model)"
    )
    embed.add_argument(
        "--prompt-name", default=None, help="one of the model's prompts (default: its own)"
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
        "--pool",
        action="store_true",
        help="one worker with every core's thread against one single-thread worker per core",
    )
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except EmbeddingError as exc:
        print(f"akidb-embed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
