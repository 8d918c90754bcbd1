"""Provision a model directory: idempotent, verified, and atomic.

::

    provision(model_dir) --lock <parent>/.akidb-embed-provisioning/<name>.lock
       |
       +-- verify_model_dir: intact (sizes + sha256) and not --force ------> "nothing to do"
       |      damaged or absent: the problems are reported, then
       v
    find_source: --source-dir > hub > offline export (none -> ModelNotFound listing the three)
       |
       v  into <parent>/.akidb-embed-provisioning/<name>.tmp-XXXX/
    model.onnx      copied from the source, or exported (export.py)
    tokenizer.json  the source's, with padding and truncation removed (the worker sets both)
    golden.json     reference vectors; our ONNX pipeline must match them (golden.py), else
                    ParityError with the figures and nothing is installed
    akidb-embed.json  written last: facts from the configs, sha256 of each file, source, parity
       |
       v  rename the old directory aside, rename the new one into place, delete the old one
    "provisioned" or "replaced"

A run killed at any point leaves either the previous directory or the new complete one under the
model directory's name; leftovers in the work folder are removed by the next run. Files are not
fsync'ed (flushing 90 MB can stall for a long time on a busy disk): after a power loss, a file the
disk lost shows up as a size or sha256 mismatch, which the next run repairs. Only numpy,
tokenizers and onnxruntime (worker dependencies) are needed unless the model must be exported or
checked against sentence-transformers; checking an intact directory imports none of them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import akidb_embed
from akidb_embed.models.metadata import (
    GOLDEN_FILE,
    METADATA_FILE,
    MODEL_FILE,
    REQUIRED_FILES,
    TOKENIZER_FILE,
    FileRecord,
    ModelMetadata,
    default_model_dir,
    file_sha256,
    load_metadata,
    verify_model_dir,
)
from akidb_embed.models.sources import ModelConfig, Source, find_source, read_model_config

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent provisioning is not guarded there
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "NOTHING_TO_DO",
    "PROVISIONED",
    "REPLACED",
    "WORK_FOLDER",
    "ParityError",
    "ProvisionError",
    "ProvisionResult",
    "clean_tokenizer_config",
    "provision",
]

NOTHING_TO_DO = "nothing to do"
PROVISIONED = "provisioned"
REPLACED = "replaced"
WORK_FOLDER = ".akidb-embed-provisioning"
"""Beside the model directory (same file system, so the final rename is atomic): the lock file
and the directory being built."""
SUPPORTED_POOLING = ("mean",)
"""Pooling modes ``akidb_embed.pooling`` implements (and so the worker serves)."""

Log = Callable[[str], None]


class ProvisionError(Exception):
    """Provisioning cannot go on: the message says what is wrong and nothing was installed."""


class ParityError(ProvisionError):
    """The model's vectors through our pipeline differ from the reference's (figures inside)."""


@dataclass(frozen=True)
class ProvisionResult:
    """What ``provision`` did (``outcome``), the directory's metadata, and what was wrong with
    the directory before (empty when it was absent or intact)."""

    outcome: str
    metadata: ModelMetadata
    problems: list[str] = field(default_factory=list)


def _stderr(message: str) -> None:
    print(f"models: {message}", file=sys.stderr, flush=True)


def clean_tokenizer_config(source: Path, target: Path) -> None:
    """Copy a tokenizer.json without its padding and truncation settings: the shipped file pads
    every input to 128 tokens and cuts it there, while the model reads up to its max tokens; the
    worker sets both from the metadata."""
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"cannot read {source}: {exc}") from None
    config["padding"] = None
    config["truncation"] = None
    text = json.dumps(config, ensure_ascii=False, separators=(",", ":"))
    target.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def _exclusive(work: Path, name: str) -> Iterator[None]:
    with (work / f"{name}.lock").open("a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(work: Path, name: str) -> None:
    """Directories of runs that were killed (only called under the lock)."""
    for leftover in [*work.glob(f"{name}.tmp-*"), *work.glob(f"{name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _replaceable(target: Path) -> bool:
    """Whether ``target`` may be replaced: absent, empty, or a model directory of ours. Anything
    else might be the user's data, which provisioning must never delete."""
    if not target.exists() and not target.is_symlink():
        return True
    if not target.is_dir():
        return False
    entries = {entry.name for entry in target.iterdir()}
    return METADATA_FILE in entries or entries <= {*REQUIRED_FILES, METADATA_FILE}


