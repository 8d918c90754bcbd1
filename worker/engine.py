"""The model: tokenizer and ONNX Runtime session of one model directory, texts in, vectors out.

::

    texts --tokenize--> token id arrays --plan_micro_batches--> micro-batches (sorted by length,
          (truncate at      (no padding)                        rows x longest <= max_batch_tokens)
           max_tokens, or                                            |
           InvalidInput)                                      run: pad with numpy, ONNX Runtime,
                                                              mean_pool under the mask
                                                                     |
                                                              (n, dimension) float32 (normalised
                                                              by the caller when asked)

Every model fact (id, dimension, max tokens, pooling) comes from the directory's metadata; the
input and output names come from the ONNX graph. ``Engine`` is usable in-process without the
worker's bridge: ``Engine.load(WorkerConfig()).embed(texts)``.

Loading fails with ``ModelNotFound`` (no usable model directory or files) or
``ServiceUnavailable`` (the execution provider asked for is missing); the worker turns either
into a failed hello.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]
from tokenizers import Tokenizer

from akidb_embed.errors import InvalidInput, ModelNotFound, ServiceUnavailable
from akidb_embed.models import ModelMetadata, load_metadata
from akidb_embed.pooling import l2_normalize, mean_pool
from akidb_embed.worker.batcher import plan_micro_batches
from akidb_embed.worker.config import WorkerConfig
from akidb_embed.worker.providers import CPU, choose_providers

__all__ = ["MODEL_FILE", "TOKENIZER_FILE", "Engine", "TokenIds"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
SUPPORTED_POOLING = "mean"

TokenIds = npt.NDArray[np.int64]
"""The token ids of one text, special tokens included, unpadded."""


def _check_files(metadata: ModelMetadata) -> None:
    for name in (MODEL_FILE, TOKENIZER_FILE):
        path = metadata.path(name)
        if not path.is_file():
            raise ModelNotFound(f"model directory {metadata.directory} has no {name}")
        record = metadata.files.get(name)
        # a size mismatch catches an interrupted copy without hashing 90 MB at every start
        if record is not None and path.stat().st_size != record.bytes:
            raise ModelNotFound(
                f"{path} holds {path.stat().st_size} bytes, its metadata says {record.bytes}: "
                "provision the model again"
            )


def _session_options(threads: int, spin_wait: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # one graph runs at a time (the batcher's single inference thread): no inter-op pool needed
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Memory, measured with the bench corpus (peak RSS of the whole worker, 2 threads): the peak
    # follows the largest micro-batch (682 MB with ONNX Runtime's defaults at 32x256 tokens,
    # 236 MB with these settings at max_batch_tokens 1024), so max_batch_tokens is the real
    # bound. Keeping the CPU arena is lower than going without it (589 vs 325 MB in-process at
    # 2048: freed activations then fragment glibc's per-thread heaps); memory patterns are
    # planned and cached per input shape, and nearly every micro-batch has a new shape, so
    # they only add (325 vs 295 MB at 2048, 259 vs 236 MB in the worker at 1024).
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = False
    # Unless asked (spin_wait), the pool threads do not spin between runs: spinning would take
    # CPU from the reader's tokenisation and from the host's own work (AkiDB shares the
    # machine). Measured cost of not spinning: ~0.6 ms on a one-sentence request, none in bulk.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    return options


class Engine:
    """One loaded model: ``tokenize`` and ``run`` for the batcher, ``embed`` for direct use."""

    def __init__(
        self,
        metadata: ModelMetadata,
        session: ort.InferenceSession,
        tokenizer_path: Path,
        max_batch_tokens: int,
    ) -> None:
        self.metadata = metadata
        self.max_batch_tokens = max_batch_tokens
        self._session = session
        self._input_names = {node.name for node in session.get_inputs()}
        outputs = [node.name for node in session.get_outputs()]
        self._output_name = "last_hidden_state" if "last_hidden_state" in outputs else outputs[0]
        self._truncating = Tokenizer.from_file(str(tokenizer_path))
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length=metadata.max_tokens)
        # a second instance that never truncates, to report an over-long input's real length
        self._whole = Tokenizer.from_file(str(tokenizer_path))
        self._whole.no_padding()
        self._whole.no_truncation()

    @classmethod
    def load(cls, config: WorkerConfig | None = None) -> Engine:
        """Load the model directory of ``config`` (default settings when omitted) and check that
        the model produces vectors of the dimension its metadata states."""
        config = config or WorkerConfig()
        metadata = load_metadata(config.model_dir)
        if metadata.pooling != SUPPORTED_POOLING:
            raise ModelNotFound(
                f"model {metadata.model} uses {metadata.pooling!r} pooling; "
                f"this worker implements {SUPPORTED_POOLING!r} only"
            )
        _check_files(metadata)
        providers = choose_providers(
            config.provider, ort.get_available_providers(), sys.platform, config.coreml
        )
        try:
            session = ort.InferenceSession(
                str(metadata.path(MODEL_FILE)),
                sess_options=_session_options(config.threads, config.spin_wait),
                providers=[name for name, _ in providers],
                provider_options=[options for _, options in providers],
            )
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise ModelNotFound(f"cannot load {metadata.path(MODEL_FILE)}: {exc}") from None
        wanted = providers[0][0]
        if wanted != CPU and wanted not in session.get_providers():
            raise ServiceUnavailable(
                f"execution provider {wanted} failed to initialise (see the log above); "
                f"the session has {', '.join(session.get_providers())}"
            )
        try:
            engine = cls(metadata, session, metadata.path(TOKENIZER_FILE), config.max_batch_tokens)
        except Exception as exc:  # tokenizers raises a bare Exception for an unreadable file
            raise ModelNotFound(f"cannot load {metadata.path(TOKENIZER_FILE)}: {exc}") from None
        engine._check_dimension()
        return engine

    @property
    def providers(self) -> list[str]:
        """The session's execution providers, in priority order."""
        return list(self._session.get_providers())

    def _check_dimension(self) -> None:
        # also the warm-up run: the first real request does not pay for lazy initialisation
        probe = self.run(self.tokenize(["warm-up"]))
        if probe.shape != (1, self.metadata.dimension):
            raise ModelNotFound(
                f"{self.metadata.path(MODEL_FILE)} produces vectors of shape {probe.shape[1:]}, "
                f"its metadata says dimension {self.metadata.dimension}"
            )

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[TokenIds]:
        """Token ids of each text, special tokens included. With ``truncate`` false, an input
        longer than ``max_tokens`` raises ``InvalidInput`` naming its index and length."""
        if truncate:
            encodings = self._truncating.encode_batch(list(texts))
        else:
            encodings = self._whole.encode_batch(list(texts))
            limit = self.metadata.max_tokens
            for index, encoding in enumerate(encodings):
                if len(encoding.ids) > limit:
                    raise InvalidInput(
                        f"inputs[{index}] has {len(encoding.ids)} tokens, more than max_tokens="
                        f"{limit}; shorten it or send truncate: true",
                        index,
                    )
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def run(
        self, token_ids: Sequence[TokenIds], normalize: bool = False
    ) -> npt.NDArray[np.float32]:
        """Vectors of one micro-batch: padded to its longest row, mean-pooled under the mask."""
        longest = max(len(ids) for ids in token_ids)
        input_ids = np.zeros((len(token_ids), longest), dtype=np.int64)  # pad value is masked out
        attention_mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        feeds: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        (hidden,) = self._session.run([self._output_name], feeds)
        pooled = mean_pool(hidden, attention_mask)
        return l2_normalize(pooled) if normalize else pooled

    def embed(
        self, texts: Sequence[str], normalize: bool = True, truncate: bool = True
    ) -> npt.NDArray[np.float32]:
        """The (len(texts), dimension) vectors of ``texts``, in order, run in micro-batches under
        ``max_batch_tokens`` (in-process use: no worker, no queue)."""
        token_ids = self.tokenize(texts, truncate)
        result = np.empty((len(texts), self.metadata.dimension), dtype=np.float32)
        for batch in plan_micro_batches([len(ids) for ids in token_ids], self.max_batch_tokens):
            result[batch] = self.run([token_ids[i] for i in batch], normalize)
        return result
