"""int8 variants behind the quality gate: the gate's figures, a variant written, a refusal.

The command runs for real (``python -m akidb_embed.models quantize``'s ``main``) on a tiny
random-weight BERT of ``st_fixtures`` provisioned through the real provisioning, with its real
recipes (onnxruntime.quantization) and the real gate corpus; only the recipe list is cut to a
few so the test stays short. A tiny model's vectors of standard-library prose are crowded (its
vocabulary knows few of the words), so its neighbours move more than a real model's: the test
that expects a variant uses a lower ``--min-recall``; the gate is the same code either way. The
worker then serves the variant beside its fp32 model. No timing is asserted (speed is printed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from fresh_python import run_python
from st_fixtures import FIXTURE_TEXTS

from akidb_embed.host_client import EmbeddingClient
from akidb_embed.models import (
    METADATA_FILE,
    MODEL_FILE,
    ModelMetadata,
    load_metadata,
    verify_model_dir,
)
from akidb_embed.models.__main__ import main
from akidb_embed.models.gate_corpus import EVALUATION_TEXTS, gate_corpus
from akidb_embed.models.metadata import CALIBRATION_FILE
from akidb_embed.models.quantize import RECIPES as ALL_RECIPES
from akidb_embed.models.quantize import (
    Calibration,
    GraphFacts,
    column_scales,
    gate_figures,
    gptq_codes,
    graph_facts,
    input_hessians,
    open_candidate,
    per_token_int8,
    round_to_nearest,
    smooth_activations,
    split_outlier_channels,
    variant_model_id,
)
from akidb_embed.worker.config import WorkerConfig
from akidb_embed.worker.engine import Engine

TINY = "bert_cls"
RECIPES = "dynamic-weights,blockwise-32-fp32-last-layer"
MIXED = "smoothquant-per-token-blockwise-ffn-output"
GPTQ = "gptq-per-token"
OUTLIERS = "gptq-per-token-8-outliers"
TINY_MIN_RECALL = "0.75"
"""Below what both recipes reach on the tiny model (0.85-0.92 measured), far above chance."""


def quantize_command(model_dir: Path, out: Path, *options: str) -> int:
    """``python -m akidb_embed.models quantize`` in this process; its exit code."""
    return main(["quantize", "--model-dir", str(model_dir), "--out", str(out), *options])


@pytest.fixture(scope="module")
def fp32(tiny_models: dict[str, ModelMetadata]) -> ModelMetadata:
    return tiny_models[TINY]


@pytest.fixture(scope="module")
def variant(fp32: ModelMetadata, tmp_path_factory: pytest.TempPathFactory) -> ModelMetadata:
    out = tmp_path_factory.mktemp("variants") / f"{TINY}-int8"
    code = quantize_command(
        fp32.directory, out, "--recipes", RECIPES, "--min-recall", TINY_MIN_RECALL
    )
    assert code == 0
    return load_metadata(out)


def test_the_gate_corpus_is_real_text_and_calibrates_apart_from_what_it_judges() -> None:
    corpus = gate_corpus()
    assert len(corpus.evaluation) == EVALUATION_TEXTS >= 2000
    assert len(set(corpus.evaluation)) == len(corpus.evaluation)
    assert not set(corpus.evaluation) & set(corpus.calibration)
    assert gate_corpus().evaluation_digest == corpus.evaluation_digest


def test_the_shipped_gate_corpus_is_the_draw_of_a_fresh_interpreter() -> None:
    """The file is the standard library's docstrings drawn by ``draw_from_docstrings`` in a
    fresh interpreter of the project's Python (3.11), text for text; this test process has
    imported much more (typing_extensions among it), and reads the same file."""
    drawn = run_python(
        "from akidb_embed.models.gate_corpus import draw_from_docstrings",
        "corpus = draw_from_docstrings()",
        "print(corpus.evaluation_digest, corpus.calibration_digest)",
        timeout=120,
    )
    assert drawn.returncode == 0, drawn.stderr
    shipped = gate_corpus()
    assert drawn.stdout.split() == [shipped.evaluation_digest, shipped.calibration_digest]


def test_gate_figures_see_moved_neighbours_that_cosines_hide() -> None:
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(200, 16)).astype(np.float32)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert gate_figures(reference, reference.copy(), 10) == pytest.approx((1.0, 1.0, 1.0))
    noisy = reference + rng.normal(scale=0.08, size=reference.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    recall, min_cosine, _ = gate_figures(reference, noisy, 10)
    assert min_cosine > 0.9
    assert recall < 0.95


@pytest.fixture(scope="module")
def fp32_engine(fp32: ModelMetadata) -> Engine:
    return Engine.load(WorkerConfig(provider="cpu"), fp32.directory)


def test_smoothing_moves_activation_range_into_the_weights_and_keeps_the_fp32_vectors(
    fp32: ModelMetadata, fp32_engine: Engine, tmp_path: Path
) -> None:
    engine, texts, facts = fp32_engine, FIXTURE_TEXTS[:48], graph_facts(fp32.path(MODEL_FILE))
    calibration = Calibration.of(engine, FIXTURE_TEXTS[48:96])
    smooth_activations(fp32.path(MODEL_FILE), tmp_path / MODEL_FILE, facts, calibration, 0.5)
    smoothed = open_candidate(fp32, tmp_path)
    assert (tmp_path / MODEL_FILE).read_bytes() != fp32.path(MODEL_FILE).read_bytes()
    ours, theirs = smoothed.embed(texts, normalize=True), engine.embed(texts, normalize=True)
    assert np.sum(ours.astype(np.float64) * theirs, axis=1).min() >= 0.99999


def test_per_token_int8_runs_every_weight_matmul_on_int8_codes_near_the_fp32_vectors(
    fp32: ModelMetadata, fp32_engine: Engine, tmp_path: Path
) -> None:
    import onnx

    engine, facts = fp32_engine, graph_facts(fp32.path(MODEL_FILE))
    per_token_int8(fp32.path(MODEL_FILE), tmp_path / MODEL_FILE, facts)
    ops = [node.op_type for node in onnx.load(str(tmp_path / MODEL_FILE)).graph.node]
    assert ops.count("MatMulInteger") == len(facts.weight_matmuls) > 0
    assert ops.count("MatMul") == len(facts.activation_matmuls)
    cosines = cosines_to_fp32(fp32, engine, tmp_path)
    assert 0.98 <= cosines.min() < 1 - 1e-7  # rounded, so never exact


def test_gptq_codes_move_each_projection_less_than_round_to_nearest_on_calibration_inputs(
    fp32: ModelMetadata, fp32_engine: Engine
) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32.path(MODEL_FILE)))
    facts = graph_facts(fp32.path(MODEL_FILE))
    hessians = input_hessians(model, facts, Calibration.of(fp32_engine, FIXTURE_TEXTS[48:96]))
    weights = {initializer.name: initializer for initializer in model.graph.initializer}
    matmuls = [node for node in model.graph.node if node.name in facts.weight_matmuls]
    assert {node.input[0] for node in matmuls} == set(hessians)
    for node in matmuls:
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        hessian = hessians[node.input[0]]
        ours, theirs = gptq_codes(weight, hessian), round_to_nearest(node.input[0], weight)
        np.testing.assert_array_equal(ours[1], column_scales(weight))  # the same grid
        assert np.abs(ours[0].astype(np.int16)).max() <= 127
        assert output_error(weight, hessian, *ours) < output_error(weight, hessian, *theirs)


def output_error(
    weight: npt.NDArray[np.float32],
    hessian: npt.NDArray[np.float64],
    codes: npt.NDArray[np.int8],
    scale: npt.NDArray[np.float32],
) -> float:
    """Sum over the calibration tokens of ``|x @ (weight - codes * scale)|^2``."""
    moved = (weight - codes * scale).astype(np.float64)
    return float(np.trace(moved.T @ hessian @ moved))


def built_recipe(
    name: str, fp32: ModelMetadata, engine: Engine, directory: Path
) -> tuple[GraphFacts, list[str]]:
    """Build the recipe ``name`` of ``fp32`` into ``directory``: the graph's facts and the op
    types of the built graph."""
    import onnx

    recipe = next(r for r in ALL_RECIPES if r.name == name)
    facts = graph_facts(fp32.path(MODEL_FILE))
    calibration = Calibration.of(engine, FIXTURE_TEXTS[48:96])
    recipe.build(fp32.path(MODEL_FILE), directory / MODEL_FILE, facts, calibration)
    return facts, [node.op_type for node in onnx.load(str(directory / MODEL_FILE)).graph.node]


def cosines_to_fp32(fp32: ModelMetadata, engine: Engine, directory: Path) -> npt.NDArray[Any]:
    """Each text's cosine between the vectors of the graph in ``directory`` and fp32's."""
    texts = FIXTURE_TEXTS[:48]
    ours = open_candidate(fp32, directory).embed(texts, normalize=True)
    theirs = engine.embed(texts, normalize=True)
    return np.sum(ours.astype(np.float64) * theirs, axis=1)


def test_splitting_outlier_channels_off_keeps_the_fp32_vectors(
    fp32: ModelMetadata, fp32_engine: Engine, tmp_path: Path
) -> None:
    import onnx
    from onnx import numpy_helper

    facts = graph_facts(fp32.path(MODEL_FILE))
    calibration = Calibration.of(fp32_engine, FIXTURE_TEXTS[48:96])
    split_outlier_channels(fp32.path(MODEL_FILE), tmp_path / MODEL_FILE, facts, calibration, 4)
    model = onnx.load(str(tmp_path / MODEL_FILE))
    ops = [node.op_type for node in model.graph.node]
    inputs = {node.input[0] for node in model.graph.node if node.name in facts.weight_matmuls}
    assert ops.count("Gather") >= len(inputs) > 0  # the outlier channels of each input, once
    outlier_matmuls = [node for node in model.graph.node if node.name.endswith("/outliers")]
    assert len(outlier_matmuls) == len(facts.weight_matmuls)
    for node in outlier_matmuls:
        rows = next(i for i in model.graph.initializer if i.name == node.input[1])
        assert numpy_helper.to_array(rows).shape[0] == 4
    assert cosines_to_fp32(fp32, fp32_engine, tmp_path).min() >= 0.99999  # exact in fp32


@pytest.mark.parametrize(("recipe", "fp32_per_projection"), [(GPTQ, 0), (OUTLIERS, 1)])
def test_gptq_per_token_recipes_run_int8_codes_on_asymmetric_activations_near_fp32(
    fp32: ModelMetadata, fp32_engine: Engine, tmp_path: Path, recipe: str, fp32_per_projection: int
) -> None:
    """Every weight MatMul on ``MatMulInteger`` over each input's own min-max; with outlier
    channels, one fp32 MatMul beside each for them."""
    facts, ops = built_recipe(recipe, fp32, fp32_engine, tmp_path)
    weight_matmuls = len(facts.weight_matmuls)
    assert ops.count("MatMulInteger") == weight_matmuls > 0
    fp32_matmuls = len(facts.activation_matmuls) + fp32_per_projection * weight_matmuls
    assert ops.count("MatMul") == fp32_matmuls
    assert ops.count("ReduceMin") == ops.count("ReduceMax") > 0  # each input's own min-max
    assert not list(tmp_path.glob("smoothed-*")) and not list(tmp_path.glob("split-*"))
    assert 0.98 <= cosines_to_fp32(fp32, fp32_engine, tmp_path).min() < 1 - 1e-7


def test_per_token_beside_blockwise_puts_the_feed_forward_outputs_on_block_scales(
    fp32: ModelMetadata, fp32_engine: Engine, tmp_path: Path
) -> None:
    facts, ops = built_recipe(MIXED, fp32, fp32_engine, tmp_path)
    blockwise = len(facts.feed_forward_outputs)
    assert ops.count("MatMulNBits") == blockwise > 0
    assert ops.count("MatMulInteger") == len(facts.weight_matmuls) - blockwise > 0
    assert ops.count("MatMul") == len(facts.activation_matmuls)
    assert not list(tmp_path.glob("per-token-*"))  # the intermediate graph is removed
    assert cosines_to_fp32(fp32, fp32_engine, tmp_path).min() >= 0.98


def test_a_variant_passing_the_gate_is_a_model_directory_that_says_where_it_came_from(
    fp32: ModelMetadata, variant: ModelMetadata
) -> None:
    assert verify_model_dir(variant.directory) == []
    assert variant.model == variant_model_id(fp32.model) == f"{TINY}@int8"
    assert (variant.variant, variant.base_model) == ("int8", fp32.model)
    record = variant.quantization
    assert record["base"]["model.onnx sha256"] == fp32.files[MODEL_FILE].sha256
    assert record["gate"] == {"min_recall": 0.75, "min_cosine": 0.98, "neighbours": 10}
    assert record["corpus"]["evaluation_texts"] == EVALUATION_TEXTS
    rows = {row["recipe"]: row for row in record["table"]}
    assert set(rows) == set(RECIPES.split(","))
    passing = [r for r in rows.values() if r["recall"] >= 0.75 and r["min_cosine"] >= 0.98]
    assert record["recipe"] == max(passing, key=lambda r: r["speedup"])["recipe"]
    assert record["recall"] >= 0.75
    assert record["min_cosine"] >= 0.98
    assert variant.files[MODEL_FILE].sha256 != fp32.files[MODEL_FILE].sha256
    assert variant.parity["threshold"] == 0.98
    assert variant.parity["min_cosine"] >= 0.98
    assert variant.parity["min_cosine"] < fp32.parity["min_cosine"]
    assert (variant.dimension, variant.pooling) == (fp32.dimension, fp32.pooling)


def test_a_variant_serves_int8_codes_over_calibration_vectors_of_its_own(
    fp32: ModelMetadata, variant: ModelMetadata
) -> None:
    assert CALIBRATION_FILE in variant.files
    engine = Engine.load(WorkerConfig(provider="cpu"), variant.directory)
    assert {"int8", "uint8"} <= set(engine.encodings)
    form = engine.output_form(None, True, "int8")
    assert form.ranges is not None
    assert form.ranges.shape == (2, variant.dimension)
    ours = np.load(variant.path(CALIBRATION_FILE))
    theirs = np.load(fp32.path(CALIBRATION_FILE))
    assert ours.shape == theirs.shape
    assert not np.array_equal(ours, theirs)  # the variant's vectors, not the fp32 model's


def test_quantising_again_finds_nothing_to_do(
    fp32: ModelMetadata, variant: ModelMetadata, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (variant.directory / METADATA_FILE).read_bytes()
    code = quantize_command(
        fp32.directory, variant.directory, "--recipes", RECIPES, "--min-recall", TINY_MIN_RECALL
    )
    assert code == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (variant.directory / METADATA_FILE).read_bytes() == before


def test_no_recipe_passing_writes_nothing_and_prints_the_table(
    fp32: ModelMetadata, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "refused"
    code = quantize_command(fp32.directory, out, "--recipes", RECIPES, "--min-cosine", "1.01")
    captured = capsys.readouterr()
    assert code == 1
    assert not out.exists()
    assert "no recipe keeps the neighbours" in captured.err
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["recipe", "recall@10", "min"]
    for name in RECIPES.split(","):
        (row,) = [line for line in lines if line.startswith(name + " ")]
        assert row.rstrip().endswith("fail")


def test_an_unknown_recipe_is_refused_naming_the_recipes(
    fp32: ModelMetadata, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = quantize_command(fp32.directory, tmp_path / "x", "--recipes", "dynamic-weights,fp4")
    assert code == 1
    err = capsys.readouterr().err
    assert "unknown recipe fp4" in err
    assert "blockwise-32" in err


def test_a_variant_cannot_be_quantised_again(
    variant: ModelMetadata, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = quantize_command(variant.directory, tmp_path / "x")
    assert code == 1
    assert "already a variant" in capsys.readouterr().err


def test_the_fp32_directory_is_never_the_output(
    fp32: ModelMetadata, capsys: pytest.CaptureFixture[str]
) -> None:
    before = fp32.path(MODEL_FILE).stat().st_mtime_ns
    assert quantize_command(fp32.directory, fp32.directory) == 1
    assert "the fp32 model's own directory" in capsys.readouterr().err
    assert fp32.path(MODEL_FILE).stat().st_mtime_ns == before


def test_the_worker_serves_the_variant_beside_its_fp32_model(
    fp32: ModelMetadata, variant: ModelMetadata
) -> None:
    texts = FIXTURE_TEXTS[:64]
    with EmbeddingClient([fp32.directory, variant.directory]) as client:
        models = {info.model: info for info in client.models()}
        assert (models[fp32.model].variant, models[fp32.model].base_model) == (None, None)
        served = models[variant.model]
        assert (served.variant, served.base_model) == ("int8", fp32.model)
        assert served.dimension == fp32.dimension
        ours = client.embed(texts, model=variant.model, normalize=True)
        theirs = client.embed(texts, model=fp32.model, normalize=True)
    cosines = np.sum(ours.astype(np.float64) * theirs, axis=1)
    assert cosines.min() >= 0.98
    assert not np.array_equal(ours, theirs)


def test_the_variant_metadata_is_plain_json_with_the_recipe_table(
    variant: ModelMetadata,
) -> None:
    raw = json.loads((variant.directory / METADATA_FILE).read_text(encoding="utf-8"))
    assert raw["variant"] == "int8"
    assert {"recipe", "recall", "min_cosine", "texts_per_second", "fp32_texts_per_second"} <= set(
        raw["quantization"]["table"][0]
    )
