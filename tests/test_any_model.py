"""Any sentence-transformers model, embedded exactly as sentence-transformers embeds it.

Tiny random-weight models of every served kind (``st_fixtures``: BERT with CLS pooling and
Normalize, BERT with max pooling, MPNet with mean pooling and two prompts left out of pooling, a
Qwen3-style decoder with last-token pooling, left padding and an EOS-appending tokenizer) are
provisioned through the real provisioning and served by one real worker through the Python
client; every mode (each prompt and none, normalize on and off) is compared with
``SentenceTransformer(dir).encode`` over a few hundred texts, many longer than the model's
``max_seq_length``. Models the worker cannot serve exactly are refused at provisioning, by name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from st_fixtures import FIXTURE_TEXTS, FIXTURES

from akidb_embed.host_client import EmbeddingClient, InvalidInput
from akidb_embed.models import ModelMetadata
from akidb_embed.models.golden import MIN_COSINE, Mode, modes, reference_embeddings
from akidb_embed.models.sources import UnsupportedModel, read_model_config

SERVED = [name for name, spec in FIXTURES.items() if spec.refused is None]
CLI = (sys.executable, "-m", "akidb_embed.models")


def _cosines(ours: npt.NDArray[np.float32], reference: npt.NDArray[np.float32]) -> np.ndarray:
    ours64, ref64 = ours.astype(np.float64), reference.astype(np.float64)
    norms = np.linalg.norm(ours64, axis=1) * np.linalg.norm(ref64, axis=1)
    return (ours64 * ref64).sum(axis=1) / np.maximum(norms, 1e-30)


@pytest.fixture(scope="module")
def client(tiny_models: dict[str, ModelMetadata]) -> Iterator[EmbeddingClient]:
    """One worker serving every tiny model."""
    directories = [tiny_models[name].directory for name in SERVED]
    with EmbeddingClient(directories, request_timeout=120.0) as client:
        yield client


def test_metadata_states_what_the_sentence_transformers_configs_say(
    tiny_models: dict[str, ModelMetadata],
) -> None:
    for name in SERVED:
        spec, metadata = FIXTURES[name], tiny_models[name]
        assert metadata.model == name
        assert (metadata.pooling, metadata.normalize) == (spec.pooling, spec.normalize), name
        assert (metadata.dimension, metadata.max_tokens) == (spec.dimension, spec.max_seq_length)
        assert {k: v for k, v in metadata.prompts.items() if v} == spec.prompts, name
        assert metadata.default_prompt_name == spec.default_prompt_name, name
        assert metadata.include_prompt is spec.include_prompt, name
        assert metadata.padding_side == spec.padding_side, name
        assert metadata.parity["verified"] is True, name
        checked = {(m["prompt_name"], m["normalize"]) for m in metadata.parity["modes"]}
        assert checked == {(m.prompt_name, m.normalize) for m in modes(list(metadata.prompts))}
        assert metadata.parity["min_cosine"] >= MIN_COSINE, name


def test_models_announce_their_pooling_prompts_and_normalize_default(
    client: EmbeddingClient, tiny_models: dict[str, ModelMetadata]
) -> None:
    announced = {info.model: info for info in client.models()}
    assert list(announced) == SERVED
    for name in SERVED:
        info, metadata = announced[name], tiny_models[name]
        assert (info.dimension, info.max_tokens) == (metadata.dimension, metadata.max_tokens)
        assert (info.pooling, info.normalize_default) == (metadata.pooling, metadata.normalize)
        assert info.prompts == tuple(metadata.prompts)
        assert client.model_info(name) == info


@pytest.mark.parametrize("name", SERVED)
def test_every_mode_matches_sentence_transformers(
    name: str, client: EmbeddingClient, tiny_models: dict[str, ModelMetadata]
) -> None:
    metadata = tiny_models[name]
    checked = modes(list(metadata.prompts))
    source = metadata.source["path"]
    references, _ = reference_embeddings(Path(source), FIXTURE_TEXTS, checked)
    too_long = sum(
        len(ids) > metadata.max_tokens for ids in _whole_token_counts(metadata, FIXTURE_TEXTS)
    )
    assert too_long >= 10, "the texts must include many past max_seq_length"
    for mode, reference in zip(checked, references, strict=True):
        ours = client.embed(FIXTURE_TEXTS, mode.normalize, model=name, prompt_name=mode.prompt_name)
        assert ours.shape == (len(FIXTURE_TEXTS), metadata.dimension)
        cosines = _cosines(ours, reference)
        assert cosines.min() >= MIN_COSINE, f"{name}, {mode.describe()}: {cosines.min()}"
        np.testing.assert_allclose(ours, reference, atol=1e-4, err_msg=mode.describe())


def _whole_token_counts(metadata: ModelMetadata, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(metadata.path("tokenizer.json")))
    return [encoding.ids for encoding in tokenizer.encode_batch(texts)]


def test_normalize_defaults_to_the_model_convention(client: EmbeddingClient) -> None:
    texts = FIXTURE_TEXTS[:20]
    normalized = client.embed(texts, model="bert_cls")  # ends in Normalize
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
    raw = client.embed(texts, model="bert_max")  # no Normalize module
    assert np.abs(np.linalg.norm(raw, axis=1) - 1.0).max() > 0.01
    np.testing.assert_array_equal(raw, client.embed(texts, False, model="bert_max"))


def test_a_prompt_changes_the_vectors_and_an_unknown_one_lists_the_prompts(
    client: EmbeddingClient,
) -> None:
    texts = ["what is a vector database?"]
    plain = client.embed(texts, model="mpnet_prompts")
    query = client.embed(texts, model="mpnet_prompts", prompt_name="query")
    assert not np.allclose(plain, query)
    with pytest.raises(InvalidInput) as raised:
        client.embed(texts, model="mpnet_prompts", prompt_name="nope")
    assert "'query'" in raised.value.message and "'passage'" in raised.value.message
    with pytest.raises(InvalidInput, match="'passage' is not a prompt of bert_max"):
        client.embed(texts, model="bert_max", prompt_name="passage")


def test_decoder_appends_eos_and_pads_on_the_left(tiny_models: dict[str, ModelMetadata]) -> None:
    from tokenizers import Tokenizer

    metadata = tiny_models["qwen3_lasttoken"]
    tokenizer = Tokenizer.from_file(str(metadata.path("tokenizer.json")))
    ids = tokenizer.encode("hello world").ids
    assert ids[-1] == tokenizer.token_to_id("<|endoftext|>")
    assert metadata.padding_side == "left"
    assert metadata.pad_token_id == tokenizer.token_to_id("<|endoftext|>")


def _refused_message(source: Path, target: Path) -> str:
    out = subprocess.run(
        [*CLI, "provision", "--source-dir", str(source), "--model-dir", str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr
    assert not target.exists()
    return out.stderr


def test_a_model_with_a_dense_module_is_refused_naming_it(tmp_path: Path) -> None:
    source = FIXTURES["bert_dense"].build(tmp_path / "dense")
    message = _refused_message(source, tmp_path / "models" / "dense")
    assert "Dense module at '2_Dense'" in message
    with pytest.raises(UnsupportedModel, match="Dense"):
        read_model_config(source)


@pytest.mark.parametrize("mode", ["mean_sqrt_len_tokens", "weightedmean"])
def test_an_unserved_pooling_mode_is_refused_naming_it(
    mode: str, tmp_path: Path, tiny_models: dict[str, ModelMetadata]
) -> None:
    source = tmp_path / "source"
    shutil.copytree(tiny_models["bert_max"].source["path"], source)
    pooling = source / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config["pooling_mode"] = mode
    pooling.write_text(json.dumps(config))
    assert f"pooling mode {mode!r}" in _refused_message(source, tmp_path / "models" / "x")


def test_the_default_mode_is_what_golden_json_holds(tiny_models: dict[str, ModelMetadata]) -> None:
    for name in SERVED:
        metadata = tiny_models[name]
        golden = json.loads(metadata.path("golden.json").read_text(encoding="utf-8"))
        (reference,), _ = reference_embeddings(
            Path(metadata.source["path"]), golden["sentences"], [Mode(None, metadata.normalize)]
        )
        stored = np.asarray(golden["embeddings"], dtype=np.float32)
        assert _cosines(stored, reference).min() >= 0.999999, name
