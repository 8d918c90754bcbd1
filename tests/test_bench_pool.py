"""``akidb-embed bench --pool --quick``: both set-ups measured through the real client and
worker, and the projection computed from the pool's own figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from akidb_embed.bench.pool import PROJECTED_CORES
from akidb_embed.models import ModelMetadata


def test_quick_pool_bench_measures_both_setups_and_projects_per_core(
    metadata: ModelMetadata, tmp_path: Path
) -> None:
    output = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "akidb_embed.cli",
            "bench",
            "--pool",
            "--quick",
            "--model-dir",
            str(metadata.directory),
            "-o",
            str(output),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )

    document = json.loads((tmp_path / "bench-pool.json").read_text())
    cores = document["cores"]
    figures = document["figures"]
    assert list(figures) == [f"1 worker x {cores} threads", f"{cores} workers x 1 thread"]
    for values in figures.values():
        assert values["bulk_texts_per_s"] > 0 and values["lone_p50_ms"] > 0
        assert values["lone_p99_ms"] >= values["lone_p50_ms"]
    pool = figures[f"{cores} workers x 1 thread"]
    projected = document["projection_not_measured"]
    assert list(projected) == [f"{count} cores" for count in PROJECTED_CORES]
    for count in PROJECTED_CORES:
        expected = pool["bulk_texts_per_s"] / cores * count
        assert projected[f"{count} cores"]["bulk_texts_per_s"] == pytest.approx(expected)
