"""``python -m akidb_embed.worker`` / ``akidb-embed-worker``: the command line of the worker.

::

    argv + AKIDB_EMBED_* env --> WorkerConfig --> guard_stdio (private protocol fds, fd 1 -> log,
                                                  fd 0 -> /dev/null) --> serve() --> exit code

Arguments are checked before anything else (bad ones: exit 2, message on stderr); the fd guard
runs before onnxruntime and tokenizers are imported, so nothing they print reaches the host.
Exit codes are those of protocol.md section 8.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from akidb_embed.cores import LONE_QUERY_THREADS, size_lanes, usable_cores
from akidb_embed.models import MODEL_DIR_ENV
from akidb_embed.worker.config import PROVIDER_CHOICES, CoreMLOptions, WorkerConfig

__all__ = ["ENV_PREFIX", "build_parser", "config_from_args", "main"]

EXIT_BAD_ARGUMENTS = 2  # as argparse exits; protocol.md section 8
ENV_PREFIX = "AKIDB_EMBED_"
"""Every option ``--some-option`` can also come from ``AKIDB_EMBED_SOME_OPTION`` (the command
line wins); the model directory's variable is ``AKIDB_EMBED_MODEL_DIR``."""

_DEFAULTS = WorkerConfig()
_COREML_DEFAULTS = CoreMLOptions()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


def _env_default(option: str, convert: Callable[[str], Any], default: Any) -> Any:
    variable = ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()
    raw = os.environ.get(variable)
    if raw is None:
        return default
    try:
        return convert(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"akidb-embed-worker: error: {variable}={raw!r}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_ARGUMENTS) from None


def _env_model_dirs() -> list[Path]:
    """The directories of ``AKIDB_EMBED_MODEL_DIR``, separated by ``os.pathsep``."""
    raw = os.environ.get(MODEL_DIR_ENV, "")
    return [Path(part).expanduser() for part in raw.split(os.pathsep) if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="akidb-embed-worker",
        description="Serve sentence embeddings over length-prefixed msgpack on stdin/stdout "
        "(protocol.md). Each option can also be set as AKIDB_EMBED_<OPTION>, e.g. "
        "AKIDB_EMBED_MAX_BATCH_TOKENS=1024.",
    )

    def option(
        name: str, convert: Callable[[str], Any], default: Any, help: str, **kw: Any
    ) -> None:
        parser.add_argument(
            name, type=convert, default=_env_default(name, convert, default), help=help, **kw
        )

    parser.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        default=None,
        help="model directory holding akidb-embed.json; repeat it to serve several models (the "
        f"first is the default model). Default: ${MODEL_DIR_ENV} (several directories separated "
        f"by {os.pathsep!r}), else {_DEFAULTS.model_dir}",
    )
    option(
        "--provider",
        str,
        _DEFAULTS.provider,
        "execution provider: auto = CoreML on macOS, else CUDA if available, else CPU",
        choices=PROVIDER_CHOICES,
    )
    cores = usable_cores()
    sized_lanes, sized_threads = size_lanes(cores)
    option(
        "--threads",
        _non_negative_int,
        None,
        "ONNX Runtime intra-op threads of each model's session, shared by the lanes; 0 lets "
        f"ONNX Runtime choose (default: at most {LONE_QUERY_THREADS}, here {sized_threads}; "
        "with --lanes alone: the cores the lanes leave)",
    )
    option(
        "--pool-workers",
        _positive_int,
        1,
        "workers of one pool sharing this machine: the default --lanes and --threads fill "
        "this worker's share of the cores, usable cores / pool workers (%(default)s)",
    )
    option(
        "--lanes",
        _positive_int,
        None,
        "ONNX Runtime runs at once over each model's one session (default: the cores left "
        f"after --threads, plus one; here {sized_lanes}, for {cores or 'unknown'} usable cores)",
    )
    parser.add_argument(
        "--spin-wait",
        action=argparse.BooleanOptionalAction,
        default=_env_default("--spin-wait", _boolean, _DEFAULTS.spin_wait),
        help="let ONNX Runtime's threads spin between runs: lower latency for lone requests, "
        "more CPU taken from the host (default: %(default)s)",
    )
    option(
        "--max-batch-tokens",
        _positive_int,
        _DEFAULTS.max_batch_tokens,
        "padded tokens per ONNX Runtime run (%(default)s)",
    )
    option(
        "--max-frame-bytes",
        _positive_int,
        _DEFAULTS.max_frame_bytes,
        "largest request frame accepted (%(default)s)",
    )
    option(
        "--max-texts-per-request",
        _positive_int,
        _DEFAULTS.max_texts_per_request,
        "most inputs in one embed request (%(default)s)",
    )
    option(
        "--max-text-bytes",
        _positive_int,
        _DEFAULTS.max_text_bytes,
        "longest single input in UTF-8 bytes (%(default)s)",
    )
    option(
        "--max-pending-texts",
        _positive_int,
        _DEFAULTS.max_pending_texts,
        "texts read but not yet embedded before reading pauses (%(default)s)",
    )
    option(
        "--coreml-compute-units",
        str,
        _COREML_DEFAULTS.compute_units,
        "CoreML MLComputeUnits (%(default)s)",
        choices=("ALL", "CPUAndNeuralEngine", "CPUAndGPU", "CPUOnly"),
    )
    option(
        "--coreml-model-format",
        str,
        _COREML_DEFAULTS.model_format,
        "CoreML ModelFormat (%(default)s)",
        choices=("MLProgram", "NeuralNetwork"),
    )
    option(
        "--coreml-cache-dir",
        Path,
        _COREML_DEFAULTS.cache_dir,
        "where CoreML keeps compiled models between starts (%(default)s)",
    )
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> WorkerConfig:
    """The worker's configuration from ``argv`` and the environment; exits 2 on bad input."""
    args = build_parser().parse_args(argv)
    settings = {
        f.name: getattr(args, f.name) for f in fields(WorkerConfig) if hasattr(args, f.name)
    }
    cores = usable_cores()
    share = max(1, cores // args.pool_workers) if cores else 0
    settings["lanes"], settings["threads"] = size_lanes(
        share, settings.pop("lanes"), settings.pop("threads")
    )
    model_dirs: list[Path] = settings.pop("model_dir") or _env_model_dirs()
    if model_dirs:
        settings["model_dir"], settings["extra_model_dirs"] = model_dirs[0], tuple(model_dirs[1:])
    return WorkerConfig(
        **settings,
        coreml=CoreMLOptions(
            compute_units=args.coreml_compute_units,
            model_format=args.coreml_model_format,
            cache_dir=args.coreml_cache_dir,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker until it is told to stop; returns the process exit code."""
    config = config_from_args(argv)
    # the guard first: everything imported after it (onnxruntime, tokenizers) can print freely
    from akidb_embed.worker.stdio import configure_logging, guard_stdio

    protocol_in, protocol_out = guard_stdio()
    configure_logging()
    from akidb_embed.worker.server import serve

    return serve(config, protocol_in, protocol_out)


if __name__ == "__main__":
    sys.exit(main())
