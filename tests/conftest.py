"""Shared fixtures: the provisioned model and real worker processes driven by raw frames.

``RawWorker`` (akidb_embed/bench/raw.py, the raw-frame client the benchmarks use too) speaks to
``python -m akidb_embed.worker`` with nothing but the wire codec over the process's pipes, the
way any host would. Here it collects reply frames on a thread, so that every wait has a timeout
and no test can hang on a silent worker.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from akidb_embed.bench.raw import RawWorker
from akidb_embed.models import ModelMetadata, default_model_dir, load_metadata


@pytest.fixture(scope="session")
def metadata() -> ModelMetadata:
    """The provisioned default model; its absence is a set-up error, not a skip."""
    try:
        return load_metadata(default_model_dir())
    except Exception as exc:
        pytest.fail(f"no provisioned model ({exc}); run `make models`", pytrace=False)


@pytest.fixture(scope="session")
def golden(metadata: ModelMetadata) -> dict[str, Any]:
    """Reference texts and vectors computed by the exporting framework (golden.json)."""
    loaded: dict[str, Any] = json.loads(metadata.path("golden.json").read_text(encoding="utf-8"))
    return loaded


@pytest.fixture
def spawn_worker() -> Iterator[Any]:
    """A factory of ``RawWorker``s, all killed at the end of the test whatever happened."""
    workers: list[RawWorker] = []

    def spawn(*args: str, **kwargs: Any) -> RawWorker:
        worker = RawWorker(args, **kwargs)
        workers.append(worker)
        return worker

    yield spawn
    for worker in workers:
        worker.kill()


@pytest.fixture(scope="module")
def shared_worker(metadata: ModelMetadata) -> Iterator[RawWorker]:
    """One worker with default settings shared by a module's tests (start-up costs ~1 s)."""
    worker = RawWorker()
    yield worker
    worker.kill()


def _run_shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder shared by every process of this run: under pytest-xdist the processes' own
    temporary folders are siblings, so it sits beside them; else it is this process's own."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp(name)
    shared = tmp_path_factory.getbasetemp().parent / name
    shared.mkdir(exist_ok=True)
    return shared


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Held by one process of the run at a time."""
    import fcntl

    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelMetadata]:
    """Every served tiny random-weight model of ``st_fixtures``, built and provisioned through
    the real provisioning (export, parity gate in every mode): its metadata by fixture name.
    The model id recorded is the fixture's name. Built once per run: the other processes of a
    parallel run find the directories provisioned (and verified) by the first."""
    from st_fixtures import FIXTURES

    from akidb_embed.models.provision import provision

    root = _run_shared_dir(tmp_path_factory, "tiny-models")
    built = root / "built"
    provisioned = {}
    with _exclusive(root / "build.lock"):
        for name, spec in FIXTURES.items():
            if spec.refused is not None:
                continue
            source = root / "sources" / name
            if not built.exists():
                spec.build(source)
            result = provision(
                root / "models" / name, source_dir=source, model_id=name, log=lambda message: None
            )
            provisioned[name] = result.metadata
        built.touch()
    return provisioned


@pytest.fixture(scope="session")
def bench_model(tiny_models: dict[str, ModelMetadata]) -> ModelMetadata:
    """The model the bench tests run the bench on: a tiny one, since they check the bench's
    structure and not its figures (tiny models run in microseconds, so the bench's own work is
    what they exercise)."""
    return tiny_models["bert_cls"]
