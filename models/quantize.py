"""int8 variants of a model directory, kept only when they keep the fp32 model's neighbours.

::

    fp32 model directory (model.onnx, tokenizer.json, golden.json, akidb-embed.json)
       |
       +-- each RECIPE (onnxruntime.quantization: dynamic per-channel, static QDQ calibrated
       |   on the gate corpus' calibration texts, block-wise MatMulNBits, SmoothQuant then
       |   dynamic, per-token activation scales, weights rounded by GPTQ on the calibration
       |   texts' inputs; some leave sensitive nodes in fp32 or block-wise, or each input's
       |   outlier channels in fp32 beside the int8 product)
       |   --> candidate model.onnx
       |
       v   the worker's own Engine runs the gate corpus' evaluation texts (gate_corpus.py)
    fp32 vectors   vs   candidate vectors
       |  recall@10 of corpus neighbours (each text's ten nearest among the evaluation texts,
       |  by the candidate's vectors, found among the fp32 ten), min cosine per text, and bulk
       |  texts/s in-process, fp32 and candidate measured alternately on the same cores
       v
    the fastest candidate passing the gate (recall@10 >= 0.98 and min cosine >= 0.98)
       +--> <out>/ : a model directory like any other, id "<fp32 id>@int8"; its metadata
       |    records the recipe, the gate's figures and every recipe's row, the fp32 model it
       |    came from (id and model.onnx sha256) and the checksums of its own files, among
       |    them calibration.npy: its own vectors, whence its int8/uint8 encodings' ranges
       +--> none passes: nothing is written; QuantizeRefused carries the table

A recipe that onnxruntime cannot apply to a graph is a row with its error, never a crash.
Quantising imports ``onnx`` (the ``export`` extra) and, for the block-wise recipes, ``onnx_ir``
(also in it); the worker serving a variant needs neither.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from akidb_embed.models.gate_corpus import DEFAULT_GATE, Gate, GateCorpus, gate_corpus
from akidb_embed.models.metadata import (
    CALIBRATION_FILE,
    GOLDEN_FILE,
    INT8,
    MODEL_FILE,
    REQUIRED_FILES,
    TOKENIZER_FILE,
    ModelMetadata,
    file_records,
    load_metadata,
    open_model_dir,
    verify_model_dir,
    write_metadata,
)
from akidb_embed.models.provision import (
    WORK_FOLDER,
    ProvisionError,
    install_directory,
    write_calibration,
)

if TYPE_CHECKING:
    from akidb_embed.worker.engine import Engine

__all__ = [
    "DEFAULT_GATE",
    "INT8",
    "RECIPES",
    "Calibration",
    "Codes",
    "Gate",
    "GraphFacts",
    "Measurement",
    "QuantizeRefused",
    "QuantizeResult",
    "Recipe",
    "WeightCodes",
    "column_scales",
    "format_table",
    "gate_figures",
    "gptq_codes",
    "gptq_rounding",
    "graph_facts",
    "input_hessians",
    "open_candidate",
    "per_token_int8",
    "quantize",
    "round_to_nearest",
    "smooth_activations",
    "split_outlier_channels",
    "variant_model_id",
]

SPEED_TEXTS = 512
"""Evaluation texts run for the speed figures (each model, each round)."""
SPEED_ROUNDS = 2
"""Alternating fp32/candidate rounds; each model's best round is its speed."""

Log = Callable[[str], None]


class QuantizeRefused(ProvisionError):
    """No recipe passes the gate: nothing was written; ``table`` holds every recipe's row."""

    def __init__(self, message: str, table: list[Measurement]) -> None:
        super().__init__(message)
        self.table = table


@dataclass(frozen=True)
class Measurement:
    """One recipe's row of the table: its gate figures and speed against fp32, or its error."""

    recipe: str
    recall: float = float("nan")
    min_cosine: float = float("nan")
    mean_cosine: float = float("nan")
    texts_per_second: float = float("nan")
    fp32_texts_per_second: float = float("nan")
    error: str | None = None

    @property
    def speedup(self) -> float:
        return self.texts_per_second / self.fp32_texts_per_second

    def passes(self, gate: Gate) -> bool:
        return (
            self.error is None
            and self.recall >= gate.min_recall
            and self.min_cosine >= gate.min_cosine
        )

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        if self.error is None:
            row["speedup"] = self.speedup
        return {name: value for name, value in row.items() if value == value}  # drop NaN


@dataclass(frozen=True)
class GraphFacts:
    """The nodes of a transformer graph that the recipes quantise or leave in fp32."""

    weight_matmuls: list[str]
    """MatMuls with a weight (an initializer): projections and feed-forward layers."""
    activation_matmuls: list[str]
    """MatMuls of two activations: attention scores (Q.K^T) and softmax times values."""
    last_layer: list[str]
    """The weight MatMuls of the last encoder layer (from the node names), feeding pooling."""
    feed_forward_outputs: list[str]
    """The feed-forward output projections (their input, the GELU's output, has long tails);
    found by the names BERT-like exports give them."""


@dataclass(frozen=True)
class Recipe:
    """One way to quantise: ``build(fp32 path, output path, graph facts, calibration)``."""

    name: str
    description: str
    build: Callable[[Path, Path, GraphFacts, Calibration], None]
    only_without_vnni: bool = False
    """Only tried on a CPU without VNNI, where the full int8 range can overflow."""


_LAYER = re.compile(r"layers?[._/](\d+)[._/]")


