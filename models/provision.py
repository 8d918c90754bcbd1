"""Provision a model directory: idempotent, verified, and atomic.

::

    provision(model_dir) --lock <parent>/.akidb-embed-provisioning/<name>.lock
       |
       +-- verify_model_dir: intact (sizes + sha256) and not --force ------> "nothing to do"
       |      damaged or absent: the problems are reported, then
       v
    find_source: --source-dir > hub > offline export (none -> ModelNotFound listing the three)
       |
       v  read_model_config: every fact from the sentence-transformers configs; a module or
       |  pooling mode the worker does not serve -> ProvisionError naming it, nothing written
       v  into <parent>/.akidb-embed-provisioning/<name>.tmp-XXXX/
    model.onnx      copied from the source, or exported (export.py)
    tokenizer.json  the source's, with padding and truncation removed (the worker sets both)
                    and sentence-transformers' lowercasing when the configs ask for it
    golden.json     reference vectors; the worker's own engine must match sentence-transformers
                    in every mode (golden.py), else ParityError with the figures and nothing
                    is installed
    calibration.npy pooled vectors of a fixed corpus: the source of the int8/uint8 ranges
                    (an intact directory without it gets it alone, "calibrated")
    akidb-embed.json  written last: facts from the configs and the tokenizer, sha256 of each
                    file, source, parity
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import akidb_embed
from akidb_embed.errors import ModelNotFound
from akidb_embed.models.metadata import (
    CALIBRATION_FILE,
    GOLDEN_FILE,
    METADATA_FILE,
    MODEL_FILE,
    REQUIRED_FILES,
    TOKENIZER_FILE,
    ModelMetadata,
    default_model_dir,
    file_records,
    load_metadata,
    verify_model_dir,
    write_metadata,
)
from akidb_embed.models.sources import ModelConfig, Source, find_source, read_model_config

if TYPE_CHECKING:
    from akidb_embed.worker.engine import Engine

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent provisioning is not guarded there
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CALIBRATED",
    "NOTHING_TO_DO",
    "PROVISIONED",
    "REPLACED",
    "WORK_FOLDER",
    "ParityError",
    "ProvisionError",
    "ProvisionResult",
    "install_directory",
    "prepare_tokenizer",
    "provision",
    "tokenizer_facts",
    "write_calibration",
]

NOTHING_TO_DO = "nothing to do"
PROVISIONED = "provisioned"
REPLACED = "replaced"
CALIBRATED = "calibrated"
"""An intact directory provisioned before calibration existed got its calibration vectors."""
CALIBRATION_TEXTS = 1000
CALIBRATION_SEED = 20261204
"""The calibration corpus: the bench corpus's generator with a seed of its own (its texts are
the same mix of lengths, drawn in another order and cut at other places)."""
WORK_FOLDER = ".akidb-embed-provisioning"
"""Beside the model directory (same file system, so the final rename is atomic): the lock file
and the directory being built."""

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


def prepare_tokenizer(source: Path, target: Path, config: ModelConfig) -> None:
    """Write the tokenizer sentence-transformers would run: the source's tokenizer.json without
    its padding and truncation settings (the shipped all-MiniLM-L6-v2 file pads every input to
    128 tokens and cuts it there, while the model reads up to its max tokens; the worker sets
    both from the metadata), with a Lowercase normaliser put first when the configs ask for
    ``do_lower_case`` and the normaliser does not lowercase already (as sentence-transformers
    does when it loads the model)."""
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"cannot read {source}: {exc}") from None
    document["padding"] = None
    document["truncation"] = None
    if config.do_lower_case:
        normalizer = document.get("normalizer")
        kinds = [normalizer] if normalizer and normalizer.get("type") != "Sequence" else []
        if normalizer and normalizer.get("type") == "Sequence":
            kinds = normalizer.get("normalizers") or []
        if not any(step.get("type") == "Lowercase" for step in kinds):
            document["normalizer"] = {
                "type": "Sequence",
                "normalizers": [{"type": "Lowercase"}, *kinds],
            }
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
    target.write_text(text, encoding="utf-8")


def tokenizer_facts(tokenizer_path: Path, config: ModelConfig) -> dict[str, Any]:
    """The metadata's token facts: the pad token's id, and for each prompt the leading tokens
    sentence-transformers leaves out of pooling when ``include_prompt`` is false (the prompt
    tokenised alone, less a trailing special token such as [SEP] or EOS)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    special_ids = {
        token_id
        for token_id, token in tokenizer.get_added_tokens_decoder().items()
        if token.special
    }
    pad_id = tokenizer.token_to_id(config.pad_token) if config.pad_token else None
    prompt_lengths = {}
    for name, prompt in config.prompts.items():
        ids = tokenizer.encode(prompt).ids if prompt else []
        prompt_lengths[name] = len(ids) - (1 if ids and ids[-1] in special_ids else 0)
    return {"pad_token_id": pad_id or 0, "prompt_lengths": prompt_lengths}


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


