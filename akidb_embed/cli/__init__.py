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

Here the command line and its common options; each subcommand in its module: embed.py (the
file job), model.py (info, health, demo), serve.py, bench.py; common.py what they share.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from akidb_embed.cli import bench, embed, model, serve
from akidb_embed.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, Parser
from akidb_embed.cores import CPUS_PER_WORKER, LONE_QUERY_THREADS
from akidb_embed.errors import EmbeddingError

__all__ = ["main"]


def _workers(text: str) -> int | str:
    """``--workers``: a positive number or ``auto``."""
    if text == "auto":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 or auto, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="akidb-embed", description=__doc__.splitlines()[0])
    common = Parser(add_help=False)
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

    embed.add_parser(commands, common)
    model.add_parsers(commands, common)
    serve.add_parser(commands, common)
    bench.add_parser(commands, common)
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
