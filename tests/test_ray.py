"""``akidb-embed embed --ray`` on a local Ray with two actors: the vectors equal the local run's
(``make test-ray``, which installs the ``ray`` extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_bulk import read_output, sentences, write_input

pytestmark = pytest.mark.ray


def test_ray_run_with_two_actors_gives_the_local_vectors(tmp_path: Path) -> None:
    texts = sentences(300, seed=11)
    source = write_input(tmp_path / "in.jsonl", texts)
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    common = ["-i", str(source), "--id-field", "id", "--chunk-texts", "64"]
    cli = [sys.executable, "-m", "akidb_embed.cli", "embed", *common]
    for output, extra in ((local, []), (on_ray, ["--ray", "--ray-actors", "2"])):
        result = subprocess.run(
            [*cli, "-o", str(output), *extra], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr
    expected, expected_ids, expected_texts = read_output(local)
    vectors, ids, written = read_output(on_ray)
    cosines = np.sum(expected * vectors, axis=1) / (
        np.linalg.norm(expected, axis=1) * np.linalg.norm(vectors, axis=1)
    )
    assert cosines.min() >= 0.99999
    assert (
        (ids, written) == (expected_ids, expected_texts) == ([f"t{i}" for i in range(300)], texts)
    )
    assert pq.read_schema(on_ray) == pq.read_schema(local)
    assert json.dumps(ids)  # plain values, as the local run's
