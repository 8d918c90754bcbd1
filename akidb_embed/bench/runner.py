"""``akidb-embed bench``: the bridge measured side by side with what it replaces, in one run.

Implementations, all on the same model file with the same ONNX Runtime thread count:

    in-process      the worker's own engine called directly: no pipe, no process (the limit)
    bridge          akidb_embed.host_client -> worker process (what a host uses)
    http            `akidb-embed serve` in a child process, called over HTTP with OpenAI's body
                    (base64 replies) from keep-alive connections by a caller as lean as a load
                    generator, when the serve extra is there; it and the bridge serve at once
                    and take turns (SIDE_BY_SIDE_ROUNDS)
    http.client     the same server called through Python's http.client (http_column.py)
    jsonl           a JSON-lines subprocess, one request at a time, floats as text (the naive
                    design the bridge replaces)
    st              sentence-transformers in PyTorch, when it is importable
    rust            the Rust crate's client (host_client/rust, example `roundtrip`) -> worker
                    process, when cargo and the checkout's .ci/cargo-offline are there

Workloads:

    single          one short sentence per call, one caller: p50/p95/p99 latency
    concurrent      16 callers (threads) each sending one sentence per call: requests/s
    bulk            one call over a mixed-length corpus of real text: texts/s
    cold start      a fresh process to its first answer (median of 3 starts; --quick: 1, st none)

Every figure is printed with its ratio to in-process, and all of it is written as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from akidb_embed.bench.corpus import build_corpus, corpus_digest
from akidb_embed.models import load_metadata

__all__ = [
    "CONCURRENT_CALLERS",
    "peak_rss_mb",
    "proc_status_mb",
    "run_benchmark",
    "run_callers",
    "rust_example",
    "rust_example_argv",
]

CONCURRENT_CALLERS = 16
COLD_START_RUNS = 3
SIDE_BY_SIDE_ROUNDS = 3
"""Rounds in which the bridge and the http column take turns (--quick: 1)."""
SIDE_PAUSE = 0.5
"""Seconds between two sides' turns: the previous side's threads settle first."""
CHECKOUT = Path(__file__).resolve().parents[2]
RUST_TIMEOUT = 1800  # seconds: a first release build of the crate and its dependencies
EmbedFn = Callable[[Sequence[str]], Any]


@dataclass
class Results:
    settings: dict[str, Any]
    # figures[workload][metric][implementation] = value
    figures: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def put(self, workload: str, metric: str, implementation: str, value: float) -> None:
        self.figures.setdefault(workload, {}).setdefault(metric, {})[implementation] = value


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    p50, p95, p99 = np.percentile(samples_ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def _warm_up(embed: EmbedFn, sentences: Sequence[str]) -> None:
    for sentence in sentences[:10]:
        embed([sentence])


def _single_samples(
    embed: EmbedFn, sentences: Sequence[str], calls: int, first: int = 0
) -> list[float]:
    """Milliseconds of ``calls`` lone calls, one after another."""
    samples = []
    for index in range(first, first + calls):
        started = time.perf_counter()
        embed([sentences[index % len(sentences)]])
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _single(embed: EmbedFn, sentences: Sequence[str], calls: int) -> dict[str, float]:
    _warm_up(embed, sentences)
    return _percentiles(_single_samples(embed, sentences, calls))


def run_callers(caller: Callable[[int], None], callers: int = CONCURRENT_CALLERS) -> float:
    """Seconds for ``callers`` threads running ``caller(index)``, timed from the moment all of
    them are started and released together; the first exception a caller raised is raised
    once all have finished."""
    barrier = threading.Barrier(callers + 1)
    errors: list[BaseException] = []

    def released(index: int) -> None:
        barrier.wait()
        try:
            caller(index)
        except BaseException as exc:  # reported after the others finish
            errors.append(exc)

    threads = [threading.Thread(target=released, args=(index,)) for index in range(callers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def _concurrent_samples(
    embed: EmbedFn, sentences: Sequence[str], calls: int
) -> tuple[list[float], float]:
    """Milliseconds of each call of ``CONCURRENT_CALLERS`` callers sharing ``calls``, and the
    seconds they took together."""
    per_caller = max(1, calls // CONCURRENT_CALLERS)
    samples: list[float] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        mine = []
        for call in range(per_caller):
            started = time.perf_counter()
            embed([sentences[(index * 7 + call) % len(sentences)]])
            mine.append((time.perf_counter() - started) * 1000)
        with lock:
            samples.extend(mine)

    return samples, run_callers(caller)


def _concurrent(embed: EmbedFn, sentences: Sequence[str], calls: int) -> dict[str, float]:
    samples, elapsed = _concurrent_samples(embed, sentences, calls)
    return {"requests_per_s": len(samples) / elapsed, **_percentiles(samples)}


def _bulk_seconds(embed: EmbedFn, corpus: Sequence[str]) -> float:
    started = time.perf_counter()
    vectors = embed(list(corpus))
    elapsed = time.perf_counter() - started
    if len(vectors) != len(corpus):
        raise RuntimeError(f"bulk returned {len(vectors)} vectors for {len(corpus)} texts")
    return elapsed


def _bulk(embed: EmbedFn, corpus: Sequence[str]) -> dict[str, float]:
    elapsed = _bulk_seconds(embed, corpus)
    return {"texts_per_s": len(corpus) / elapsed, "seconds": elapsed}


def _side_by_side(
    sides: dict[str, EmbedFn],
    sentences: Sequence[str],
    calls: int,
    corpus: Sequence[str],
    rounds: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """figures[workload][metric] of each side, the sides serving at once and taking turns:
    each workload in ``rounds`` rounds, every side once a round (a share of ``calls`` each),
    ``SIDE_PAUSE`` apart; the figures pool each side's rounds. A drift of the machine's speed
    during the run then falls on every side alike."""
    for embed in sides.values():
        _warm_up(embed, sentences)
    share = max(1, calls // rounds)
    single: dict[str, list[float]] = {name: [] for name in sides}
    concurrent: dict[str, list[float]] = {name: [] for name in sides}
    concurrent_seconds = dict.fromkeys(sides, 0.0)
    bulk_seconds = dict.fromkeys(sides, 0.0)
    for workload in ("single", "concurrent", "bulk"):
        for turn in range(rounds):
            for name, embed in sides.items():
                time.sleep(SIDE_PAUSE)
                if workload == "single":
                    single[name] += _single_samples(embed, sentences, share, turn * share)
                elif workload == "concurrent":
                    samples, elapsed = _concurrent_samples(embed, sentences, share)
                    concurrent[name] += samples
                    concurrent_seconds[name] += elapsed
                else:
                    bulk_seconds[name] += _bulk_seconds(embed, corpus)
    return {
        name: {
            "single": _percentiles(single[name]),
            f"concurrent x{CONCURRENT_CALLERS}": {
                "requests_per_s": len(concurrent[name]) / concurrent_seconds[name],
                **_percentiles(concurrent[name]),
            },
            "bulk": {
                "texts_per_s": rounds * len(corpus) / bulk_seconds[name],
                "seconds": bulk_seconds[name] / rounds,
            },
        }
        for name in sides
    }


def _cold_start(argv: list[str], runs: int, stdin_line: str | None = None) -> float:
    """Milliseconds from spawning ``argv`` to its first line on stdout (after ``stdin_line``),
    the median of ``runs`` starts."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert process.stdin is not None and process.stdout is not None
        if stdin_line is not None:
            process.stdout.readline()  # the "ready" line
            process.stdin.write(stdin_line + "\n")
            process.stdin.flush()
        line = process.stdout.readline()
        samples.append((time.perf_counter() - started) * 1000)
        process.stdin.close()
        process.wait(timeout=60)
        if not line:
            raise RuntimeError(f"{argv} printed nothing")
    return statistics.median(samples)