def graph_facts(onnx_path: Path) -> GraphFacts:
    """Read the node lists the recipes need from ``onnx_path`` (weights not loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = {initializer.name for initializer in model.graph.initializer}
    weight_matmuls, activation_matmuls, layer_of = [], [], {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        if any(name in weights for name in node.input):
            weight_matmuls.append(node.name)
            match = _LAYER.search(node.name)
            if match:
                layer_of[node.name] = int(match.group(1))
        else:
            activation_matmuls.append(node.name)
    last = max(layer_of.values(), default=None)
    # BERT and MPNet exports name it <layer>/output/dense; the attention block has its own
    # <layer>/attention/output/dense
    feed_forward = [
        name for name in weight_matmuls if "output/dense" in name and "attention" not in name
    ]
    return GraphFacts(
        weight_matmuls=weight_matmuls,
        activation_matmuls=activation_matmuls,
        last_layer=[name for name, layer in layer_of.items() if layer == last],
        feed_forward_outputs=feed_forward,
    )


@dataclass(frozen=True)
class Calibration:
    """The inputs a static recipe calibrates its activation ranges on (batches of feeds)."""

    feeds: list[dict[str, npt.NDArray[np.int64]]]

    @classmethod
    def of(cls, engine: Engine, texts: Sequence[str], batch: int = 16) -> Calibration:
        """``texts`` tokenised and padded by ``engine`` as it runs them, ``batch`` a run."""
        token_ids = engine.tokenize(texts)
        return cls([engine.feeds(token_ids[i : i + batch]) for i in range(0, len(texts), batch)])


def _dynamic(
    *,
    op_types: Sequence[str] | None = None,
    weights_only: bool = False,
    keep: Callable[[GraphFacts], Sequence[str]] = lambda facts: (),
    reduce_range: bool = False,
) -> Callable[[Path, Path, GraphFacts, Calibration], None]:
    def build(source: Path, target: Path, facts: GraphFacts, calibration: Calibration) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]

        kept = set(keep(facts))
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_quantize=[n for n in facts.weight_matmuls if n not in kept]
            if weights_only
            else None,
            nodes_to_exclude=sorted(kept) or None,
            per_channel=True,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
        )

    return build


def _static_qdq(
    keep: Callable[[GraphFacts], Sequence[str]] = lambda facts: (),
) -> Callable[[Path, Path, GraphFacts, Calibration], None]:
    def build(source: Path, target: Path, facts: GraphFacts, calibration: Calibration) -> None:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self._feeds = iter(calibration.feeds)

            def get_next(self) -> dict[str, npt.NDArray[np.int64]] | None:
                return next(self._feeds, None)

        kept = set(keep(facts))
        quantize_static(
            source,
            target,
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=[n for n in facts.weight_matmuls if n not in kept],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )

    return build


def _blockwise(
    block_size: int, keep: Callable[[GraphFacts], Sequence[str]] = lambda facts: ()
) -> Callable[[Path, Path, GraphFacts, Calibration], None]:
    def build(source: Path, target: Path, facts: GraphFacts, calibration: Calibration) -> None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (  # type: ignore[import-untyped]
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        # accuracy level 4: the activations are quantised to int8 per block of the same size
        # as the weights' blocks, so the product runs on int8 kernels (VNNI where there is one)
        config = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8
        )
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(source)),
            nodes_to_exclude=list(keep(facts)),
            algo_config=config,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), False)

    return build


def _weight_inputs(model: Any, facts: GraphFacts) -> dict[str, list[Any]]:
    """The activations that weight MatMuls read, each with the MatMul nodes reading it (the
    query, key and value projections share theirs)."""
    weights = {initializer.name for initializer in model.graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.name in facts.weight_matmuls and node.input[1] in weights:
            readers.setdefault(node.input[0], []).append(node)
    return readers


def _probe(
    model: Any, names: Sequence[str], calibration: Calibration
) -> Iterator[tuple[str, npt.NDArray[np.float32], npt.NDArray[np.bool_]]]:
    """The values of the activations ``names`` in ``model`` (an ONNX ModelProto, left as it
    is) on each calibration batch, with the batch's attention mask (True on real tokens)."""
    import onnx
    import onnxruntime as ort  # type: ignore[import-untyped]
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in calibration.feeds:
        mask = feed["attention_mask"].astype(bool)
        for name, value in zip(names, session.run(list(names), feed), strict=True):
            yield name, value, mask


