"""``akidb-embed embed --input/--output``: every format, resume after SIGINT and SIGKILL, bad
records, and the job's memory on a file of a million lines."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from akidb_embed.bulk import Embedded, JobOptions, run_job
from akidb_embed.host_client import EmbeddingClient, ServiceUnavailable

CLI = (sys.executable, "-m", "akidb_embed.cli")
TIMEOUT = 300
WORDS = [
    "cat",
    "dog",
    "mat",
    "log",
    "sun",
    "rain",
    "river",
    "stone",
    "cloud",
    "window",
    "quiet",
    "bright",
]


def sentences(count: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 24)))) for _ in range(count)]


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, "embed", *args], input=stdin, capture_output=True, timeout=TIMEOUT, check=False
    )


def write_input(path: Path, texts: list[str]) -> Path:
    """``texts`` as .txt, .jsonl (ids "t0", "t1", ...) or .parquet, by the path's suffix."""
    ids = [f"t{index}" for index in range(len(texts))]
    if path.suffix == ".txt":
        path.write_text("".join(text + "\n" for text in texts), encoding="utf-8")
    elif path.suffix == ".jsonl":
        lines = (json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True))
        path.write_text("".join(lines), encoding="utf-8")
    else:  # a few row groups, so that reading goes across them
        pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=70)
    return path


def read_output(path: Path) -> tuple[np.ndarray, list[Any] | None, list[str] | None]:
    """Vectors, ids and texts of an output file (None where the format has none)."""
    if path.suffix == ".npy":
        return np.load(path), None, None
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        vectors = np.array([row["embedding"] for row in rows], dtype=np.float32)
        return vectors, [row.get("id") for row in rows], [row.get("text") for row in rows]
    table = pq.read_table(path)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    return vectors, ids, table.column("text").to_pylist()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sentences(200)


@pytest.fixture(scope="module")
def reference(texts: list[str]) -> np.ndarray:
    """The same texts through the Python client's embed(), in one call."""
    with EmbeddingClient() as client:
        return client.embed(texts)


@pytest.mark.parametrize("input_suffix", [".txt", ".jsonl", ".parquet"])
def test_each_input_format_round_trips(
    tmp_path: Path, texts: list[str], reference: np.ndarray, input_suffix: str
) -> None:
    source = write_input(tmp_path / f"in{input_suffix}", texts)
    output = tmp_path / "out.jsonl"
    id_args = () if input_suffix == ".txt" else ("--id-field", "id")
    result = run_cli("-i", str(source), "-o", str(output), "--chunk-texts", "64", *id_args)
    assert result.returncode == 0, result.stderr
    vectors, ids, written = read_output(output)
    assert np.array_equal(vectors, reference)  # the client's vectors, bit for bit
    assert written == texts
    if input_suffix != ".txt":
        assert ids == [f"t{index}" for index in range(len(texts))]
    assert f"{len(texts)} texts" in result.stderr.decode() and "texts/s" in result.stderr.decode()


@pytest.mark.parametrize("output_suffix", [".npy", ".parquet"])
def test_each_output_format_round_trips(
    tmp_path: Path, texts: list[str], reference: np.ndarray, output_suffix: str
) -> None:
    source = write_input(tmp_path / "in.jsonl", texts)
    output = tmp_path / f"out{output_suffix}"
    id_args = () if output_suffix == ".npy" else ("--id-field", "id")
    result = run_cli("-i", str(source), "-o", str(output), "--chunk-texts", "64", *id_args)
    assert result.returncode == 0, result.stderr
    vectors, ids, written = read_output(output)
    assert vectors.dtype == np.float32 and np.array_equal(vectors, reference)
    if output_suffix == ".parquet":
        assert ids == [f"t{index}" for index in range(len(texts))] and written == texts
    assert not output.with_name(output.name + ".progress.json").exists()
    assert not output.with_name(output.name + ".parts").exists()