class _JsonLinesBaseline:
    def __init__(self, model_dir: Path, threads: int) -> None:
        self.argv = [
            sys.executable, "-m", "akidb_embed.bench.jsonl_baseline",
            "--model-dir", str(model_dir), "--threads", str(threads),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._lock = threading.Lock()  # one request at a time: the baseline has no ids
        assert self._process.stdout is not None
        self._process.stdout.readline()

    def embed(self, texts: Sequence[str]) -> Any:
        assert self._process.stdin is not None and self._process.stdout is not None
        with self._lock:
            self._process.stdin.write(json.dumps({"inputs": list(texts)}) + "\n")
            self._process.stdin.flush()
            reply = json.loads(self._process.stdout.readline())
        return np.asarray(reply["embeddings"], dtype=np.float32)

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=30)


def proc_status_mb(pid: int, field: str) -> float | None:
    """A memory figure of a live process's /proc status, in MB (``VmHWM``: its high-water
    resident set; ``VmRSS``: its resident set now); None where /proc does not tell it (not
    Linux, or the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb(pid: int) -> float | None:
    """The high-water resident set of a live process, where /proc tells it (Linux)."""
    return proc_status_mb(pid, "VmHWM")


def _sentence_transformers_weights() -> Path | None:
    """The sentence-transformers model directory the export started from, if importable."""
    try:
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401

        from akidb_embed.models.sources import export_package_model_dir
    except ImportError:
        return None
    return export_package_model_dir()


def _sentence_transformers(weights: Path, threads: int) -> tuple[EmbedFn, str]:
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(weights), device="cpu")

    def embed(texts: Sequence[str]) -> Any:
        return model.encode(list(texts), batch_size=32, normalize_embeddings=True)

    version = f"sentence-transformers {sentence_transformers.__version__}"
    return embed, f"{version}, torch {torch.__version__}"


def _cargo() -> str | None:
    found = shutil.which("cargo")
    if found is None:
        candidate = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin" / "cargo"
        found = str(candidate) if candidate.is_file() else None
    return found


def rust_example_argv(model_dir: Path, threads: int, quick: bool) -> tuple[list[str] | None, str]:
    """The command running the Rust crate's `roundtrip` example on ``model_dir`` (through
    .ci/cargo-offline, release build unless ``quick``; options follow), and a note; ``None`` and
    the reason when it cannot run here."""
    script = CHECKOUT / ".ci" / "cargo-offline"
    if not script.is_file():
        return None, f"rust column omitted: no {script} (not a checkout)"
    if _cargo() is None:
        return None, "rust column omitted: no cargo on PATH or in $CARGO_HOME/bin"
    profile = [] if quick else ["--release"]
    build = "debug build (--quick)" if quick else "release build"
    return [str(script), "run", *profile, "--quiet", "--example", "roundtrip", "--",
            "--python", sys.executable, "--model-dir", str(model_dir),
            "--threads", str(threads)], (
        f"rust = the Rust crate's client, example roundtrip, {build}"
    )  # fmt: skip


def rust_example(
    model_dir: Path,
    threads: int,
    corpus: Sequence[str],
    calls: int,
    quick: bool,
    extra_args: Sequence[str] = (),
) -> tuple[dict[str, Any] | None, str]:
    """The JSON report of the Rust crate's `roundtrip` example on the same workloads
    (``extra_args`` appended), and a note; ``None`` and the reason when it cannot be had."""
    argv, note = rust_example_argv(model_dir, threads, quick)
    if argv is None:
        return None, note
    with tempfile.TemporaryDirectory() as scratch:
        corpus_file = Path(scratch) / "corpus.json"
        corpus_file.write_text(json.dumps(list(corpus)), encoding="utf-8")
        argv += ["--json", "--calls", str(calls), "--corpus", str(corpus_file), *extra_args]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=RUST_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            return None, f"rust column omitted: the example ran over {RUST_TIMEOUT} s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"rust column omitted: the example failed ({done.returncode}): {last}"
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report, note


def _format(value: float, reference: float | None) -> str:
    text = f"{value:,.1f}" if value >= 10 else f"{value:.2f}"
    if reference:
        ratio = value / reference
        text += f" ({ratio:.2f}x)"
    return text


def _print_table(results: Results, implementations: list[str]) -> None:
    headers = ["workload", "metric", *implementations]
    rows = []
    for workload, metrics in results.figures.items():
        for metric, values in metrics.items():
            reference = values.get("in-process")
            rows.append(
                [workload, metric]
                + [
                    _format(values[name], reference) if name in values else "-"
                    for name in implementations
                ]
            )
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def run_benchmark(
    *,
    model_dir: Path | None,
    provider: str,
    corpus_size: int,
    single_calls: int,
    output: Path,
    quick: bool = False,
) -> int:
    from akidb_embed.host_client import EmbeddingClient
    from akidb_embed.worker.config import WorkerConfig, default_threads
    from akidb_embed.worker.engine import Engine

    cold_starts = COLD_START_RUNS
    if quick:
        corpus_size, single_calls, cold_starts = min(corpus_size, 64), min(single_calls, 32), 1
    metadata = load_metadata(model_dir)
    threads = default_threads() or os.cpu_count() or 1
    corpus = build_corpus(corpus_size)
    short = [text for text in corpus if len(text) < 120][:50] or corpus[:50]
    results = Results(
        settings={
            "model": metadata.model,
            "model_dir": str(metadata.directory),
            "provider": provider,
            "threads": threads,
            "corpus_size": len(corpus),
            "corpus_digest": corpus_digest(corpus),
            "single_calls": single_calls,
            "concurrent_callers": CONCURRENT_CALLERS,
            "cold_start_runs": cold_starts,
            "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        }
    )
    print(
        f"akidb-embed bench: {metadata.model}, {threads} ONNX Runtime threads, corpus of "
        f"{len(corpus)} texts ({results.settings['corpus_digest']})",
        file=sys.stderr,
    )
    implementations = ["in-process", "bridge", "jsonl"]

    def measure(name: str, embed: EmbedFn) -> None:
        print(f"  {name}: single, concurrent, bulk", file=sys.stderr)
        for metric, value in _single(embed, short, single_calls).items():
            results.put("single", metric, name, value)
        for metric, value in _concurrent(embed, short, single_calls).items():
            results.put(f"concurrent x{CONCURRENT_CALLERS}", metric, name, value)
        for metric, value in _bulk(embed, corpus).items():
            results.put("bulk", metric, name, value)

    config = WorkerConfig(model_dir=metadata.directory, provider=provider, threads=threads)
    engine = Engine.load(config)
    measure("in-process", engine.embed)
    del engine

    from akidb_embed.bench.http_column import HttpServer, LeanCaller, StdlibCaller, missing_extra

    http_missing = missing_extra()
    if http_missing is not None:
        results.notes.append(http_missing)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(
            EmbeddingClient(metadata.directory, provider=provider, threads=threads)
        )
        sides: dict[str, EmbedFn] = {"bridge": client.embed}
        if http_missing is None:
            server = stack.enter_context(HttpServer(metadata.directory, provider, threads))
            sides["http"] = LeanCaller(server.port).embed
            sides["http.client"] = StdlibCaller(server.port).embed
            implementations[implementations.index("bridge") + 1 : 0] = ["http", "http.client"]
        rounds = 1 if quick else SIDE_BY_SIDE_ROUNDS
        print(f"  {', '.join(sides)}: single, concurrent, bulk, taking turns (rounds: {rounds})",
              file=sys.stderr)  # fmt: skip
        for name, workloads in _side_by_side(sides, short, single_calls, corpus, rounds).items():
            for workload, metrics in workloads.items():
                for metric, value in metrics.items():
                    results.put(workload, metric, name, value)
        pid = client.stats().worker_pid
        rss = peak_rss_mb(pid) if pid is not None else None
        if rss is not None:
            results.put("worker", "peak_rss_mb", "bridge", rss)

    print("  rust: single, concurrent, bulk, cold start", file=sys.stderr)
    report, note = rust_example(metadata.directory, threads, corpus, single_calls, quick)
    results.notes.append(note)
    if report is not None:
        rust = report["figures"]
        implementations.append("rust")
        for workload in ("single", f"concurrent x{CONCURRENT_CALLERS}", "bulk", "cold start"):
            for metric, value in rust[workload].items():
                results.put(workload, metric, "rust", value)

    baseline = _JsonLinesBaseline(metadata.directory, threads)
    try:
        measure("jsonl", baseline.embed)
    finally:
        baseline.close()

    st_weights = _sentence_transformers_weights()
    if st_weights is None:
        results.notes.append("sentence-transformers is not importable: its column is omitted")
    else:
        embed, version = _sentence_transformers(st_weights, threads)
        implementations.append("st")
        results.notes.append(f"st = {version}")
        measure("st", embed)

    print("  cold start", file=sys.stderr)
    model = str(metadata.directory)
    first = "vectors = {}.embed(['hello world']); print('ready', flush=True)"
    results.put(
        "cold start", "ms_to_first_answer", "in-process",
        _cold_start([sys.executable, "-c",
            "from akidb_embed.worker.config import WorkerConfig; "
            "from akidb_embed.worker.engine import Engine; "
            f"e = Engine.load(WorkerConfig(model_dir={model!r}, threads={threads})); "
            + first.format("e")], cold_starts),
    )  # fmt: skip
    results.put(
        "cold start", "ms_to_first_answer", "bridge",
        _cold_start([sys.executable, "-c",
            "from akidb_embed.host_client import EmbeddingClient; "
            f"c = EmbeddingClient({model!r}, threads={threads}); " + first.format("c")],
            cold_starts),
    )  # fmt: skip
    results.put(
        "cold start",
        "ms_to_first_answer",
        "jsonl",
        _cold_start(baseline.argv, cold_starts, json.dumps({"inputs": ["hello world"]})),
    )
    if st_weights is not None and quick:
        results.notes.append("st cold start left out of a --quick run (torch's import)")
    elif st_weights is not None:
        results.put(
            "cold start", "ms_to_first_answer", "st",
            _cold_start([sys.executable, "-c",
                f"import torch; torch.set_num_threads({threads}); "
                "from sentence_transformers import SentenceTransformer; "
                f"m = SentenceTransformer({str(st_weights)!r}, device='cpu'); "
                "m.encode(['hello world']); print('ready', flush=True)"], cold_starts),
        )  # fmt: skip

    print()
    _print_table(results, implementations)
    print("\n(x) = ratio to in-process; *_ms lower is better, *_per_s higher is better")
    for note in results.notes:
        print(f"note: {note}")
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {"settings": results.settings, "figures": results.figures, "notes": results.notes}
    output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {output}")
    return 0