def smooth_activations(
    source: Path, target: Path, facts: GraphFacts, calibration: Calibration, alpha: float
) -> None:
    """SmoothQuant (Xiao et al., 2023) on an ONNX graph: the input of each weight MatMul is
    divided per channel by ``s`` (a Mul node, shared by the MatMuls reading the same tensor)
    and the weight's rows multiplied by it, so the fp32 product is unchanged while the
    activations' outlier channels, which per-tensor int8 activations cannot resolve, move into
    the weights, which are quantised per channel. ``s = max|x|^alpha / max|w|^(1 - alpha)``,
    with ``max|x|`` per channel over the calibration texts."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    weights = {initializer.name: initializer for initializer in model.graph.initializer}
    readers = _weight_inputs(model, facts)
    maxima: dict[str, npt.NDArray[np.float32]] = {}
    for name, value, _ in _probe(model, list(readers), calibration):
        channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
        maxima[name] = np.maximum(maxima.get(name, channel_max), channel_max)
    position = {id(node): index for index, node in enumerate(model.graph.node)}
    inserts = []
    for name, nodes in readers.items():
        matrices = [numpy_helper.to_array(weights[node.input[1]]) for node in nodes]
        weight_max = np.max([np.abs(matrix).max(axis=1) for matrix in matrices], axis=0)
        scale = maxima[name] ** alpha / np.maximum(weight_max, 1e-8) ** (1 - alpha)
        scale = np.clip(scale, 1e-5, None).astype(np.float32)
        for node, matrix in zip(nodes, matrices, strict=True):
            scaled = (matrix * scale[:, None]).astype(np.float32)
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(scaled, node.input[1]))
        divisor = f"{name}/smooth_scale"
        model.graph.initializer.append(numpy_helper.from_array(1.0 / scale, divisor))
        smoothed = f"{name}/smoothed"
        mul = helper.make_node("Mul", [name, divisor], [smoothed], name=f"{name}/smooth")
        for node in nodes:
            node.input[0] = smoothed
        inserts.append((min(position[id(node)] for node in nodes), mul))
    for index, mul in sorted(inserts, key=lambda item: -item[0]):
        model.graph.node.insert(index, mul)
    onnx.save(model, str(target))


@contextlib.contextmanager
def _stage(
    source: Path, target: Path, name: str, make: Callable[[Path, Path], None] | None
) -> Iterator[Path]:
    """The graph ``make(source, stage)`` writes beside ``target`` (``<name>-<target's name>``,
    removed after), or ``source`` itself when there is nothing to make."""
    if make is None:
        yield source
        return
    stage = target.with_name(f"{name}-{target.name}")
    make(source, stage)
    try:
        yield stage
    finally:
        stage.unlink()


def _smoothed(
    source: Path, target: Path, facts: GraphFacts, calibration: Calibration, alpha: float | None
) -> contextlib.AbstractContextManager[Path]:
    """``source`` after SmoothQuant with ``alpha`` (None: ``source`` itself), while in use."""

    def make(graph: Path, stage: Path) -> None:
        assert alpha is not None
        smooth_activations(graph, stage, facts, calibration, alpha)

    return _stage(source, target, "smoothed", None if alpha is None else make)


def split_outlier_channels(
    source: Path, target: Path, facts: GraphFacts, calibration: Calibration, channels: int
) -> None:
    """The ``channels`` input channels of each weight MatMul ``x @ W`` that reach the largest
    ``|x|`` over the calibration texts' real tokens leave the int8 product and go through an
    fp32 MatMul of their own (the decomposition of LLM.int8(), Dettmers et al., 2022, with the
    channels fixed here)::

        y = (x * inliers) @ W_inliers  +  x[..., outliers] @ W[outliers]
             int8 by a later recipe        fp32: [tokens, channels] @ [channels, outputs]

    ``W_inliers`` is ``W`` with the outlier rows zeroed, so the sum is exact in fp32. A
    token's int8 scale is then set by its inlier channels, no longer by the few channels
    whose range dwarfs theirs; the extra work is a Gather, a Mul and a MatMul of
    ``channels`` inputs per activation and weight. The MatMuls reading the same activation
    share its channels. The outlier MatMuls are named ``<node>/outliers``, so they are not
    among ``facts.weight_matmuls`` and stay fp32."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    weights = {initializer.name: initializer for initializer in model.graph.initializer}
    readers = _weight_inputs(model, facts)
    reach: dict[str, npt.NDArray[np.float32]] = {}
    for name, value, mask in _probe(model, list(readers), calibration):
        rows = value[mask] if value.ndim == 3 else value.reshape(-1, value.shape[-1])
        channel_max = np.abs(rows).max(axis=0)
        reach[name] = np.maximum(reach.get(name, channel_max), channel_max)
    split: dict[str, list[Any]] = {}  # activation -> the nodes that compute its two parts
    nodes = []
    for node in model.graph.node:
        x = node.input[0] if node.input else ""
        if x not in readers or node not in readers[x]:
            nodes.append(node)
            continue
        outliers = np.sort(np.argsort(-reach[x], kind="stable")[:channels]).astype(np.int64)
        if x not in split:
            inliers = np.ones(len(reach[x]), np.float32)
            inliers[outliers] = 0.0
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(outliers, f"{x}/outlier_channels"),
                    numpy_helper.from_array(inliers, f"{x}/inlier_mask"),
                ]
            )
            split[x] = [
                helper.make_node(
                    "Gather", [x, f"{x}/outlier_channels"], [f"{x}/outliers"], axis=-1
                ),
                helper.make_node("Mul", [x, f"{x}/inlier_mask"], [f"{x}/inliers"]),
            ]
            nodes += split[x]
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        outlier_rows = weight[outliers]
        weight[outliers] = 0.0
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
        model.graph.initializer.append(
            numpy_helper.from_array(outlier_rows, f"{node.name}/outlier_rows")
        )
        output = node.output[0]
        node.input[0], node.output[0] = f"{x}/inliers", f"{output}/inlier_part"
        nodes += [
            node,
            helper.make_node(
                "MatMul",
                [f"{x}/outliers", f"{node.name}/outlier_rows"],
                [f"{output}/outlier_part"],
                name=f"{node.name}/outliers",
            ),
            helper.make_node("Add", [f"{output}/inlier_part", f"{output}/outlier_part"], [output]),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(target))


def _split(
    source: Path, target: Path, facts: GraphFacts, calibration: Calibration, channels: int
) -> contextlib.AbstractContextManager[Path]:
    """``source`` with ``channels`` outlier channels split off (0: ``source`` itself), while in
    use."""

    def make(graph: Path, stage: Path) -> None:
        split_outlier_channels(graph, stage, facts, calibration, channels)

    return _stage(source, target, "split", make if channels else None)


def _smoothed_dynamic(alpha: float) -> Callable[[Path, Path, GraphFacts, Calibration], None]:
    weights_only = _dynamic(op_types=["MatMul"], weights_only=True)

    def build(source: Path, target: Path, facts: GraphFacts, calibration: Calibration) -> None:
        with _smoothed(source, target, facts, calibration, alpha) as smoothed:
            weights_only(smoothed, target, facts, calibration)

    return build


Codes = tuple["npt.NDArray[np.int8]", "npt.NDArray[np.float32]"]
"""A weight's int8 codes and its columns' scales."""
WeightCodes = Callable[[str, "npt.NDArray[np.float32]"], Codes]
"""How a weight ``W`` ([inputs, outputs]) of a MatMul reading the named activation becomes
int8: its codes and one scale per output column, ``W ~ codes * scale``."""


