"""``akidb-embed info``, ``health`` and ``demo``: the model served, the workers' health, and a
similarity matrix of a few sentences with the latency of the calls that made it."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from akidb_embed.cli.common import open_client

__all__ = ["add_parsers"]

DEMO_SENTENCES = (
    "A cat sleeps on the warm windowsill.",
    "The kitten is napping in the sun by the window.",
    "Interest rates rose again this quarter.",
    "The central bank raised borrowing costs.",
    "Rust's borrow checker prevents data races at compile time.",
    "Memory safety in systems languages without a garbage collector.",
)


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    for name, run, summary in (
        ("info", _cmd_info, "model, providers and limits"),
        ("health", _cmd_health, "run the worker's health check"),
        ("demo", _cmd_demo, "similarity matrix of a few sentences, with latency"),
    ):
        commands.add_parser(name, parents=[common], help=summary).set_defaults(run=run)


def _cmd_info(args: argparse.Namespace) -> int:
    with open_client(args) as client:
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
    with open_client(args) as client:
        client.health_check()
    print("ok")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with open_client(args) as client:
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
