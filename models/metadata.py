"""Model directories: where they live and the metadata file that states their facts.

A model directory holds ``model.onnx``, ``tokenizer.json``, ``golden.json`` (reference vectors
from the exporting framework) and ``akidb-embed.json``, the metadata written by provisioning::

    {"format": 1,
     "model": "sentence-transformers/all-MiniLM-L6-v2",
     "dimension": 384, "max_tokens": 256, "pooling": "mean", "normalize": true,
     "files": {"model.onnx": {"sha256": "...", "bytes": 90405214}, ...},
     "source": {...how the files were obtained...},
     "parity": {...figures of the export check...}}

The worker and the host clients read every model fact from this file (never from literals).
Reading it imports neither onnxruntime nor tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from akidb_embed.errors import ModelNotFound

__all__ = [
    "DEFAULT_MODEL_NAME",
    "METADATA_FILE",
    "MODEL_DIR_ENV",
    "FileRecord",
    "ModelMetadata",
    "default_model_dir",
    "file_sha256",
    "load_metadata",
]

METADATA_FILE = "akidb-embed.json"
METADATA_FORMAT = 1
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_DIR_ENV = "AKIDB_EMBED_MODEL_DIR"
"""Environment variable naming the model directory; overrides every default location."""


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int


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

    def path(self, name: str) -> Path:
        return self.directory / name

    def to_json(self) -> dict[str, Any]:
        return {
            "format": METADATA_FORMAT,
            "model": self.model,
            "dimension": self.dimension,
            "max_tokens": self.max_tokens,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "files": {
                name: {"sha256": r.sha256, "bytes": r.bytes} for name, r in self.files.items()
            },
            "source": self.source,
            "parity": self.parity,
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
    """Where the default model lives: ``$AKIDB_EMBED_MODEL_DIR``, else ``models/<name>`` of the
    checkout this package runs from, else the per-user cache directory."""
    override = os.environ.get(MODEL_DIR_ENV)
    if override:
        return Path(override).expanduser()
    checkout = _checkout_models_folder()
    return (checkout if checkout is not None else _user_cache_folder()) / name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_metadata(directory: Path | str | None = None) -> ModelMetadata:
    """The metadata of ``directory`` (default: ``default_model_dir()``), or ``ModelNotFound``
    saying what is missing and how to provision a model."""
    model_dir = Path(directory).expanduser() if directory is not None else default_model_dir()
    meta_path = model_dir / METADATA_FILE
    if not meta_path.is_file():
        raise ModelNotFound(
            f"no model at {model_dir} ({METADATA_FILE} missing): run `make models` in a checkout "
            f"or `python -m akidb_embed.models provision`, or set {MODEL_DIR_ENV}"
        )
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
        if raw.get("format") != METADATA_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {METADATA_FORMAT}")
        return ModelMetadata(
            directory=model_dir,
            model=str(raw["model"]),
            dimension=int(raw["dimension"]),
            max_tokens=int(raw["max_tokens"]),
            pooling=str(raw["pooling"]),
            normalize=bool(raw["normalize"]),
            files={
                name: FileRecord(sha256=str(r["sha256"]), bytes=int(r["bytes"]))
                for name, r in raw["files"].items()
            },
            source=dict(raw.get("source") or {}),
            parity=dict(raw.get("parity") or {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelNotFound(f"unreadable {meta_path}: {exc}") from None