def column_scales(weight: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """One symmetric int8 scale per output column of ``weight``: its max |w| / 127."""
    scale: npt.NDArray[np.float32] = (np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127).astype(
        np.float32
    )
    return scale


def round_to_nearest(activation: str, weight: npt.NDArray[np.float32]) -> Codes:
    """Each weight to its nearest code on its column's max-abs grid."""
    scale = column_scales(weight)
    return np.clip(np.round(weight / scale), -127, 127).astype(np.int8), scale


def input_hessians(
    model: Any, facts: GraphFacts, calibration: Calibration
) -> dict[str, npt.NDArray[np.float64]]:
    """``X^T X`` of each weight MatMul's input over the calibration texts' real tokens
    (padding left out): how much each input channel, and each pair, weighs in the product."""
    hessians: dict[str, npt.NDArray[np.float64]] = {}
    for name, value, mask in _probe(model, list(_weight_inputs(model, facts)), calibration):
        rows = value[mask].astype(np.float64) if value.ndim == 3 else value.astype(np.float64)
        rows = rows.reshape(-1, value.shape[-1])
        hessians[name] = hessians.get(name, 0) + rows.T @ rows
    return hessians


def gptq_codes(
    weight: npt.NDArray[np.float32],
    hessian: npt.NDArray[np.float64],
    *,
    damping: float = 0.01,
    act_order: bool = True,
    block: int = 128,
) -> Codes:
    """GPTQ (Frantar et al., 2022) for ``x @ W`` with one int8 scale per output column (max
    |w|, fixed first): the input rows of ``W`` are rounded one at a time (by descending
    ``diag(hessian)`` with ``act_order``) and each row's rounding error is spread over the rows
    not yet rounded, weighted through the Cholesky factor of ``hessian^-1``, so that ``x @ W``
    on the calibration inputs moves least. ``damping`` (a share of the mean diagonal) keeps
    ``hessian`` invertible."""
    w, scale = weight.astype(np.float64), column_scales(weight)
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
    w, h = w[order], h[np.ix_(order, order)]
    h[np.diag_indices_from(h)] += damping * np.mean(np.diag(h))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # inv(h) = upper^T @ upper
    codes = np.empty_like(w)
    step = scale.astype(np.float64)
    for start in range(0, len(w), block):
        end = min(start + block, len(w))
        rows, errors = w[start:end], np.empty((end - start, w.shape[1]))
        for i in range(end - start):
            codes[start + i] = np.clip(np.round(rows[i] / step), -127, 127)
            errors[i] = (rows[i] - codes[start + i] * step) / upper[start + i, start + i]
            rows[i + 1 :] -= np.outer(upper[start + i, start + i + 1 : end], errors[i])
        w[end:] -= upper[start:end, end:].T @ errors
    return codes[np.argsort(order)].astype(np.int8), scale


def gptq_rounding(hessians: dict[str, npt.NDArray[np.float64]]) -> WeightCodes:
    """``gptq_codes`` for each weight, with the hessian of the activation its MatMul reads."""

    def rounding(activation: str, weight: npt.NDArray[np.float32]) -> Codes:
        return gptq_codes(weight, hessians[activation])

    return rounding


def per_token_int8(
    source: Path,
    target: Path,
    facts: GraphFacts,
    rounding: WeightCodes = round_to_nearest,
    asymmetric: Collection[str] = (),
) -> None:
    """Each weight MatMul ``x @ W`` as int8 with one scale per token (row) of ``x``, computed at
    run time, and one per output channel (column) of ``W``, fixed here (``rounding`` chooses the
    codes): ONNX Runtime's dynamic mode has one scale per activation tensor, so one outlier
    token costs every other token its resolution. ``x`` is quantised once for every MatMul
    reading it (query, key and value), by one ``QuantizeLinear`` over its rows::

        s_x = max|x| per row / 127     q_x = round(x / s_x) + 128  (uint8, zero point 128)
        y   = MatMulInteger(q_x, q_W) * s_x * s_W                  (q_W int8, symmetric)

    The inputs of the MatMuls named in ``asymmetric`` get the whole uint8 range between each
    row's min and max instead (twice the resolution for a one-sided input, such as a GELU's
    output), the zero point taken out after the product through the weights' column sums::

        s_x = (max(x, 0) - min(x, 0)) / 255   z_x = round(-min(x, 0) / s_x)
        q_x = clip(round(x / s_x) + z_x, 0, 255)
        y   = MatMulInteger(q_x, q_W) * s_x * s_W - z_x * s_x * (sum_k q_W * s_W)
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    weights = {initializer.name: initializer for initializer in graph.initializer}
    chosen = set(facts.weight_matmuls)
    added = [
        numpy_helper.from_array(np.array(value, dtype), f"per_token/{name}")
        for name, value, dtype in (
            ("inv127", 1 / 127, np.float32),
            ("inv255", 1 / 255, np.float32),
            ("tiny", 1e-12, np.float32),
            ("zero", 0.0, np.float32),
            ("zero_point", 128, np.uint8),
            ("no_zero_point", 0, np.uint8),
        )
    ]
    added.append(numpy_helper.from_array(np.array([-1]), "per_token/flat"))
    # activation -> (its uint8 codes, its row scales, its zero point times its scale or None)
    quantised: dict[str, tuple[str, str, str | None]] = {}
    nodes = []
    for node in graph.node:
        if node.name not in chosen or node.input[1] not in weights:
            nodes.append(node)
            continue
        x, name = node.input[0], node.name
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        if x not in quantised:
            p = f"{x}/per_token"
            if node.name in asymmetric:
                nodes += [
                    helper.make_node("ReduceMax", [x], [f"{p}/max"], axes=[-1], keepdims=1),
                    helper.make_node("ReduceMin", [x], [f"{p}/min"], axes=[-1], keepdims=1),
                    helper.make_node("Max", [f"{p}/max", "per_token/zero"], [f"{p}/high"]),
                    helper.make_node("Min", [f"{p}/min", "per_token/zero"], [f"{p}/low"]),
                    helper.make_node("Sub", [f"{p}/high", f"{p}/low"], [f"{p}/range"]),
                    helper.make_node("Mul", [f"{p}/range", "per_token/inv255"], [f"{p}/scale0"]),
                    helper.make_node("Max", [f"{p}/scale0", "per_token/tiny"], [f"{p}/scale"]),
                    helper.make_node("Div", [f"{p}/low", f"{p}/scale"], [f"{p}/low_codes"]),
                    helper.make_node("Neg", [f"{p}/low_codes"], [f"{p}/zero_float"]),
                    helper.make_node("Round", [f"{p}/zero_float"], [f"{p}/zero"]),
                    helper.make_node("Mul", [f"{p}/zero", f"{p}/scale"], [f"{p}/offset"]),
                    helper.make_node("Reshape", [f"{p}/scale", "per_token/flat"], [f"{p}/scales"]),
                    helper.make_node("Reshape", [f"{p}/zero", "per_token/flat"], [f"{p}/zeros"]),
                    helper.make_node(
                        "Cast", [f"{p}/zeros"], [f"{p}/zero_points"], to=TensorProto.UINT8
                    ),
                ]
                offset: str | None = f"{p}/offset"
            else:
                nodes += [
                    helper.make_node("Abs", [x], [f"{p}/abs"]),
                    helper.make_node(
                        "ReduceMax", [f"{p}/abs"], [f"{p}/max"], axes=[-1], keepdims=1
                    ),
                    helper.make_node("Mul", [f"{p}/max", "per_token/inv127"], [f"{p}/scale0"]),
                    helper.make_node("Max", [f"{p}/scale0", "per_token/tiny"], [f"{p}/scale"]),
                    helper.make_node("Reshape", [f"{p}/scale", "per_token/flat"], [f"{p}/scales"]),
                    helper.make_node("Shape", [f"{p}/scales"], [f"{p}/rows"]),
                    helper.make_node(
                        "Expand", ["per_token/zero_point", f"{p}/rows"], [f"{p}/zero_points"]
                    ),
                ]
                offset = None
            # one QuantizeLinear (round, shift, saturate, cast) over x seen as [rows, K], the
            # scales along the rows, then back to x's shape
            rows_of = f"per_token/rows_of_{weight.shape[0]}"
            if rows_of not in {initializer.name for initializer in added}:
                added.append(numpy_helper.from_array(np.array([-1, weight.shape[0]]), rows_of))
            nodes += [
                helper.make_node("Reshape", [x, rows_of], [f"{p}/rows_x"]),
                helper.make_node(
                    "QuantizeLinear",
                    [f"{p}/rows_x", f"{p}/scales", f"{p}/zero_points"],
                    [f"{p}/rows_codes"],
                    axis=0,
                ),
                helper.make_node("Shape", [x], [f"{p}/shape"]),
                helper.make_node("Reshape", [f"{p}/rows_codes", f"{p}/shape"], [f"{p}/codes"]),
            ]
            quantised[x] = (f"{p}/codes", f"{p}/scale", offset)
        codes, row_scale, row_offset = quantised[x]
        weight_codes, column_scale = rounding(x, weight)
        added += [
            numpy_helper.from_array(weight_codes, f"{name}/weight_codes"),
            numpy_helper.from_array(column_scale, f"{name}/column_scale"),
            numpy_helper.from_array(np.zeros(weight.shape[1], np.int8), f"{name}/weight_zero"),
        ]
        zero_point = "per_token/zero_point" if row_offset is None else "per_token/no_zero_point"
        product = node.output if row_offset is None else [f"{name}/uncentred"]
        nodes += [
            helper.make_node(
                "MatMulInteger",
                [codes, f"{name}/weight_codes", zero_point, f"{name}/weight_zero"],
                [f"{name}/int32"],
            ),
            helper.make_node("Cast", [f"{name}/int32"], [f"{name}/float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{name}/float", row_scale], [f"{name}/row_scaled"]),
            helper.make_node("Mul", [f"{name}/row_scaled", f"{name}/column_scale"], product),
        ]
        if row_offset is not None:
            column_sums = weight_codes.astype(np.float32).sum(axis=0) * column_scale
            added.append(numpy_helper.from_array(column_sums, f"{name}/column_sums"))
            nodes += [
                helper.make_node(
                    "Mul", [row_offset, f"{name}/column_sums"], [f"{name}/zero_shift"]
                ),
                helper.make_node("Sub", [f"{name}/uncentred", f"{name}/zero_shift"], node.output),
            ]
    del graph.node[:]
    graph.node.extend(nodes)
    read = {name for node in graph.node for name in node.input}
    kept = [initializer for initializer in graph.initializer if initializer.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    onnx.save(model, str(target))


def _per_token(
    alpha: float | None,
    *,
    gptq: bool = False,
    asymmetric: bool = False,
    keep: Callable[[GraphFacts], Sequence[str]] = lambda facts: (),
    outliers: int = 0,
) -> Callable[[Path, Path, GraphFacts, Calibration], None]:
    """SmoothQuant with ``alpha`` (None: none), then ``outliers`` channels of each input split
    off in fp32 (``split_outlier_channels``; 0: none), then ``per_token_int8`` on every weight
    MatMul but ``keep``'s (left in fp32): the weights' codes by GPTQ on the calibration texts'
    inputs with ``gptq`` (else round-to-nearest), every activation on its own min-max range
    with ``asymmetric``."""

    def build(source: Path, target: Path, facts: GraphFacts, calibration: Calibration) -> None:
        import onnx

        kept = set(keep(facts))
        chosen = replace(facts, weight_matmuls=[n for n in facts.weight_matmuls if n not in kept])
        with (
            _smoothed(source, target, chosen, calibration, alpha) as smoothed,
            _split(smoothed, target, chosen, calibration, outliers) as stage,
        ):
            rounding: WeightCodes = round_to_nearest
            if gptq:
                rounding = gptq_rounding(input_hessians(onnx.load(str(stage)), chosen, calibration))
            asymmetric_nodes = chosen.weight_matmuls if asymmetric else ()
            per_token_int8(stage, target, chosen, rounding, asymmetric_nodes)

    return build


def _per_token_beside_blockwise(
    alpha: float, blockwise: Callable[[GraphFacts], Sequence[str]]
) -> Callable[[Path, Path, GraphFacts, Calibration], None]:
    """SmoothQuant then per-token int8 on every weight MatMul but ``blockwise``'s, which then
    become ``MatMulNBits`` (blocks of 32): the long-tailed inputs get fine scales, the rest the
    fast kernels."""
    per_token = _per_token(alpha)
    block_wise = _blockwise(32)

    def build(source: Path, target: Path, facts: GraphFacts, calibration: Calibration) -> None:
        fine = set(blockwise(facts))
        rest = replace(facts, weight_matmuls=[n for n in facts.weight_matmuls if n not in fine])
        stage = target.with_name(f"per-token-{target.name}")
        per_token(source, stage, rest, calibration)
        try:  # the per-token MatMuls are MatMulInteger now: only ``fine`` is left to quantise
            block_wise(stage, target, facts, calibration)
        finally:
            stage.unlink()

    return build


def _last_layer(facts: GraphFacts) -> Sequence[str]:
    return facts.last_layer


def _feed_forward_outputs(facts: GraphFacts) -> Sequence[str]:
    return facts.feed_forward_outputs


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "dynamic-per-channel",
        "dynamic QInt8, per-channel weights, every op onnxruntime quantises (MatMul, "
        "attention, embedding Gather)",
        _dynamic(),
    ),
    Recipe(
        "dynamic-weights",
        "dynamic QInt8 per-channel, op types MatMul only: the MatMuls with a weight (ONNX "
        "Runtime's dynamic mode leaves MatMuls of two activations, the attention scores and "
        "softmax inputs, in fp32), the embedding output in fp32",
        _dynamic(op_types=["MatMul"], weights_only=True),
    ),
    Recipe(
        "dynamic-weights-fp32-last-layer",
        "dynamic-weights with the last layer (feeding pooling) left in fp32",
        _dynamic(op_types=["MatMul"], weights_only=True, keep=_last_layer),
    ),
    Recipe(
        "dynamic-weights-fp32-ffn-output",
        "dynamic-weights with the feed-forward output projections (GELU inputs, long tails) "
        "left in fp32",
        _dynamic(op_types=["MatMul"], weights_only=True, keep=_feed_forward_outputs),
    ),
    Recipe(
        "dynamic-weights-reduce-range",
        "dynamic-weights with 7-bit weights (reduce_range), for CPUs without VNNI",
        _dynamic(op_types=["MatMul"], weights_only=True, reduce_range=True),
        only_without_vnni=True,
    ),
    Recipe(
        "static-qdq",
        "static QDQ: per-channel QInt8 weights, QUInt8 activations with MinMax ranges "
        "calibrated on the calibration texts; weight MatMuls only",
        _static_qdq(),
    ),
    Recipe(
        "static-qdq-fp32-last-layer",
        "static-qdq with the last layer left in fp32",
        _static_qdq(keep=_last_layer),
    ),
    Recipe(
        "blockwise-32",
        "weight MatMuls as MatMulNBits: 8-bit weights in blocks of 32, activations quantised "
        "to int8 per block of 32 at run time (accuracy level 4)",
        _blockwise(32),
    ),
    Recipe(
        "blockwise-16",
        "blockwise-32 with blocks of 16",
        _blockwise(16),
    ),
    Recipe(
        "blockwise-32-fp32-last-layer",
        "blockwise-32 with the last layer left in fp32",
        _blockwise(32, keep=_last_layer),
    ),
    Recipe(
        "smoothquant-dynamic",
        "SmoothQuant (alpha 0.5, scales from the calibration texts) then dynamic-weights",
        _smoothed_dynamic(0.5),
    ),
    Recipe(
        "smoothquant-0.7-dynamic",
        "SmoothQuant with alpha 0.7 (more of the activations' range moved to the weights) "
        "then dynamic-weights",
        _smoothed_dynamic(0.7),
    ),
    Recipe(
        "per-token",
        "weight MatMuls in int8 with one activation scale per token (computed at run time) "
        "and per-channel weights (MatMulInteger and two Muls)",
        _per_token(None),
    ),
    Recipe(
        "smoothquant-per-token",
        "SmoothQuant (alpha 0.5) then per-token",
        _per_token(0.5),
    ),
    Recipe(
        "gptq-per-token",
        "SmoothQuant (alpha 0.5), then per-token with the weights' codes by GPTQ on the "
        "calibration texts and each token's activations on its own min-max range (asymmetric)",
        _per_token(0.5, gptq=True, asymmetric=True),
    ),
    Recipe(
        "gptq-per-token-8-outliers",
        "gptq-per-token with the 8 input channels of each projection that reach furthest "
        "over the calibration texts computed in fp32 beside the int8 product (LLM.int8()'s "
        "decomposition, the channels fixed at quantisation)",
        _per_token(0.5, gptq=True, asymmetric=True, outliers=8),
    ),
    Recipe(
        "gptq-per-token-fp32-ffn-output",
        "gptq-per-token with the feed-forward output projections (GELU inputs, long tails) "
        "left in fp32",
        _per_token(0.5, gptq=True, asymmetric=True, keep=_feed_forward_outputs),
    ),
    Recipe(
        "smoothquant-per-token-blockwise-ffn-output",
        "smoothquant-per-token, the feed-forward output projections (GELU inputs, long tails) "
        "as blockwise-32",
        _per_token_beside_blockwise(0.5, _feed_forward_outputs),
    ),
)


def cpu_has_vnni() -> bool | None:
    """Whether the CPU has int8 dot-product instructions (VNNI); None when unknown (not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def variant_model_id(model_id: str, variant: str = INT8) -> str:
    return f"{model_id}@{variant}"


def _neighbours(vectors: npt.NDArray[np.float32], count: int) -> npt.NDArray[np.intp]:
    """Each row's ``count`` nearest other rows by cosine (vectors L2-normalised)."""
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argpartition(-similarity, count, axis=1)[:, :count]


def gate_figures(
    reference: npt.NDArray[np.float32], candidate: npt.NDArray[np.float32], neighbours: int
) -> tuple[float, float, float]:
    """Recall@``neighbours`` of corpus neighbours, min and mean cosine of ``candidate`` against
    ``reference`` (rows: the same texts, L2-normalised)."""
    cosines = (reference.astype(np.float64) * candidate).sum(axis=1)
    ours, theirs = _neighbours(candidate, neighbours), _neighbours(reference, neighbours)
    found = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ours, theirs, strict=True)]
    recall = sum(found) / (neighbours * len(found))
    return recall, float(cosines.min()), float(cosines.mean())