def _golden_and_parity(source: Source, engine: Engine, build: Path, log: Log) -> dict[str, Any]:
    """Check the model in ``build``, run by the worker's own engine, against the best reference
    available in every mode (each prompt and none, normalize on and off), write golden.json, and
    return the parity record for the metadata. ``ParityError`` when any mode's vectors differ."""
    from akidb_embed.models import golden

    metadata = engine.metadata
    source_golden = source.config_dir / GOLDEN_FILE
    stored = golden.read_golden(source_golden) if source_golden.is_file() else None
    default = golden.Mode(None, metadata.normalize)
    checked = [default]
    references = None
    unverified = ""
    if stored is not None:
        sentences, references, label = stored.sentences, [stored.embeddings], stored.reference
        log(f"checking against the reference vectors in {source_golden} ({label})")
    else:
        sentences = list(golden.GOLDEN_SENTENCES)
        if source.reference_dir is None:
            unverified = f"no weights beside the {source.kind} source to compute reference vectors"
        elif importlib.util.find_spec("sentence_transformers") is None:
            unverified = "sentence-transformers is not installed"
        else:
            checked = golden.modes(list(metadata.prompts))
            checked.sort(key=lambda mode: mode != default)  # the default mode first
            log(
                f"computing reference vectors with sentence-transformers ({len(sentences)} "
                f"texts x {len(checked)} modes)"
            )
            references, label = golden.reference_embeddings(
                source.reference_dir, sentences, checked
            )
    counts = golden.token_counts(engine, sentences)
    runtime = {"onnxruntime": importlib.metadata.version("onnxruntime")}
    if references is None:
        log(f"WARNING: vectors not checked ({unverified}); golden.json holds our own vectors")
        label = f"akidb-embed onnxruntime pipeline (unverified: {unverified})"
        record: dict[str, Any] = {"verified": False, "reason": unverified, **runtime}
        default_vectors = engine.embed(sentences, normalize=default.normalize)
    else:
        if stored is not None and stored.token_counts != counts:
            raise ProvisionError(
                f"the tokenizer splits the sentences of {source_golden} differently "
                f"({counts} tokens, the file says {stored.token_counts})"
            )
        figures = []
        for mode, reference in zip(checked, references, strict=True):
            ours = engine.embed(sentences, normalize=mode.normalize, prompt_name=mode.prompt_name)
            try:
                parity = golden.compare(ours, reference, label)
            except ValueError as exc:
                raise ParityError(f"{MODEL_FILE} of the {source.kind} source: {exc}") from None
            if not parity.passes:
                raise ParityError(
                    f"{MODEL_FILE} of the {source.kind} source, {mode.describe()}: "
                    f"{parity.describe()}"
                )
            log(f"parity ({mode.describe()}): {parity.describe()}")
            figures.append({**asdict(mode), **parity.to_json()})
        worst = min(figures, key=lambda figure: figure["min_cosine"])
        record = {
            **{key: worst[key] for key in ("reference", "sentences", "threshold", "verified")},
            "min_cosine": worst["min_cosine"],
            "mean_cosine": min(figure["mean_cosine"] for figure in figures),
            "max_abs_diff": max(figure["max_abs_diff"] for figure in figures),
            "modes": figures,
            **runtime,
        }
        default_vectors = references[0]
    golden.write_golden(
        build / GOLDEN_FILE,
        golden.Golden(
            model=source.model_id,
            dimension=metadata.dimension,
            max_tokens=metadata.max_tokens,
            normalize=metadata.normalize,
            reference=label,
            sentences=list(sentences),
            token_counts=counts,
            embeddings=default_vectors,
        ),
    )
    return record


