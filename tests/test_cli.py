"""The `akidb-embed` command end to end: real worker, real model, output formats, the benchmark."""

from __future__ import annotations

import json
import os
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
    # the smallest run that still fills every column: one text per concurrent caller
    sizes = ("--corpus-size", "16", "--single-calls", "16")
    result = run_cli("bench", "--quick", *sizes, "-o", str(output))
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())["figures"]
    for workload in ("single", "concurrent x16", "bulk", "cold start"):
        implementations = set().union(*(values.keys() for values in figures[workload].values()))
        assert {"in-process", "bridge", "jsonl"} <= implementations, workload
        if workload != "cold start":  # the serve extra is in the dev set-up
            assert {"http", "http.client"} <= implementations, workload
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


# -- errors: one line on stderr, exit code 2, nothing left behind ------------------------------


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one line of a failed command's stderr (exit code 2, no traceback)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def run_cli_without(module: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command in an environment where ``module`` cannot be imported: a stand-in package
    that raises ImportError comes first on the path (this environment has pyarrow, and ray may
    be installed; a machine without them cannot be made here)."""
    blocker = tmp_path / "blocked" / module
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(f"raise ImportError({f'No module named {module}'!r})\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False, env=env
    )


def test_a_missing_input_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nosuch.txt"
    message = one_line_error(run_cli("embed", "--input", str(missing)))
    assert message == f"akidb-embed: InvalidInput: input file {missing} does not exist"


def test_an_unknown_input_suffix_is_refused_unless_its_format_is_named(tmp_path: Path) -> None:
    source = tmp_path / "texts.csv"
    source.write_text("a,b\nc,d\n")
    output = tmp_path / "out.npy"
    message = one_line_error(run_cli("embed", "-i", str(source), "-o", str(output)))
    assert "'.csv'" in message and "--input-format {txt,jsonl,parquet}" in message
    assert not output.exists()
    named = run_cli("embed", "-i", str(source), "--input-format", "txt", "-o", str(output))
    assert named.returncode == 0, named.stderr
    assert np.load(output).shape[0] == 2


def test_an_unknown_output_suffix_or_format_is_one_line(tmp_path: Path) -> None:
    message = one_line_error(run_cli("embed", "-o", str(tmp_path / "out.csv"), "text"))
    assert "--format {npy,jsonl,parquet}" in message
    message = one_line_error(run_cli("embed", "--format", "csv", "text"))
    assert "invalid choice: 'csv'" in message
    assert not list(tmp_path.iterdir())


def test_parquet_without_pyarrow_is_refused_before_anything_is_embedded(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("one\ntwo\n")
    output = tmp_path / "out.parquet"
    result = run_cli_without("pyarrow", tmp_path, "embed", "-i", str(source), "-o", str(output))
    message = one_line_error(result)
    assert "Parquet input and output needs pyarrow" in message
    assert "pip install -e '.[files]'" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["blocked", "in.txt"]


def test_ray_without_its_extra_is_one_line(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("one\n")
    output = tmp_path / "out.jsonl"
    args = ("embed", "--ray", "-i", str(source), "-o", str(output))
    result = run_cli_without("ray", tmp_path, *args)
    assert "--ray needs ray" in one_line_error(result)
    assert not output.exists()


def test_an_encoding_with_ray_is_one_line_before_ray_is_needed(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("one\n")
    output = tmp_path / "out.npy"
    args = ("embed", "--ray", "--encoding", "int8", "-i", str(source), "-o", str(output))
    result = run_cli_without("ray", tmp_path, *args)
    message = one_line_error(result)
    assert message.endswith("--dimensions and --encoding are not served with --ray")
    assert not output.exists()


def test_a_failed_start_is_reported_once_with_its_hint_once(tmp_path: Path) -> None:
    message = one_line_error(run_cli("health", "--model-dir", str(tmp_path / "nowhere")))
    assert message.startswith("akidb-embed: ModelNotFound: no model at ")
    assert message.count("make models") == 1


def test_a_folder_of_model_directories_gets_did_you_mean(metadata: ModelMetadata) -> None:
    models = metadata.directory.parent
    message = one_line_error(run_cli("health", "--model-dir", str(models)))
    suggested = message.partition("did you mean ")[2].removesuffix("?").split(" or ")
    assert str(metadata.directory) in suggested, message  # beside any other provisioned model


FAILED_START = """
import sys
from akidb_embed.host_client import EmbeddingClient, ModelNotFound
try:
    EmbeddingClient(sys.argv[1])
except ModelNotFound as exc:
    print(exc)
"""


def test_the_library_logs_nothing_unless_the_host_configures_logging(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FAILED_START, str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.count("make models") == 1  # the caller's error, with its hint once
