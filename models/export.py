"""Export a BERT-style sentence-transformers model to ONNX with torch, offline.

::

    safetensors weights + config.json --transformers AutoModel--> BertModel (eval, CPU)
        --_LastHiddenState wrapper--> torch.onnx.export (TorchScript exporter)
        --> model.onnx: inputs input_ids, attention_mask, token_type_ids (int64, batch x sequence)
                        output last_hidden_state (float32, batch x sequence x hidden)
    any failure (no torch, unreadable weights, exporter error) raises; nothing is written
    outside the target path, and provisioning discards its temporary directory.

Imported only when an export is needed: torch and transformers (the ``export`` extra) are never
imported by the worker or the host client. The exported graph is checked afterwards, against
sentence-transformers, by ``golden.py``.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["EXPORT_OPSET", "INPUT_NAMES", "OUTPUT_NAME", "export_onnx"]

EXPORT_OPSET = 17
"""ONNX opset of exported graphs: LayerNormalization is a single op from 17 on, and every
onnxruntime the worker supports (>= 1.17) runs it."""
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
_TRACE_BATCH, _TRACE_TOKENS = 2, 8


def export_onnx(weights_dir: Path, onnx_path: Path, opset: int = EXPORT_OPSET) -> dict[str, Any]:
    """Write ``weights_dir``'s transformer as ONNX to ``onnx_path``; returns what the metadata
    records about the export (tool versions, opset)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never ask a hub
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    class _LastHiddenState(torch.nn.Module):
        """Positional inputs for the exporter (transformers' forward wants keywords)."""

        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            output = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            hidden: torch.Tensor = output.last_hidden_state
            return hidden

    # Eager attention exports as plain MatMul/Softmax, the pattern ONNX Runtime's graph
    # optimiser recognises and fuses.
    encoder = AutoModel.from_pretrained(
        str(weights_dir), local_files_only=True, attn_implementation="eager"
    )
    encoder.eval()
    # The traced batch has a padded row, so the attention-mask path is what gets recorded
    # (an all-ones mask may be optimised away by transformers while tracing).
    input_ids = torch.ones((_TRACE_BATCH, _TRACE_TOKENS), dtype=torch.int64)
    attention_mask = torch.ones((_TRACE_BATCH, _TRACE_TOKENS), dtype=torch.int64)
    attention_mask[1, _TRACE_TOKENS // 2 :] = 0
    token_type_ids = torch.zeros((_TRACE_BATCH, _TRACE_TOKENS), dtype=torch.int64)
    dynamic = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter's deprecation and tracer warnings concern control flow this
        # model does not have; the parity check afterwards is the real test.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LastHiddenState(encoder),
            (input_ids, attention_mask, token_type_ids),
            str(onnx_path),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: dynamic for name in (*INPUT_NAMES, OUTPUT_NAME)},
            opset_version=opset,
            do_constant_folding=True,
        )
    return {
        "exporter": "torch.onnx.export (TorchScript)",
        "opset": opset,
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
        "attention": "eager",
    }
