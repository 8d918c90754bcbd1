"""``akidb-embed bench --two-models``: one worker serving two models against two one-model workers.

Both set-ups get the same total ONNX Runtime threads (one worker with all of them, or two workers
with half each) and the same two models: the default model and a second one (by default a copy
of the default model's directory under another model id, so both halves weigh the same).
Measured, one set-up after the other with a pause between them:

    mixed           16 callers, half asking each model, one short text per call: requests/s
    lone query      one caller, one short text per call, the default model: p50/p99
    memory          peak RSS of the worker process(es), summed
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from akidb_embed.bench.corpus import build_corpus
from akidb_embed.bench.runner import CONCURRENT_CALLERS, peak_rss_mb, run_callers
from akidb_embed.models import METADATA_FILE, load_metadata

__all__ = ["run_two_model_benchmark"]

PAUSE_SECONDS = 2.0
"""Between set-ups: ONNX Runtime threads of the previous one stop spinning."""
SECOND_MODEL_ID_SUFFIX = "-copy"

Embed = Callable[[list[str], str], Any]


def _second_model(default_dir: Path, work: Path) -> Path:
    """A copy of the default model's directory (files hard-linked where possible) whose metadata
    names another model id: the same weights served as a second model."""
    target = work / "second-model"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(default_dir, target, copy_function=_link_or_copy)
    metadata_path = target / METADATA_FILE
    document = json.loads(metadata_path.read_text(encoding="utf-8"))
    document["model"] += SECOND_MODEL_ID_SUFFIX
    metadata_path.unlink()  # a link to the original: write a file of its own
    metadata_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return target


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _mixed(embed: Embed, models: list[str], texts: list[str], calls: int) -> float:
    per_caller = max(1, calls // CONCURRENT_CALLERS)

    def caller(index: int) -> None:
        model = models[index % len(models)]
        for call in range(per_caller):
            embed([texts[(index * 7 + call) % len(texts)]], model)

    return per_caller * CONCURRENT_CALLERS / run_callers(caller)


def _lone(embed: Embed, model: str, texts: list[str], calls: int) -> tuple[float, float]:
    for text in texts[:10]:
        embed([text], model)
    samples = []
    for call in range(calls):
        started = time.perf_counter()
        embed([texts[call % len(texts)]], model)
        samples.append((time.perf_counter() - started) * 1000)
    p50, p99 = np.percentile(samples, [50, 99])
    return float(p50), float(p99)


def run_two_model_benchmark(
    *, model_dir: Path | None, second_model_dir: Path | None, threads: int, calls: int, output: Path
) -> int:
    from akidb_embed.host_client import EmbeddingClient

    first = load_metadata(model_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    second_dir = second_model_dir or _second_model(first.directory, output.parent)
    second = load_metadata(second_dir)
    models = [first.model, second.model]
    texts = [text for text in build_corpus(400) if len(text) < 120][:50]
    half = max(1, threads // 2)
    print(
        f"akidb-embed bench --two-models: {first.model} + {second.model}, {threads} ONNX Runtime "
        f"threads in all, {calls} calls per workload",
        file=sys.stderr,
    )
    figures: dict[str, dict[str, float]] = {}

    print("  one worker, two models", file=sys.stderr)
    with EmbeddingClient([first.directory, second.directory], threads=threads) as client:

        def one(texts: list[str], model: str) -> Any:
            return client.embed(texts, model=model)

        p50, p99 = _lone(one, first.model, texts, calls)
        rate = _mixed(one, models, texts, calls)
        pid = client.stats().worker_pid
        rss = peak_rss_mb(pid) if pid is not None else float("nan")
        figures["1 worker x 2 models"] = {
            "mixed_requests_per_s": rate,
            "lone_p50_ms": p50,
            "lone_p99_ms": p99,
            "peak_rss_mb": rss or float("nan"),
        }
    time.sleep(PAUSE_SECONDS)

    print("  two workers, one model each", file=sys.stderr)
    with (
        EmbeddingClient(first.directory, threads=half) as client_a,
        EmbeddingClient(second.directory, threads=half) as client_b,
    ):
        clients = {first.model: client_a, second.model: client_b}

        def two(texts: list[str], model: str) -> Any:
            return clients[model].embed(texts, model=model)

        p50, p99 = _lone(two, first.model, texts, calls)
        rate = _mixed(two, models, texts, calls)
        total_rss = 0.0
        for client in clients.values():
            pid = client.stats().worker_pid
            total_rss += (peak_rss_mb(pid) if pid is not None else None) or float("nan")
        figures[f"2 workers x 1 model ({half} thread{'s' if half > 1 else ''} each)"] = {
            "mixed_requests_per_s": rate,
            "lone_p50_ms": p50,
            "lone_p99_ms": p99,
            "peak_rss_mb": total_rss,
        }

    names = list(figures)
    metrics = list(figures[names[0]])
    print(f"\n{'metric':<22}" + "".join(f"{name:>36}" for name in names))
    for metric in metrics:
        base = figures[names[0]][metric]
        cells = [
            f"{figures[name][metric]:.1f} ({figures[name][metric] / base:.2f}x)" for name in names
        ]
        print(f"{metric:<22}" + "".join(f"{cell:>36}" for cell in cells))
    print("\n(x) = ratio to one worker serving both models")
    output.write_text(json.dumps({"models": models, "figures": figures}, indent=2) + "\n")
    print(f"results written to {output}")
    return 0