def _texts_per_second(engine: Engine, texts: Sequence[str]) -> float:
    started = time.perf_counter()
    engine.embed(texts)
    return len(texts) / (time.perf_counter() - started)


def _speeds(fp32: Engine, candidate: Engine, texts: Sequence[str]) -> tuple[float, float]:
    """Bulk texts/s of ``candidate`` and of ``fp32``, measured alternately (best round)."""
    ours, theirs = [], []
    for _ in range(SPEED_ROUNDS):
        theirs.append(_texts_per_second(fp32, texts))
        ours.append(_texts_per_second(candidate, texts))
    return max(ours), max(theirs)


def open_candidate(fp32: ModelMetadata, directory: Path, threads: int | None = None) -> Engine:
    """An engine on ``directory``'s model.onnx with every other fact of the ``fp32`` model (its
    tokenizer is copied beside it)."""
    from akidb_embed.worker.config import WorkerConfig
    from akidb_embed.worker.engine import Engine

    shutil.copyfile(fp32.path(TOKENIZER_FILE), directory / TOKENIZER_FILE)
    metadata = replace(fp32, directory=directory, files={})
    config = WorkerConfig(model_dir=directory, provider="cpu")
    if threads is not None:
        config = replace(config, threads=threads)
    return Engine.open(metadata, config)


