"""The `akidb-embed` command end to end: real worker, real model, output formats, the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from akidb_embed.cores import size_lanes, usable_cores
from akidb_embed.models import ModelMetadata

CLI = (sys.executable, "-m", "akidb_embed.cli")
TIMEOUT = 300


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_embed_from_arguments_prints_golden_vectors_as_json_lines(golden: dict[str, Any]) -> None:
    sentences = golden["sentences"][:3]
    result = run_cli("embed", *sentences)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["text"] for line in lines] == sentences
    vectors = np.array([line["embedding"] for line in lines], dtype=np.float32)
    expected = np.array(golden["embeddings"][:3], dtype=np.float32)
    assert cosines(vectors, expected).min() >= 0.99999


def test_embed_from_stdin_writes_npy(tmp_path: Path, metadata: ModelMetadata) -> None:
    output = tmp_path / "vectors.npy"
    result = run_cli("embed", "--format", "npy", "-o", str(output), stdin="one\ntwo\nthree\n")
    assert result.returncode == 0, result.stderr
    vectors = np.load(output)
    assert vectors.shape == (3, metadata.dimension)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embed_without_normalisation_keeps_raw_norms(metadata: ModelMetadata) -> None:
    result = run_cli("embed", "--no-normalize", "a sentence long enough to have a raw norm")
    assert result.returncode == 0, result.stderr
    vector = np.array(json.loads(result.stdout)["embedding"])
    assert vector.shape == (metadata.dimension,)
    assert abs(np.linalg.norm(vector) - 1.0) > 1e-3


def test_info_reports_model_facts_from_metadata(metadata: ModelMetadata) -> None:
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["model"], info["dimension"], info["max_tokens"]) == (
        metadata.model,
        metadata.dimension,
        metadata.max_tokens,
    )
    assert "CPUExecutionProvider" in info["providers"]
    assert info["limits"]["max_texts_per_request"] > 0
    assert (info["workers"], info["lanes"], info["threads"]) == (1, *size_lanes(usable_cores()))


def test_info_passes_lanes_and_threads_to_the_worker() -> None:
    result = run_cli("info", "--lanes", "2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["lanes"], info["threads"]) == (2, 1)


def test_health_succeeds_and_a_missing_model_fails_with_its_reason(tmp_path: Path) -> None:
    healthy = run_cli("health")
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "ok"), healthy.stderr
    missing = run_cli("health", "--model-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert "ModelNotFound" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_demo_prints_a_similarity_matrix_whose_pairs_match() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    # the demo sentences come in pairs of one topic: each one's closest is its partner
    assert "[1]->[2], [2]->[1], [3]->[4], [4]->[3], [5]->[6], [6]->[5]" in result.stdout


def test_quick_bench_measures_every_implementation_side_by_side(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = run_cli("bench", "--quick", "-o", str(output))
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())["figures"]
    for workload in ("single", "concurrent x16", "bulk", "cold start"):
        implementations = set().union(*(values.keys() for values in figures[workload].values()))
        assert {"in-process", "bridge", "jsonl"} <= implementations, workload
    assert "st" in figures["bulk"]["texts_per_s"]  # sentence-transformers is in the dev set-up
    assert figures["worker"]["peak_rss_mb"]["bridge"] > 0
    assert "ratio to in-process" in result.stdout
    # the Rust client's column, or the reason it is missing (no cargo, not a checkout)
    notes = json.loads(output.read_text())["notes"]
    if "rust" in figures["bulk"]["texts_per_s"]:
        assert figures["single"]["p50_ms"]["rust"] > 0
        assert figures["concurrent x16"]["requests_per_s"]["rust"] > 0
    else:
        assert any(note.startswith("rust column omitted: ") for note in notes), notes


def test_readme_python_example_runs_as_written() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert "Usage(total_tokens=" in result.stdout


def test_embed_on_a_pool_of_two_workers_gives_the_golden_vectors(
    tmp_path: Path, golden: dict[str, Any]
) -> None:
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(golden["sentences"][1:]) + "\n", encoding="utf-8")
    output = tmp_path / "vectors.npy"
    result = run_cli(
        "embed", "--workers", "2", "--threads", "1", "--input", str(source), "--output", str(output)
    )
    assert result.returncode == 0, result.stderr
    expected = np.asarray(golden["embeddings"][1:], dtype=np.float32)
    assert cosines(np.load(output), expected).min() >= 0.99999
