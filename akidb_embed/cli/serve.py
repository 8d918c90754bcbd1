"""``akidb-embed serve``: OpenAI's ``POST /v1/embeddings`` (and ``/v1/models``, ``/health``,
``/metrics``) over HTTP, served by ``akidb_embed.serve`` over an ``AsyncEmbeddingClient`` (the
``serve`` extra); its options default to the client's own."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["add_parser"]


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
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