def _golden_and_parity(
    source: Source, config: ModelConfig, build: Path, log: Log
) -> dict[str, Any]:
    """Check ``build``'s model.onnx against the best reference available, write golden.json, and
    return the parity record for the metadata. ``ParityError`` when the vectors differ."""
    from akidb_embed.models import golden

    source_golden = source.config_dir / GOLDEN_FILE
    stored = golden.read_golden(source_golden) if source_golden.is_file() else None
    reference_vectors = None
    unverified = ""
    if stored is not None:
        sentences, reference_vectors, label = stored.sentences, stored.embeddings, stored.reference
        log(f"checking against the reference vectors in {source_golden} ({label})")
    else:
        sentences = list(golden.GOLDEN_SENTENCES)
        if source.reference_dir is None:
            unverified = f"no weights beside the {source.kind} source to compute reference vectors"
        elif importlib.util.find_spec("sentence_transformers") is None:
            unverified = "sentence-transformers is not installed"
        else:
            log(f"computing reference vectors with sentence-transformers ({len(sentences)} texts)")
            reference_vectors, label = golden.reference_embeddings(source.reference_dir, sentences)
    ours, token_counts = golden.embed_with_onnxruntime(
        build / MODEL_FILE, build / TOKENIZER_FILE, sentences, config.max_tokens, config.normalize
    )
    if ours.shape[1] != config.dimension:
        raise ProvisionError(
            f"{MODEL_FILE} gives {ours.shape[1]}-dimensional vectors, config.json says "
            f"{config.dimension}"
        )
    runtime = {"onnxruntime": importlib.metadata.version("onnxruntime")}
    if reference_vectors is None:
        log(f"WARNING: vectors not checked ({unverified}); golden.json holds our own vectors")
        label = f"akidb-embed onnxruntime pipeline (unverified: {unverified})"
        record: dict[str, Any] = {"verified": False, "reason": unverified, **runtime}
        reference_vectors = ours
    else:
        if stored is not None and stored.token_counts != token_counts:
            raise ProvisionError(
                f"the tokenizer splits the sentences of {source_golden} differently "
                f"({token_counts} tokens, the file says {stored.token_counts})"
            )
        try:
            parity = golden.compare(ours, reference_vectors, label)
        except ValueError as exc:
            raise ParityError(f"{MODEL_FILE} of the {source.kind} source: {exc}") from None
        if not parity.passes:
            raise ParityError(f"{MODEL_FILE} of the {source.kind} source: {parity.describe()}")
        log(f"parity: {parity.describe()}")
        record = {**parity.to_json(), **runtime}
    golden.write_golden(
        build / GOLDEN_FILE,
        golden.Golden(
            model=source.model_id,
            dimension=config.dimension,
            max_tokens=config.max_tokens,
            normalize=config.normalize,
            reference=label,
            sentences=list(sentences),
            token_counts=token_counts,
            embeddings=reference_vectors,
        ),
    )
    return record


def _build(source: Source, target: Path, build: Path, log: Log) -> None:
    """Fill ``build`` with a complete model directory from ``source`` (metadata last)."""
    try:
        config = read_model_config(source.config_dir)
    except Exception as exc:
        raise ProvisionError(str(exc)) from None
    if config.pooling not in SUPPORTED_POOLING:
        raise ProvisionError(f"pooling {config.pooling!r} is not supported ({SUPPORTED_POOLING})")
    source_record: dict[str, Any] = {"kind": source.kind, **source.details}
    if source.onnx_path is None:
        from akidb_embed.models.export import export_onnx

        log(f"exporting {source.model_id} to ONNX from {source.config_dir} (torch, offline)")
        source_record.update(export_onnx(source.config_dir, build / MODEL_FILE))
    else:
        log(f"copying {source.onnx_path}")
        shutil.copyfile(source.onnx_path, build / MODEL_FILE)
    clean_tokenizer_config(source.config_dir / TOKENIZER_FILE, build / TOKENIZER_FILE)
    parity = _golden_and_parity(source, config, build, log)
    source_record["akidb_embed"] = akidb_embed.__version__
    metadata = ModelMetadata(
        directory=target,
        model=source.model_id,
        dimension=config.dimension,
        max_tokens=config.max_tokens,
        pooling=config.pooling,
        normalize=config.normalize,
        files={
            name: FileRecord(sha256=file_sha256(build / name), bytes=(build / name).stat().st_size)
            for name in REQUIRED_FILES
        },
        source=source_record,
        parity=parity,
    )
    text = json.dumps(metadata.to_json(), indent=2, ensure_ascii=False) + "\n"
    (build / METADATA_FILE).write_text(text, encoding="utf-8")


def provision(
    model_dir: Path | str | None = None,
    *,
    source_dir: Path | str | None = None,
    model_id: str | None = None,
    force: bool = False,
    allow_hub: bool = True,
    log: Log = _stderr,
) -> ProvisionResult:
    """Make ``model_dir`` (default: ``default_model_dir()``) an intact, verified model directory.

    Does nothing when it already is one (unless ``force``). Otherwise takes the model from
    ``source_dir`` when given, else the hub (when ``allow_hub``, installed and online), else the
    offline export. Raises ``ModelNotFound`` when there is no source (the message lists the three
    ways), ``ParityError`` when the vectors do not match the reference, ``ProvisionError`` for
    anything else that stops it; the previous directory is then left as it was.
    """
    target = Path(model_dir).expanduser() if model_dir is not None else default_model_dir()
    target = target.absolute()
    work = target.parent / WORK_FOLDER
    work.mkdir(parents=True, exist_ok=True)
    with _exclusive(work, target.name):
        _remove_leftovers(work, target.name)
        problems: list[str] = []
        if target.exists():
            problems = verify_model_dir(target)
            if not problems and not force:
                return ProvisionResult(NOTHING_TO_DO, load_metadata(target))
            for problem in problems:
                log(f"{target}: {problem}")
        if not _replaceable(target):
            raise ProvisionError(
                f"{target} exists and is not a model directory of akidb-embed; move it away or "
                "provision elsewhere (--model-dir)"
            )
        source = find_source(source_dir, model_id=model_id, allow_hub=allow_hub)
        # mkdir (not mkdtemp, which makes it private to this user) so the umask decides.
        build = work / f"{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        build.mkdir()
        try:
            _build(source, target, build, log)
            existed = target.exists() or target.is_symlink()
            if existed:
                aside = work / f"{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(target, aside)
                os.replace(build, target)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(build, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return ProvisionResult(REPLACED if existed else PROVISIONED, load_metadata(target), problems)
