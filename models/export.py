"""Export a sentence-transformers model's transformer to ONNX with torch, offline, and check it.

::

    safetensors weights + config.json --transformers AutoModel (eager attention, float32)-->
        encoder (BERT-like, MPNet/RoBERTa-like, or a decoder such as Qwen3: use_cache=False)
        --inputs the forward takes: input_ids, attention_mask [, token_type_ids]
        --_LastHiddenState wrapper--> torch.onnx.export (TorchScript exporter), traced on a batch
           with right- and left-padded rows so the padding (and causal) mask path is recorded
        --> model.onnx: inputs  that subset (int64, batch x sequence, both axes dynamic)
                        output  last_hidden_state (float32, batch x sequence x hidden)
        --> check: onnxruntime vs torch on new right- and left-padded batches (other batch and
            sequence sizes than the trace); any non-finite value or a difference on unmasked
            positions above EXPORT_TOLERANCE -> ExportError
    any failure (no torch, unreadable weights, exporter error, failed check) raises; nothing is
    written outside the target path, and provisioning discards its temporary directory.

The graph has no past key values and no position ids input: positions are what the model
computes itself (BERT and Qwen3: 0..sequence-1 whatever the padding; MPNet/RoBERTa: from the
non-padding input ids), exactly as under sentence-transformers, which passes neither.
``token_type_ids`` is an input only when the model's forward takes it and the config has more
than one token type; for a single text it is all zeros.

Imported only when an export is needed: torch and transformers (the ``export`` extra) are never
imported by the worker or the host client. The record returned says which inputs the graph takes.
The exported graph is checked again afterwards, with pooling, against sentence-transformers, by
``golden.py``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "EXPORT_OPSET",
    "EXPORT_TOLERANCE",
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "ExportError",
    "export_onnx",
]

EXPORT_OPSET = 17
"""ONNX opset of exported graphs: LayerNormalization is a single op from 17 on, and every
onnxruntime the worker supports (>= 1.17) runs it."""
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
"""Every input an exported graph may take, in graph order; each graph takes a subset (its
record's ``inputs``), always starting with input_ids and attention_mask."""
OUTPUT_NAME = "last_hidden_state"
EXPORT_TOLERANCE = 1e-4
"""Largest |onnxruntime - torch| allowed on unmasked positions, scaled by the largest activation
when that exceeds 1 (decoders carry activations in the hundreds, where float32 rounding of a
different operation order alone reaches 1e-5)."""
_TRACE_ROWS = ((8, "right"), (5, "right"), (3, "left"))
"""(real tokens, padding side) per traced row, sequence 8: one full row, padding on both sides."""
_CHECK_LENGTHS = (13, 9, 4, 1, 13)
"""Real tokens per checked row, sequence 13: other sizes than the trace's, so that a shape the
tracer baked in as a constant fails the check."""
_CHECK_SEED = 1234


class ExportError(Exception):
    """The model cannot be exported, or the exported graph does not compute what torch does."""


def _graph_inputs(model: Any) -> list[str]:
    """The inputs of ``INPUT_NAMES`` the model's forward takes, in graph order."""
    parameters = inspect.signature(model.forward).parameters
    missing = [name for name in ("input_ids", "attention_mask") if name not in parameters]
    if missing:
        raise ExportError(f"{type(model).__name__}.forward does not take {', '.join(missing)}")
    required = [
        name
        for name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name not in INPUT_NAMES
    ]
    if required:
        raise ExportError(
            f"{type(model).__name__}.forward requires {', '.join(required)}: not a text encoder "
            "sentence-transformers can run on token ids alone"
        )
    inputs = ["input_ids", "attention_mask"]
    token_types = getattr(model.config, "type_vocab_size", 2)
    if "token_type_ids" in parameters and (token_types is None or token_types > 1):
        inputs.append("token_type_ids")
    return inputs


def export_onnx(weights_dir: Path, onnx_path: Path, opset: int = EXPORT_OPSET) -> dict[str, Any]:
    """Write ``weights_dir``'s transformer as ONNX to ``onnx_path`` and check it against torch.

    Returns what the metadata records about the export: tool versions, opset, the graph's
    ``inputs``, the hidden size, and the largest difference to torch measured (``max_abs_diff``).
    Raises ``ExportError`` when the model cannot be exported or the graph computes something else.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never ask a hub
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    class _LastHiddenState(torch.nn.Module):
        """Positional inputs for the exporter (transformers' forward wants keywords)."""

        def __init__(
            self, model: torch.nn.Module, input_names: Sequence[str], options: dict[str, Any]
        ) -> None:
            super().__init__()
            self.model = model
            self.input_names = tuple(input_names)
            self.options = options

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            output = self.model(**dict(zip(self.input_names, inputs, strict=True)), **self.options)
            hidden: torch.Tensor = output.last_hidden_state
            return hidden

    # Eager attention exports as plain MatMul/Softmax, the pattern ONNX Runtime's graph
    # optimiser recognises and fuses, and materialises the mask from attention_mask. float32
    # whatever config.json's dtype says (transformers 5 loads that dtype by default, often
    # bfloat16 for decoders): the graph's output is float32 on every execution provider.
    model = AutoModel.from_pretrained(
        str(weights_dir), local_files_only=True, attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    input_names = _graph_inputs(model)
    # No key/value cache: one forward pass per batch, no past_key_values outputs in the graph.
    options = (
        {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    )
    wrapper = _LastHiddenState(model, input_names, options).eval()
    # Padded rows on both sides, so that the mask path is what gets recorded (an all-ones mask
    # may be optimised away by transformers while tracing).
    trace = _padded_batch(model.config, input_names, _TRACE_ROWS, seed=0)
    dynamic = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter's deprecation and tracer warnings (Python values taken from
        # tensors) are judged by the check below, on other shapes and padding than the trace's.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            tuple(trace[name] for name in input_names),
            str(onnx_path),
            dynamo=False,
            input_names=list(input_names),
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: dynamic for name in (*input_names, OUTPUT_NAME)},
            opset_version=opset,
            do_constant_folding=True,
        )
    max_abs_diff = _check_against_torch(wrapper, onnx_path, model.config, input_names)
    return {
        "exporter": "torch.onnx.export (TorchScript)",
        "opset": opset,
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
        "attention": "eager",
        "dtype": "float32",
        "architecture": type(model).__name__,
        "inputs": list(input_names),
        "output": OUTPUT_NAME,
        "hidden_size": int(model.config.hidden_size),
        "max_abs_diff": max_abs_diff,
        "checked_padding": ["right", "left"],
    }


def _padded_batch(
    config: Any, input_names: Sequence[str], rows: Sequence[tuple[int, str]], seed: int
) -> dict[str, Any]:
    """A batch of random token ids, one row per (real tokens, padding side) of ``rows``, padded
    with the pad id (MPNet-like models derive positions from it). Real tokens never use it."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = max(length for length, _ in rows)
    vocab = int(config.vocab_size)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    shape = (len(rows), tokens)
    input_ids = torch.randint(0, vocab, shape, generator=generator, dtype=torch.int64)
    input_ids[input_ids == pad_id] = (pad_id + 1) % vocab
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    for row, (length, side) in enumerate(rows):
        real = slice(0, length) if side == "right" else slice(tokens - length, tokens)
        attention_mask[row, real] = 1
    input_ids[attention_mask == 0] = pad_id
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in input_names:
        # Mostly zeros (a single text's), some ones, so that the input is seen to be wired in.
        ones = torch.rand(shape, generator=generator) < 0.2
        batch["token_type_ids"] = ones.to(torch.int64) * attention_mask
    return batch


def _check_against_torch(
    wrapper: Any, onnx_path: Path, config: Any, input_names: Sequence[str]
) -> float:
    """Run torch and onnxruntime on right- and left-padded batches; the largest difference on
    unmasked positions, or ``ExportError`` when above tolerance or not finite."""
    import numpy as np
    import onnxruntime  # type: ignore[import-untyped]
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # a tiny batch; do not take the machine's cores
    session = onnxruntime.InferenceSession(
        str(onnx_path), options, providers=["CPUExecutionProvider"]
    )
    worst = 0.0
    for index, side in enumerate(("right", "left")):
        rows = [(length, side) for length in _CHECK_LENGTHS]
        batch = _padded_batch(config, input_names, rows, seed=_CHECK_SEED + index)
        with torch.no_grad():
            expected = wrapper(*(batch[name] for name in input_names)).numpy()
        (got,) = session.run([OUTPUT_NAME], {name: batch[name].numpy() for name in input_names})
        if got.shape != expected.shape:
            raise ExportError(
                f"{onnx_path.name}: {OUTPUT_NAME} has shape {got.shape} on a {side}-padded batch, "
                f"torch gives {expected.shape}"
            )
        if not np.isfinite(got).all():
            raise ExportError(
                f"{onnx_path.name}: non-finite values in {OUTPUT_NAME} on a {side}-padded batch"
            )
        unmasked = batch["attention_mask"].numpy().astype(bool)
        difference = float(np.abs(got - expected)[unmasked].max())
        scale = float(np.abs(expected[unmasked]).max())
        if not difference <= EXPORT_TOLERANCE * max(1.0, scale):
            raise ExportError(
                f"{onnx_path.name} differs from torch on a {side}-padded batch: max |difference| "
                f"{difference:.3g} on unmasked positions (largest activation {scale:.3g}, "
                f"tolerance {EXPORT_TOLERANCE:g} x max(1, largest activation))"
            )
        worst = max(worst, difference)
    return worst
