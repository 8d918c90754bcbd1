"""The model: tokenizer and ONNX Runtime session of one model directory, texts in, vectors out.

::

    texts --prompt text prepended--> tokenize --> token id arrays --plan_micro_batches-->
          (resolve_prompt: the       (truncate at    (no padding)     micro-batches (sorted by
           request's or the model's   max_tokens, or                  length, rows x longest
           default prompt)            InvalidInput)                   <= max_batch_tokens)
                                                                             |
          (n, dimension) float32 <-- pool (cls/mean/max/lasttoken) <-- ONNX Runtime <-- run: pad
          (normalised by the caller      under the pooling mask                       (left or
           when asked)                   (prompt tokens left out                       right, pad
                                          when include_prompt is false)                token id)

Every model fact (id, dimension, max tokens, pooling, prompts, padding side) comes from the
directory's metadata, which provisioning read from the model's sentence-transformers configs;
the input and output names come from the ONNX graph. ``Engine`` is usable in-process without
the worker's bridge: ``Engine.load(WorkerConfig()).embed(texts)``; ``load_engines`` loads every
model directory of a configuration (the worker's several models).

Loading fails with ``ModelNotFound`` (no usable model directory or files) or
``ServiceUnavailable`` (the execution provider asked for is missing); the worker turns either
into a failed hello.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]
from tokenizers import Tokenizer

from akidb_embed.encodings import (
    DEFAULT_ENCODING,
    ENCODINGS,
    RANGED_ENCODINGS,
    OutputForm,
    check_dimensions,
    quantization_ranges,
)
from akidb_embed.errors import Internal, InvalidInput, ModelNotFound, ServiceUnavailable
from akidb_embed.models import POOLING_MODES, ModelMetadata, load_metadata
from akidb_embed.models.metadata import CALIBRATION_FILE
from akidb_embed.pooling import l2_normalize, pool, pooling_mask
from akidb_embed.wire import TRUNCATE_HINT
from akidb_embed.worker.batcher import plan_micro_batches
from akidb_embed.worker.config import WorkerConfig
from akidb_embed.worker.providers import CPU, choose_providers

__all__ = ["MODEL_FILE", "TOKENIZER_FILE", "Engine", "TokenIds", "load_engines"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
WARM_UP_LENGTHS = (8, 16, 32)
"""Token counts of the warm-up runs: the range of short search queries (4-30 tokens)."""
WARM_UP_SECONDS = 0.1
"""At most this long (a little over, a run being whole) is spent warming shapes up at load."""

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
    # Lanes run several graphs at once on this session, each on its own lane thread, which
    # also works through its graph's parallel sections with the threads - 1 pool threads
    # (shared by the lanes); each graph's nodes run in order: no inter-op pool.
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
        self._tokenizer_path = tokenizer_path
        self._truncating = {"right": self._tokenizer("right")}
        """One tokenizer per truncation side; the left one is made on first use."""
        self._tokenizers_lock = threading.Lock()
        # a second instance that never truncates, to report an over-long input's real length
        self._whole = self._tokenizer(None)
        self._calibration: npt.NDArray[np.float32] | None = None
        self._ranges: dict[tuple[int, bool], npt.NDArray[np.float32]] = {}
        """int8/uint8 ranges per (dimensions, normalize), taken from the calibration vectors."""

    def _tokenizer(self, truncation_side: str | None) -> Tokenizer:
        """A tokenizer without padding, truncating at ``max_tokens`` on ``truncation_side``
        (None: never truncating)."""
        tokenizer = Tokenizer.from_file(str(self._tokenizer_path))
        tokenizer.no_padding()
        if truncation_side is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(
                max_length=self.metadata.max_tokens, direction=truncation_side
            )
        return tokenizer

    def _truncating_tokenizer(self, truncation_side: str) -> Tokenizer:
        tokenizer = self._truncating.get(truncation_side)
        if tokenizer is None:
            with self._tokenizers_lock:
                tokenizer = self._truncating.get(truncation_side)
                if tokenizer is None:
                    tokenizer = self._truncating[truncation_side] = self._tokenizer(truncation_side)
        return tokenizer

    @classmethod
    def load(cls, config: WorkerConfig | None = None, model_dir: Path | None = None) -> Engine:
        """Load ``model_dir`` (default: the configuration's default model directory) with the
        settings of ``config`` (default settings when omitted) and check that the model produces
        vectors of the dimension its metadata states."""
        config = config or WorkerConfig()
        return cls.open(load_metadata(model_dir or config.model_dir), config)

    @classmethod
    def open(cls, metadata: ModelMetadata, config: WorkerConfig) -> Engine:
        """The engine of a model whose metadata is already read (provisioning checks a model
        directory it is still building this way)."""
        if metadata.pooling not in POOLING_MODES:
            raise ModelNotFound(
                f"model {metadata.model} uses {metadata.pooling!r} pooling; "
                f"this worker implements {', '.join(POOLING_MODES)}"
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
    def encodings(self) -> list[str]:
        """The encodings this model's replies may take: int8 and uint8 only with calibration
        vectors in its directory."""
        calibrated = bool(self.metadata.calibration)
        return [name for name in ENCODINGS if calibrated or name not in RANGED_ENCODINGS]

    @property
    def providers(self) -> list[str]:
        """The session's execution providers, in priority order."""
        return list(self._session.get_providers())

    def _check_dimension(self) -> None:
        # also the first warm-up run: the first real request does not pay for lazy set-up
        probe = self.run(self.tokenize(["warm-up"]))
        if probe.shape != (1, self.metadata.dimension):
            raise ModelNotFound(
                f"{self.metadata.path(MODEL_FILE)} produces vectors of shape {probe.shape[1:]}, "
                f"its metadata says dimension {self.metadata.dimension}"
            )
        self._warm_up()

    def _warm_up(self) -> None:
        """Run the shapes of the first queries once (one text of WARM_UP_LENGTHS tokens), so
        that the first calls after start are as fast as later ones: an execution provider
        that compiles per shape (CoreML) does it here, not on a user's query. Bounded by
        WARM_UP_SECONDS (each length is run whole; the next is not started after that)."""
        started = time.perf_counter()
        (ids,) = self.tokenize([" ".join(["warm"] * max(WARM_UP_LENGTHS))])
        for length in WARM_UP_LENGTHS:
            if time.perf_counter() - started > WARM_UP_SECONDS or length > len(ids):
                break
            # the text's first tokens and its last (an end token, if the model has one)
            self.run([np.concatenate([ids[: length - 1], ids[-1:]])])

    def output_form(
        self, dimensions: int | None, normalize: bool, encoding: str = DEFAULT_ENCODING
    ) -> OutputForm:
        """What a request's vectors become (``dimensions`` None: all of them), or
        ``InvalidInput`` naming the field: ``dimensions`` out of range, or int8/uint8 for a
        model directory without calibration vectors (it says how to add them)."""
        metadata = self.metadata
        kept = check_dimensions(dimensions, metadata.dimension, encoding, metadata.model)
        ranges = None
        if encoding in RANGED_ENCODINGS:
            ranges = self._ranges.get((kept, normalize))
            if ranges is None:
                ranges = quantization_ranges(self._calibration_vectors(encoding), kept, normalize)
                self._ranges[(kept, normalize)] = ranges
        return OutputForm(kept, normalize, encoding, ranges)

    def _calibration_vectors(self, encoding: str) -> npt.NDArray[np.float32]:
        if self._calibration is None:
            metadata = self.metadata
            path = metadata.path(CALIBRATION_FILE)
            if not metadata.calibration or not path.is_file():
                raise InvalidInput(
                    f"encoding {encoding!r} needs the calibration vectors of {metadata.model}, "
                    f"which its directory {metadata.directory} lacks (provisioned before they "
                    f"existed): run `python -m akidb_embed.models provision --model-dir "
                    f"{metadata.directory}` (`make models` in a checkout) to add them"
                )
            vectors = np.load(path, allow_pickle=False)
            if vectors.ndim != 2 or vectors.shape[1] != metadata.dimension:
                raise Internal(f"{path} holds an array of shape {vectors.shape}")
            self._calibration = vectors.astype(np.float32, copy=False)
        return self._calibration

    def resolve_prompt(self, prompt_name: str | None) -> tuple[str, int]:
        """The text put before each input for ``prompt_name`` (None: the model's default
        prompt, if any) and how many leading tokens pooling then skips; ``InvalidInput``
        listing the model's prompt names for a name it does not have."""
        metadata = self.metadata
        name = metadata.default_prompt_name if prompt_name is None else prompt_name
        if name is None:
            return "", 0
        if name not in metadata.prompts:
            known = ", ".join(repr(n) for n in metadata.prompts)
            offer = f"its prompts are {known}" if known else "it has no prompts"
            raise InvalidInput(f"prompt_name {name!r} is not a prompt of {metadata.model}; {offer}")
        text = metadata.prompts[name]
        skip = 0 if metadata.include_prompt or not text else metadata.prompt_lengths.get(name, 0)
        return text, skip

    def tokenize(
        self,
        texts: Sequence[str],
        truncate: bool = True,
        prompt: str = "",
        truncation_side: str = "right",
    ) -> list[TokenIds]:
        """Token ids of each text (after ``prompt``), special tokens included, an over-long one
        cut to ``max_tokens`` on ``truncation_side`` (``left``: it keeps its end, the prompt
        going first, as sentence-transformers cuts with ``tokenizer.truncation_side = "left"``).
        With ``truncate`` false, an input longer than ``max_tokens`` raises ``InvalidInput``
        naming its index and length."""
        if prompt:
            texts = [prompt + text for text in texts]
        # encode_batch even for one text: it releases the GIL while it works and ``encode`` does
        # not (measured, 16 in-process callers of one text: 152-160 requests/s with
        # encode_batch, 138-139 with encode, which saves ~20 us on a lone call)
        if truncate:
            encodings = self._truncating_tokenizer(truncation_side).encode_batch(list(texts))
        else:
            encodings = self._whole.encode_batch(list(texts))
            limit = self.metadata.max_tokens
            for index, encoding in enumerate(encodings):
                if len(encoding.ids) > limit:
                    raise InvalidInput(
                        f"inputs[{index}] has {len(encoding.ids)} tokens, more than max_tokens="
                        f"{limit}; shorten it or {TRUNCATE_HINT}",
                        index,
                    )
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def run(
        self,
        token_ids: Sequence[TokenIds],
        normalize: bool = False,
        skip_tokens: Sequence[int] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Vectors of one micro-batch: padded to its longest row on the model's padding side,
        pooled by the model's mode; ``skip_tokens[i]`` leading tokens of row ``i`` (a prompt)
        are left out of pooling."""
        hidden, attention_mask = self.forward(token_ids)
        return self.pool(hidden, attention_mask, skip_tokens, normalize)

    def forward(self, token_ids: Sequence[TokenIds]) -> tuple[npt.NDArray[np.float32], TokenIds]:
        """The ONNX Runtime run of one micro-batch: its hidden states and attention mask."""
        feeds = self.feeds(token_ids)
        (hidden,) = self._session.run([self._output_name], feeds)
        return hidden, feeds["attention_mask"]

    def feeds(self, token_ids: Sequence[TokenIds]) -> dict[str, TokenIds]:
        """The ONNX Runtime inputs of one micro-batch: ids padded to its longest row on the
        model's padding side, the attention mask, and token type ids when the graph has them."""
        metadata = self.metadata
        longest = max(len(ids) for ids in token_ids)
        input_ids = np.full((len(token_ids), longest), metadata.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        left = metadata.padding_side == "left"
        for row, ids in enumerate(token_ids):
            span = slice(longest - len(ids), longest) if left else slice(0, len(ids))
            input_ids[row, span] = ids
            attention_mask[row, span] = 1
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return feeds

    def pool(
        self,
        hidden: npt.NDArray[np.float32],
        attention_mask: TokenIds,
        skip_tokens: Sequence[int] | None = None,
        normalize: bool = False,
    ) -> npt.NDArray[np.float32]:
        """One vector per row of ``forward``'s hidden states, by the model's pooling mode."""
        mask = pooling_mask(attention_mask, skip_tokens or [0] * len(attention_mask))
        pooled = pool(self.metadata.pooling, hidden, mask)
        return l2_normalize(pooled) if normalize else pooled

    def embed(
        self,
        texts: Sequence[str],
        normalize: bool | None = None,
        truncate: bool = True,
        prompt_name: str | None = None,
        truncation_side: str = "right",
    ) -> npt.NDArray[np.float32]:
        """The (len(texts), dimension) vectors of ``texts``, in order, run in micro-batches under
        ``max_batch_tokens`` (in-process use: no worker, no queue). ``normalize`` None: the
        model's default; ``prompt_name`` None: the model's default prompt."""
        prompt, skip = self.resolve_prompt(prompt_name)
        token_ids = self.tokenize(texts, truncate, prompt, truncation_side)
        if normalize is None:
            normalize = self.metadata.normalize
        result = np.empty((len(texts), self.metadata.dimension), dtype=np.float32)
        for batch in plan_micro_batches([len(ids) for ids in token_ids], self.max_batch_tokens):
            rows = [token_ids[i] for i in batch]
            result[batch] = self.run(rows, normalize, [skip] * len(rows))
        return result


def load_engines(config: WorkerConfig) -> list[Engine]:
    """An engine for each model directory of ``config``, the default model first; loading
    fails (``ModelNotFound`` naming the directory) when two directories hold the same model id
    or one cannot be loaded."""
    engines: list[Engine] = []
    for model_dir in config.model_dirs:
        try:
            engine = Engine.load(config, model_dir)
        except ModelNotFound as exc:
            message = exc.message
            if str(model_dir) not in message:
                message = f"model directory {model_dir}: {message}"
            raise ModelNotFound(message) from None
        for other in engines:
            if other.metadata.model == engine.metadata.model:
                raise ModelNotFound(
                    f"model directories {other.metadata.directory} and {model_dir} both hold "
                    f"{engine.metadata.model!r}; each model may be loaded once"
                )
        engines.append(engine)
    return engines