@dataclass(frozen=True)
class QuantizeResult:
    """The variant written (its metadata), the recipe kept, and every recipe's row."""

    metadata: ModelMetadata
    recipe: Recipe
    table: list[Measurement] = field(default_factory=list)


def _stderr(message: str) -> None:
    print(f"models: {message}", file=sys.stderr, flush=True)


def format_table(table: Sequence[Measurement], gate: Gate) -> str:
    """The recipes' rows as a plain-text table (what the command prints)."""
    lines = [
        f"{'recipe':<32} {'recall@' + str(gate.neighbours):>9} {'min cos':>8} "
        f"{'texts/s':>8} {'fp32/s':>8} {'x fp32':>7}  gate"
    ]
    for row in table:
        if row.error is not None:
            lines.append(f"{row.recipe:<32} error: {row.error}")
            continue
        verdict = "pass" if row.passes(gate) else "fail"
        lines.append(
            f"{row.recipe:<32} {row.recall:>9.4f} {row.min_cosine:>8.4f} "
            f"{row.texts_per_second:>8.1f} {row.fp32_texts_per_second:>8.1f} "
            f"{row.speedup:>6.2f}x  {verdict}"
        )
    return "\n".join(lines)


def _measure(
    recipe: Recipe,
    fp32: Engine,
    reference: npt.NDArray[np.float32],
    corpus: GateCorpus,
    facts: GraphFacts,
    calibration: Calibration,
    gate: Gate,
    work: Path,
    threads: int | None,
) -> Measurement:
    directory = work / recipe.name
    directory.mkdir()
    try:
        recipe.build(fp32.metadata.path(MODEL_FILE), directory / MODEL_FILE, facts, calibration)
        candidate = open_candidate(fp32.metadata, directory, threads)
        vectors = candidate.embed(corpus.evaluation, normalize=True)
        recall, min_cosine, mean_cosine = gate_figures(reference, vectors, gate.neighbours)
        speed, fp32_speed = _speeds(fp32, candidate, corpus.evaluation[:SPEED_TEXTS])
    except Exception as exc:  # onnxruntime's tools raise many unrelated types
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        return Measurement(recipe.name, error=message[:200])
    return Measurement(recipe.name, recall, min_cosine, mean_cosine, speed, fp32_speed)