def _tokenizer_as_loaded(transformer_dir: Path, build: Path) -> Path:
    """The tokenizer.json sentence-transformers would run. transformers (5 and later) rebuilds a
    tokenizer's normaliser and pre-tokenizer from tokenizer_config.json (``do_lower_case``, for
    one), so the shipped tokenizer.json alone can split texts otherwise than sentence-transformers
    does: when transformers is installed, the tokenizer it loads is written out and used; without
    it, the shipped file as it is."""
    shipped = transformer_dir / TOKENIZER_FILE
    if importlib.util.find_spec("transformers") is None:
        return shipped
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(str(transformer_dir), local_files_only=True)
        text = loaded.backend_tokenizer.to_str()
    except Exception as exc:  # transformers raises many unrelated types for unreadable files
        message = f"transformers cannot load the tokenizer of {transformer_dir}: {exc}"
        raise ProvisionError(message) from None
    as_loaded = build / f"{TOKENIZER_FILE}.as-loaded"
    as_loaded.write_text(text, encoding="utf-8")
    return as_loaded


def _build(source: Source, target: Path, build: Path, log: Log) -> None:
    """Fill ``build`` with a complete model directory from ``source`` (metadata last)."""
    try:
        config = read_model_config(source.config_dir)
    except Exception as exc:
        raise ProvisionError(str(exc)) from None
    source_record: dict[str, Any] = {"kind": source.kind, **source.details}
    if source.onnx_path is None:
        from akidb_embed.models.export import ExportError, export_onnx

        log(f"exporting {source.model_id} to ONNX from {source.config_dir} (torch, offline)")
        weights_dir = source.config_dir / config.transformer_dir
        try:
            source_record.update(export_onnx(weights_dir, build / MODEL_FILE))
        except ExportError as exc:
            raise ProvisionError(f"cannot export {weights_dir}: {exc}") from None
    else:
        log(f"copying {source.onnx_path}")
        shutil.copyfile(source.onnx_path, build / MODEL_FILE)
    tokenizer_source = _tokenizer_as_loaded(source.config_dir / config.transformer_dir, build)
    prepare_tokenizer(tokenizer_source, build / TOKENIZER_FILE, config)
    if tokenizer_source.parent == build:
        tokenizer_source.unlink()
    facts = tokenizer_facts(build / TOKENIZER_FILE, config)
    metadata = ModelMetadata(
        directory=build,
        model=source.model_id,
        dimension=config.dimension,
        max_tokens=config.max_tokens,
        pooling=config.pooling,
        normalize=config.normalize,
        files=file_records(build, (MODEL_FILE, TOKENIZER_FILE)),
        include_prompt=config.include_prompt,
        do_lower_case=config.do_lower_case,
        prompts=dict(config.prompts),
        default_prompt_name=config.default_prompt_name,
        prompt_lengths=facts["prompt_lengths"],
        padding_side=config.padding_side,
        pad_token_id=facts["pad_token_id"],
        matryoshka_dimensions=config.matryoshka_dimensions,
    )
    from akidb_embed.worker.config import WorkerConfig
    from akidb_embed.worker.engine import Engine

    try:
        engine = Engine.open(metadata, WorkerConfig(model_dir=build, provider="cpu"))
    except ModelNotFound as exc:
        raise ProvisionError(exc.message) from None
    parity = _golden_and_parity(source, engine, build, log)
    calibration = write_calibration(engine, build, log)
    source_record["akidb_embed"] = akidb_embed.__version__
    metadata = replace(
        metadata,
        directory=target,
        files=file_records(build, (*REQUIRED_FILES, CALIBRATION_FILE)),
        source=source_record,
        parity=parity,
        calibration=calibration,
    )
    write_metadata(metadata, build)


