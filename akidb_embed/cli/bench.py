"""``akidb-embed bench``: the side-by-side benchmark (akidb_embed.bench.runner) and its
``--lone``, ``--breakdown``, ``--two-models`` and ``--sweep`` variants."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    bench = commands.add_parser("bench", parents=[common], help="side-by-side benchmark")
    bench.add_argument("--corpus-size", type=int, default=1000, help="texts in the bulk corpus")
    bench.add_argument("--single-calls", type=int, default=300, help="calls per latency workload")
    bench.add_argument(
        "-o", "--output", type=Path, default=Path("bench-results/bench.json"), help="JSON results"
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: small corpus, few calls, one cold start each (none for st)",
    )
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


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.lone or args.breakdown:
        from akidb_embed.bench.breakdown import BREAKDOWN_CALLS, run_breakdown
        from akidb_embed.bench.lone import run_lone_benchmark
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