@contextlib.contextmanager
def _quiet_onnxruntime_tools() -> Iterator[None]:
    """onnxruntime.quantization logs advice and per-node progress at INFO/WARNING; the table
    says what matters. Its own logger is silenced too: importing the MatMulNBits quantiser
    calls ``logging.basicConfig(level=INFO)``, which sets the root logger's level."""
    import logging

    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _already_made(out: Path, base: ModelMetadata, base_sha: str, gate: Gate) -> bool:
    if verify_model_dir(out):
        return False
    metadata = load_metadata(out)
    record = metadata.quantization
    return (
        metadata.base_model == base.model
        and record.get("base", {}).get("model.onnx sha256") == base_sha
        and record.get("gate") == asdict(gate)
    )


def quantize(
    model_dir: Path | str,
    out: Path | str,
    *,
    gate: Gate = DEFAULT_GATE,
    recipes: Sequence[Recipe] | None = None,
    corpus: GateCorpus | None = None,
    threads: int | None = None,
    force: bool = False,
    log: Log = _stderr,
) -> QuantizeResult | None:
    """Write an int8 variant of the fp32 model in ``model_dir`` to ``out``: the fastest of
    ``recipes`` (default: every recipe that applies to this CPU) passing ``gate`` on ``corpus``
    (default: ``gate_corpus()``). Returns None when ``out`` already holds a variant of this
    fp32 model made under the same gate (unless ``force``). ``QuantizeRefused`` (with the
    table) when no recipe passes; ``ProvisionError`` when ``out`` cannot be written;
    ``ModelNotFound`` for a damaged ``model_dir``. Nothing is written unless a recipe passes."""
    from akidb_embed.worker.config import WorkerConfig
    from akidb_embed.worker.engine import Engine

    missing = [name for name in ("onnx", "onnx_ir") if importlib.util.find_spec(name) is None]
    if missing:
        raise ProvisionError(
            f"quantising needs {' and '.join(missing)}: pip install 'akidb-embed[export]'"
        )
    base = open_model_dir(model_dir)
    if base.variant is not None:
        raise ProvisionError(f"{base.directory} is already a variant ({base.model})")
    target = Path(out).expanduser().absolute()
    if target == base.directory.expanduser().absolute():
        raise ProvisionError(f"--out {target} is the fp32 model's own directory")
    base_sha = base.files[MODEL_FILE].sha256
    if not force and target.exists() and _already_made(target, base, base_sha, gate):
        return None
    vnni = cpu_has_vnni()
    chosen = [r for r in recipes or RECIPES if not (r.only_without_vnni and vnni is not False)]
    corpus = corpus or gate_corpus()
    config = WorkerConfig(model_dir=base.directory, provider="cpu")
    if threads is not None:
        config = replace(config, threads=threads)
    fp32 = Engine.open(base, config)
    log(f"fp32 vectors of {len(corpus.evaluation)} evaluation texts ({base.model})")
    reference = fp32.embed(corpus.evaluation, normalize=True)
    facts = graph_facts(base.path(MODEL_FILE))
    calibration = Calibration.of(fp32, corpus.calibration)
    table: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="akidb-embed-quantize-") as scratch:
        for recipe in chosen:
            log(f"recipe {recipe.name}: {recipe.description}")
            with _quiet_onnxruntime_tools():
                row = _measure(
                    recipe, fp32, reference, corpus, facts, calibration, gate, Path(scratch),
                    threads,
                )  # fmt: skip
            table.append(row)
            log(format_table([row], gate).splitlines()[1])
        passing = [row for row in table if row.passes(gate)]
        if not passing:
            raise QuantizeRefused(
                f"no recipe keeps the neighbours of {base.model} (gate: recall@"
                f"{gate.neighbours} >= {gate.min_recall}, min cosine >= {gate.min_cosine}); "
                "nothing written",
                table,
            )
        best = max(passing, key=lambda row: row.speedup)
        recipe = next(r for r in chosen if r.name == best.recipe)
        metadata = _write_variant(
            base,
            Path(scratch) / recipe.name,
            target,
            recipe,
            best,
            table,
            gate,
            corpus,
            vnni,
            log,
        )
    return QuantizeResult(metadata, recipe, table)