def test_stdin_to_stdout_keeps_working(texts: list[str], reference: np.ndarray) -> None:
    stdin = "".join(text + "\n" for text in texts[:20]).encode()
    npy = run_cli("--format", "npy", "-o", "-", stdin=stdin)
    assert npy.returncode == 0, npy.stderr
    assert np.array_equal(np.load(io.BytesIO(npy.stdout)), reference[:20])
    lines = run_cli(stdin=stdin)
    assert lines.returncode == 0, lines.stderr
    assert [json.loads(line)["text"] for line in lines.stdout.splitlines()] == texts[:20]


def wait_for_commits(progress: Path, process: subprocess.Popen[bytes], chunks: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        try:
            if json.loads(progress.read_text())["chunks"] >= chunks:
                return
        except (OSError, ValueError):
            pass  # not written yet
        time.sleep(0.01)
    raise AssertionError("no commit came")


@pytest.mark.parametrize(
    ("output_suffix", "stop"),
    [(".npy", "sigint"), (".jsonl", "sigkill"), (".parquet", "sigint")],
)
def test_interrupted_run_resumed_equals_uninterrupted_bit_for_bit(
    tmp_path: Path, output_suffix: str, stop: str
) -> None:
    source = write_input(tmp_path / "in.jsonl", sentences(300, seed=3))
    args = ["-i", str(source), "--chunk-texts", "8", "--skip-bad"]
    if output_suffix != ".npy":
        args += ["--id-field", "id"]
    whole = tmp_path / f"whole{output_suffix}"
    assert run_cli(*args, "-o", str(whole)).returncode == 0

    output = tmp_path / f"cut{output_suffix}"
    progress = output.with_name(output.name + ".progress.json")
    # a session of its own: SIGINT goes to the whole group, as Ctrl-C in a terminal does
    process = subprocess.Popen(
        [*CLI, "embed", *args, "-o", str(output)], stderr=subprocess.PIPE, start_new_session=True
    )
    wait_for_commits(progress, process, chunks=3)
    if stop == "sigint":
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 130, stderr
        committed = json.loads(progress.read_text())["rows"]
        assert f"{committed} rows written and committed" in stderr.decode()
        if output_suffix == ".npy":  # a valid .npy of exactly the committed rows
            assert np.load(output).shape == (committed, 384)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=TIMEOUT)
    assert 0 < json.loads(progress.read_text())["rows"] < 300

    resumed = run_cli(*args, "-o", str(output), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after row" in resumed.stderr.decode()
    assert output.read_bytes() == whole.read_bytes()
    assert not progress.exists()


def test_a_started_run_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.txt", ["one", "two"])
    output = tmp_path / "out.npy"
    output.with_name("out.npy.progress.json").write_text("{}")
    result = run_cli("-i", str(source), "-o", str(output))
    assert result.returncode == 2
    assert b"pass --resume" in result.stderr


BAD_JSONL = (
    b'{"text": "fine one"}\n'
    b"{not json\n"
    b'{"text": "fine two"}\n'
    b'{"title": "no text field"}\n'
    b'{"text": 42}\n'
    b'{"text": "bad \xff\xfe utf-8"}\n'
    b'["a list"]\n'
    b'{"text": "fine three"}\n'
)


def test_bad_lines_stop_the_run_naming_their_line(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(BAD_JSONL)
    output = tmp_path / "out.npy"
    result = run_cli("-i", str(source), "-o", str(output))
    assert result.returncode == 2
    assert "line 2: invalid JSON" in result.stderr.decode()
    assert np.load(output).shape == (1, 384)  # the good line before it, in a valid .npy


def test_skip_bad_lists_every_bad_line_beside_the_output(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(BAD_JSONL)
    output = tmp_path / "out.jsonl"
    result = run_cli("-i", str(source), "-o", str(output), "--skip-bad", "--chunk-texts", "2")
    assert result.returncode == 0, result.stderr
    _, _, written = read_output(output)
    assert written == ["fine one", "fine two", "fine three"]
    skipped = [json.loads(line) for line in (tmp_path / "out.jsonl.skipped.jsonl").open()]
    assert [(row["line"], row["problem"].split(" (")[0]) for row in skipped] == [
        (2, "invalid JSON"),
        (4, "no field 'text'"),
        (5, "field 'text' is a number, not a string"),
        (6, "invalid UTF-8 at byte 14"),
        (7, "not a JSON object but an array"),
    ]
    assert "5 bad records skipped" in result.stderr.decode()


def test_parquet_input_reports_null_texts_by_row(tmp_path: Path) -> None:
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), source)
    result = run_cli("-i", str(source), "-o", str(tmp_path / "out.npy"))
    assert result.returncode == 2
    assert "row 2: column 'text' is null" in result.stderr.decode()


RSS_BOUND_MB = 200
MEMORY_PROBE = """
import sys
from concurrent.futures import Future
from pathlib import Path
import numpy as np
from akidb_embed.bulk import Embedded, JobOptions, run_job

class Constant:
    dimension, model = 8, "probe"
    def submit(self, texts):
        future = Future()
        future.set_result(Embedded(np.ones((len(texts), 8), np.float32), len(texts)))
        return future

options = JobOptions(Path(sys.argv[1]), Path(sys.argv[2]), "jsonl", "npy")
summary = run_job(options, Constant())
# VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak over into a child's
# ru_maxrss through fork and exec, so a large test runner would be measured instead
peak_kb = next(
    int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")
)
print(summary.texts, peak_kb // 1024)
"""


def test_memory_of_a_million_line_job_stays_bounded(tmp_path: Path) -> None:
    """The job's own memory (reading, chunking, writing, committing) on a 1,000,000-line file,
    with an embedder that answers at once so that only the job is measured: the worker's
    memory is bounded by its own limits (max_pending_texts, max_batch_tokens)."""
    source = tmp_path / "big.jsonl"
    line = json.dumps({"text": "a line of text that is long enough to count " * 2}) + "\n"
    with source.open("w") as stream:
        for _ in range(1000):
            stream.write(line * 1000)
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(source), str(tmp_path / "out.npy")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    texts, peak_mb = map(int, result.stdout.split())
    assert texts == 1_000_000
    assert np.load(tmp_path / "out.npy", mmap_mode="r").shape == (1_000_000, 8)
    assert peak_mb < RSS_BOUND_MB, f"peak RSS {peak_mb} MB for a {source.stat().st_size} B file"


def jsonl_with_null_text_at(path: Path, count: int, bad_line: int) -> Path:
    """``count`` lines of ``{"id", "text"}``, the text of line ``bad_line`` null."""
    texts = sentences(count, seed=11)
    lines = (
        json.dumps({"id": f"t{number}", "text": None if number == bad_line else text}) + "\n"
        for number, text in enumerate(texts, 1)
    )
    path.write_text("".join(lines), encoding="utf-8")
    return path


def one_line(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize(
    ("output_suffix", "bad_line"),
    [(".jsonl", 20), (".parquet", 20), (".npy", 6), (".jsonl", 6), (".parquet", 1)],
)
def test_a_stop_on_a_bad_record_commits_what_came_before_and_resume_skip_bad_goes_on(
    tmp_path: Path, output_suffix: str, bad_line: int
) -> None:
    """Line 20 is in the third chunk of 8, line 6 in the first, line 1 has nothing before it;
    the finished file equals a run with --skip-bad from the start, bit for bit."""
    source = jsonl_with_null_text_at(tmp_path / "in.jsonl", 30, bad_line)
    args = ["-i", str(source), "--chunk-texts", "8"]
    if output_suffix != ".npy":
        args += ["--id-field", "id"]
    whole = tmp_path / f"whole{output_suffix}"
    assert run_cli(*args, "-o", str(whole), "--skip-bad").returncode == 0

    output = tmp_path / f"out{output_suffix}"
    stopped = run_cli(*args, "-o", str(output))
    assert stopped.returncode == 2
    message = one_line(stopped.stderr)
    assert f"line {bad_line}: field 'text' is null, not a string" in message
    assert f"the {bad_line - 1} rows before it are committed" in message
    assert "--resume --skip-bad" in message
    progress = output.with_name(output.name + ".progress.json")
    assert json.loads(progress.read_text())["rows"] == bad_line - 1
    if output_suffix == ".npy":
        assert np.load(output).shape == (bad_line - 1, 384)

    resumed = run_cli(*args, "-o", str(output), "--resume", "--skip-bad")
    assert resumed.returncode == 0, resumed.stderr
    assert "1 bad record skipped" in resumed.stderr.decode()
    assert output.read_bytes() == whole.read_bytes()
    skipped = output.with_name(output.name + ".skipped.jsonl").read_text()
    problem = "field 'text' is null, not a string"
    assert json.loads(skipped) == {"line": bad_line, "problem": problem}
    assert not progress.exists()


def test_resume_after_a_stop_without_skip_bad_stops_at_the_next_bad_record(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["one", "two", None, "four", 5, "six"]),
        encoding="utf-8",
    )
    output = tmp_path / "out.jsonl"
    first = run_cli("-i", str(source), "-o", str(output))
    assert "line 3:" in one_line(first.stderr) and "the 2 rows before it" in one_line(first.stderr)
    second = run_cli("-i", str(source), "-o", str(output), "--resume", "--skip-bad")
    assert second.returncode == 0, second.stderr
    _, _, written = read_output(output)
    assert written == ["one", "two", "four", "six"]


def test_a_failure_before_the_first_commit_leaves_nothing_behind(tmp_path: Path) -> None:
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"title": ["no text column"]}), source)
    output = tmp_path / "out.npy"
    result = run_cli("-i", str(source), "-o", str(output))
    assert result.returncode == 2
    assert "has no column 'text'" in one_line(result.stderr)
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize("where", ["file", "stdin"])
def test_an_empty_input_is_refused_leaving_no_output(tmp_path: Path, where: str) -> None:
    output = tmp_path / "out.npy"
    if where == "file":
        source = tmp_path / "empty.txt"
        source.touch()
        result = run_cli("-i", str(source), "-o", str(output))
    else:
        result = run_cli("-o", str(output), stdin=b"")
    assert result.returncode == 2
    assert "no texts to embed" in one_line(result.stderr)
    assert not output.exists()
    assert not output.with_name("out.npy.progress.json").exists()