def write_calibration(engine: Engine, directory: Path, log: Log) -> dict[str, Any]:
    """Write ``calibration.npy`` into ``directory``: the pooled, unnormalised vectors of the
    calibration corpus, from which the int8/uint8 ranges of every (dimensions, normalize) are
    taken (encodings.py). Returns the metadata's ``calibration`` record."""
    import numpy as np

    from akidb_embed.bench.corpus import build_corpus, corpus_digest

    texts = build_corpus(CALIBRATION_TEXTS, seed=CALIBRATION_SEED)
    log(f"computing calibration vectors for int8/uint8 ({len(texts)} texts)")
    vectors = engine.embed(texts, normalize=False)
    with (directory / CALIBRATION_FILE).open("wb") as stream:
        np.save(stream, np.ascontiguousarray(vectors, dtype="<f4"), allow_pickle=False)
    return {
        "file": CALIBRATION_FILE,
        "texts": len(texts),
        "corpus": f"akidb_embed.bench.corpus seed {CALIBRATION_SEED}, {corpus_digest(texts)}",
    }


def _calibrate(target: Path, work: Path, log: Log) -> ModelMetadata:
    """Add calibration vectors to the intact directory ``target`` that lacks them: the file is
    written beside it first, then renamed in, then the metadata (listing it) replaced."""
    from akidb_embed.worker.config import WorkerConfig
    from akidb_embed.worker.engine import Engine

    metadata = load_metadata(target)
    engine = Engine.open(metadata, WorkerConfig(model_dir=target, provider="cpu"))
    build = work / f"{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    build.mkdir()
    try:
        calibration = write_calibration(engine, build, log)
        records = {**metadata.files, **file_records(build, (CALIBRATION_FILE,))}
        updated = replace(metadata, files=records, calibration=calibration)
        write_metadata(updated, build)
        os.replace(build / CALIBRATION_FILE, target / CALIBRATION_FILE)
        os.replace(build / METADATA_FILE, target / METADATA_FILE)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return load_metadata(target)


def install_directory(build: Path, target: Path, work: Path) -> None:
    """Put the complete directory ``build`` (in ``work``, on ``target``'s file system) in place
    of ``target``: renamed aside, then ``build`` renamed in, then the old one deleted, so the
    name always holds a whole directory. ``ProvisionError`` when ``target`` holds something
    that is not a model directory of ours."""
    if not _replaceable(target):
        raise ProvisionError(
            f"{target} exists and is not a model directory of akidb-embed; move it away or "
            "provision elsewhere (--model-dir)"
        )
    if target.exists() or target.is_symlink():
        aside = work / f"{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, aside)
        os.replace(build, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(build, target)


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

    Does nothing when it already is one (unless ``force``), but for adding the calibration
    vectors (int8/uint8 ranges) to a directory provisioned before they existed. Otherwise takes
    the model from ``source_dir`` when given, else the hub (when ``allow_hub``, installed and
    online), else the offline export. Raises ``ModelNotFound`` when there is no source (the
    message lists the three ways), ``ParityError`` when the vectors do not match the reference,
    ``ProvisionError`` for anything else that stops it; the previous directory is then left as
    it was.
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
                metadata = load_metadata(target)
                if metadata.calibration:
                    return ProvisionResult(NOTHING_TO_DO, metadata)
                return ProvisionResult(CALIBRATED, _calibrate(target, work, log))
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
            install_directory(build, target, work)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return ProvisionResult(REPLACED if existed else PROVISIONED, load_metadata(target), problems)