def _parity_with_golden(base: ModelMetadata, built: Path, gate: Gate) -> dict[str, Any]:
    """The variant's vectors of golden.json's sentences against its reference vectors (those
    of the fp32 model's reference framework), judged by the gate's min cosine: the variant's
    parity record, in place of the fp32 model's."""
    from akidb_embed.models import golden

    stored = golden.read_golden(base.path(GOLDEN_FILE))
    engine = open_candidate(base, built)
    ours = engine.embed(stored.sentences, normalize=stored.normalize)
    parity = replace(
        golden.compare(ours, stored.embeddings, stored.reference), threshold=gate.min_cosine
    )
    return {**parity.to_json(), "verified": parity.passes, "of": f"{INT8} variant"}


def _write_variant(
    base: ModelMetadata,
    built: Path,
    target: Path,
    recipe: Recipe,
    best: Measurement,
    table: list[Measurement],
    gate: Gate,
    corpus: GateCorpus,
    vnni: bool | None,
    log: Log,
) -> ModelMetadata:
    """Install the candidate in ``built`` as the model directory ``target`` (atomically), with
    calibration vectors of its own (its int8/uint8 ranges are those of its vectors)."""
    shutil.copyfile(base.path(GOLDEN_FILE), built / GOLDEN_FILE)
    parity = _parity_with_golden(base, built, gate)
    calibration = write_calibration(open_candidate(base, built), built, log)
    files = file_records(built, (*REQUIRED_FILES, CALIBRATION_FILE))
    record = {
        **best.to_json(),
        "description": recipe.description,
        "gate": asdict(gate),
        "table": [row.to_json() for row in table],
        "base": {
            "model": base.model,
            "directory": str(base.directory),
            "model.onnx sha256": base.files[MODEL_FILE].sha256,
        },
        "corpus": {
            "evaluation_texts": len(corpus.evaluation),
            "evaluation_digest": corpus.evaluation_digest,
            "calibration_texts": len(corpus.calibration),
            "calibration_digest": corpus.calibration_digest,
            "python": ".".join(map(str, sys.version_info[:3])),
        },
        "cpu_vnni": vnni,
        "onnxruntime": importlib.metadata.version("onnxruntime"),
    }
    metadata = replace(
        base,
        directory=target,
        model=variant_model_id(base.model),
        files=files,
        parity=parity,
        calibration=calibration,
        variant=INT8,
        base_model=base.model,
        quantization=record,
    )
    write_metadata(metadata, built)
    work = target.parent / WORK_FOLDER
    work.mkdir(parents=True, exist_ok=True)
    staged = work / f"{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.move(str(built), staged)
    try:
        install_directory(staged, target, work)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return load_metadata(target)