class FailingEmbedder:
    """An embedder whose chunk number ``fail_at`` (from 0) fails as a worker that cannot be
    replaced fails a call: the job's handling of it, without the minutes a real restart budget
    takes to run out."""

    dimension, model = 4, "probe"

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls = fail_at, 0

    def submit(self, texts: list[str]) -> Future[Embedded]:
        future: Future[Embedded] = Future()
        if self.calls == self.fail_at:
            future.set_exception(ServiceUnavailable("giving up after 5 restarts in a row"))
        else:
            future.set_result(Embedded(np.ones((len(texts), 4), np.float32), len(texts)))
        self.calls += 1
        return future


@pytest.mark.parametrize("fail_at", [0, 3])
def test_a_failed_embedding_leaves_a_resumable_state_it_names_or_nothing(
    tmp_path: Path, fail_at: int
) -> None:
    source = write_input(tmp_path / "in.txt", sentences(40))
    output = tmp_path / "out.npy"
    options = JobOptions(source, output, "txt", "npy", chunk_texts=8)
    with pytest.raises(ServiceUnavailable) as raised:
        run_job(options, FailingEmbedder(fail_at), in_flight=1)
    progress = output.with_name("out.npy.progress.json")
    if fail_at == 0:  # nothing committed: nothing left
        assert str(raised.value) == "giving up after 5 restarts in a row"
        assert sorted(tmp_path.iterdir()) == [source]
        return
    assert f"Stopped: 24 rows are committed to {output};" in str(raised.value)
    assert f"--resume to go on ({progress})" in str(raised.value)
    assert np.load(output).shape == (24, 4)
    resumed = run_job(replace(options, resume=True), FailingEmbedder(-1))
    assert (resumed.resumed_at, resumed.texts) == (24, 16)
    assert np.load(output).shape == (40, 4) and not progress.exists()
