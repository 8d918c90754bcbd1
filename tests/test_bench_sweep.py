"""``akidb-embed bench --sweep --quick``: the in-process rows, the default client and the grid
that fills the cores, each measured through the real client and worker (on a tiny model: the
structure is checked, not the figures), with its vectors checked against in-process ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from akidb_embed.bench.sweep import CALLER_COUNTS, client_grid
from akidb_embed.cores import size_lanes
from akidb_embed.models import ModelMetadata


def test_quick_sweep_measures_in_process_the_default_and_the_grid(
    bench_model: ModelMetadata, tmp_path: Path
) -> None:
    output = tmp_path / "bench.json"
    subprocess.run(
        [
            *(sys.executable, "-m", "akidb_embed.cli", "bench", "--sweep", "--quick"),
            *("--corpus-size", "16", "--single-calls", "16"),
            *("--model-dir", str(bench_model.directory), "-o", str(output)),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )

    document = json.loads((tmp_path / "bench-sweep.json").read_text())
    cores = document["cores"]
    rows = {row["name"]: row for row in document["rows"]}
    in_process = [row for row in document["rows"] if row["kind"] == "in-process"]
    assert {row["threads"] for row in in_process} == {cores, min(cores, 4), 1}
    default = rows["default"]
    assert (default["lanes"], default["threads"]) == size_lanes(cores)
    for workers, lanes, threads in client_grid(cores):
        row = rows[f"{workers} x {lanes} x {threads}"]
        assert (row["workers"], row["lanes"], row["threads"]) == (workers, lanes, threads)
    for row in document["rows"]:
        assert row["bulk_texts_per_s"] > 0 and row["lone_p99_ms"] >= row["lone_p50_ms"] > 0
        for callers in CALLER_COUNTS:
            assert row[f"x{callers}_requests_per_s"] > 0
        if row["kind"] == "client":
            assert row["min_cosine"] >= 0.99999, row  # every configuration, the same vectors
            assert row["rss_mb"] > 0
