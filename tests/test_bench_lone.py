"""``akidb-embed bench --breakdown`` and ``--lone`` (quick, without the Rust column): the stages
of one lone request through raw frames and the Python client, and the lone-query table with
and without ``--spin-wait``, measured through the real worker on a tiny model. Structure only:
speed is what the benchmark prints, never a test's assertion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from akidb_embed.bench.breakdown import STAGES
from akidb_embed.models import ModelMetadata


def run_bench(model: ModelMetadata, tmp_path: Path, *flags: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "akidb_embed.cli", "bench", *flags, "--quick", "--no-rust",
         "--corpus-size", "16", "--model-dir", str(model.directory),
         "-o", str(tmp_path / "bench.json")],
        check=True,
        capture_output=True,
        timeout=600,
    )  # fmt: skip


def test_breakdown_times_every_stage_of_a_lone_request(
    bench_model: ModelMetadata, tmp_path: Path
) -> None:
    run_bench(bench_model, tmp_path, "--breakdown")
    document = json.loads((tmp_path / "bench-breakdown.json").read_text())
    stages = document["stages"]
    assert list(stages) == ["in-process", "raw frames", "python"]
    for column in stages.values():
        assert set(column) == {name for name, _ in STAGES} | {"pipes_and_wakeups_us"}
        # one clock for host and worker: every stage is a non-negative span of the round trip
        assert all(value >= 0 for value in column.values()), column
        assert column["ort_run_us"] > 0 and column["tokenize_us"] > 0
        assert all(value <= column["total_us"] for value in column.values())
    # the machine's floor beside them: bare pipe wake-ups, and one reply's encoding both ways
    assert set(document["floor"]) == {"wake_ups_us", "encode_warm_us", "encode_after_run_us"}
    assert all(value > 0 for value in document["floor"].values())


def test_lone_table_compares_every_side_with_and_without_spin_wait(
    bench_model: ModelMetadata, tmp_path: Path
) -> None:
    run_bench(bench_model, tmp_path, "--lone")
    document = json.loads((tmp_path / "bench-lone.json").read_text())
    assert list(document["modes"]) == ["--no-spin-wait", "--spin-wait"]
    for figures in document["modes"].values():
        for metric in ("lone_p50_ms", "lone_p99_ms", "first30_p50_ms"):
            assert set(figures[metric]) == {"in-process", "python", "raw frames"}
            assert all(value > 0 for value in figures[metric].values())
        for metric in ("x16_requests_per_s", "bulk_texts_per_s"):
            assert set(figures[metric]) == {"in-process", "python", "raw frames"}
        assert set(figures["ready_s"]) == {
            "in-process (fresh interpreter)", "in-process", "python", "raw frames"
        }  # fmt: skip
