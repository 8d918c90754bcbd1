"""Golden vectors: proof that a model.onnx run by our pipeline gives the reference's vectors.

::

    GOLDEN_SENTENCES, for every mode (each prompt name and none, normalize on and off)
           |
           +--sentence-transformers (reference_dir, CPU, offline)--> reference vectors
           |                                                                      |
           +--the worker's own Engine (prompt, tokenizer, ONNX Runtime, pooling,  |
              normalisation: exactly what a request runs through) --> ours        |
                                                                  |               |
                                      cosine per sentence, max |ours - reference| <+
                                      min cosine < MIN_COSINE in any mode -> provisioning
                                      fails, printing the figures; else golden.json = the
                                      reference vectors of the model's default mode

``golden.json`` (plain JSON, read by the Python and Rust test suites)::

    {"model": str, "dimension": int, "max_tokens": int, "normalize": bool, "reference": str,
     "sentences": [str], "token_counts": [int], "embeddings": [[float]]}

``token_counts`` are the tokens each sentence is run with (special tokens included, after
truncation), as the wire protocol's ``usage.total_tokens`` counts them.

Our vectors come from ``akidb_embed.worker.engine.Engine``, the code that serves requests, so
the check proves what the worker answers. numpy is imported here; onnxruntime and tokenizers
(worker run-time dependencies) with the engine; sentence-transformers only inside
``reference_embeddings``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from akidb_embed.worker.engine import Engine

__all__ = [
    "GOLDEN_SENTENCES",
    "MIN_COSINE",
    "Golden",
    "Mode",
    "Parity",
    "compare",
    "modes",
    "read_golden",
    "reference_embeddings",
    "token_counts",
    "write_golden",
]

MIN_COSINE = 0.99999
"""Smallest cosine between our vector and the reference's that passes, for every sentence."""
VERIFY_BATCH_SIZE = 8
"""Sentences per ONNX Runtime run in the check: mixed lengths per batch exercise the padding."""

_LONG_ESSAY = (
    "Vector databases have become a standard part of search and recommendation systems. "
    "Instead of matching keywords, they store a numerical representation of each document, "
    "called an embedding, and answer a query by finding the stored vectors closest to the "
    "query's own vector. The quality of the results therefore depends almost entirely on the "
    "embedding model: two texts that mean the same thing should land near each other, even when "
    "they share no words, while texts about different subjects should stay far apart. Small "
    "models such as MiniLM trade a little accuracy for a large gain in speed, which matters "
    "when millions of documents must be indexed on ordinary hardware. Because the model only "
    "reads a limited number of tokens, long documents are usually split into passages before "
    "they are embedded, and each passage is stored with a pointer back to its source. Choosing "
    "the passage length is a compromise: short passages give precise matches but lose context, "
    "long ones keep context but blur the meaning of the vector. Teams that run such systems in "
    "production also care about reproducibility, since a model that silently changes its "
    "tokenizer settings or its pooling produces vectors that no longer match the ones already "
    "in the index, and every stored document would then have to be embedded again."
)
_LONG_REPORT = (
    "Incident report, storage cluster B, night shift. At 02:14 the monitoring system raised an "
    "alert for elevated write latency on three of the twelve nodes. The on-call engineer "
    "acknowledged the alert at 02:19 and began by checking the disk health counters, which were "
    "normal; the network dashboards, however, showed intermittent packet loss between two racks. "
    "After draining traffic from the affected nodes, latency returned to its usual level within "
    "four minutes. A faulty optical transceiver in the top-of-rack switch was identified as the "
    "probable cause and replaced at 03:05. No data was lost, because every write is replicated "
    "to three nodes before it is acknowledged, but about 0.4% of client requests timed out "
    "during the event and were retried automatically. Follow-up actions: add an alert on "
    "interface error counters, document the draining procedure in the runbook, and review "
    "whether the retry budget of the client library is large enough. The post-mortem meeting "
    "is scheduled for Thursday at 10:00; everyone who was paged is invited, and the timeline "
    "above will be refined with the switch logs before then. Until the review is complete, "
    "please do not change the replication settings of the cluster, and report any further "
    "latency spikes in the incident channel together with the node names and the exact times "
    "at which they were observed, so that they can be correlated with the network logs. "
    "Lessons learned so far: the alert fired quickly, but it took too long to rule out the "
    "disks, because the dashboards for the network and for storage live in different tools. "
    "We will link them from the alert itself. The spare transceivers in the data centre were "
    "also found to be from an older batch, and the supplier has been asked to confirm that they "
    "are not affected by the same defect. Thanks to everyone who helped during the night."
)
_MEDIUM_PARAGRAPH = (
    "The museum's new wing, which opened to the public last spring after nearly six years of "
    "construction, houses a collection of more than two thousand maps, charts and globes. "
    "Visitors can follow the history of navigation from hand-drawn portolan charts of the "
    "Mediterranean to the satellite imagery used by today's shipping companies, and a large "
    "interactive table lets children plan a voyage across the Atlantic, choosing a season, a "
    "ship and a route while learning why sailors feared the doldrums and the winter storms."
)

GOLDEN_SENTENCES: tuple[str, ...] = (
    "",
    "ok",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Someone is strumming an acoustic guitar outdoors.",
    "How do I reset my password if I no longer have access to my email account?",
    "Vector search finds the nearest neighbours of a query embedding.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Le chat dort sur le canapé depuis ce matin.",
    "Der Zug nach München hat heute zwanzig Minuten Verspätung.",
    "¿Dónde está la biblioteca más cercana?",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "Wait... what?! That's $1,299.99 (plus tax) -- really? Yes; really.",
    "See https://example.com/search?q=embeddings&lang=en for details, or mail help@example.org.",
    "def add(a, b): return a + b  # adds two numbers",
    "   leading and trailing whitespace\tand a tab   ",
    "Naïve café owners rarely résumé their coöperation.",
    _MEDIUM_PARAGRAPH,
    _LONG_ESSAY,
    _LONG_REPORT,
)
"""The fixed check set: short and long, several languages, punctuation, an empty string, and
texts past 128 tokens (the shipped tokenizer's stale limit) and past 256 (the model's limit)."""


@dataclass(frozen=True)
class Parity:
    """How close our pipeline's vectors are to the reference's."""

    reference: str
    sentences: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    threshold: float = MIN_COSINE
    verified: bool = True

    @property
    def passes(self) -> bool:
        return self.min_cosine >= self.threshold

    def describe(self) -> str:
        return (
            f"min cosine {self.min_cosine:.7f} (threshold {self.threshold}), mean "
            f"{self.mean_cosine:.7f}, max abs diff {self.max_abs_diff:.3g} over "
            f"{self.sentences} sentences, against {self.reference}"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Golden:
    """Reference vectors of a fixed sentence set, as stored in golden.json."""

    model: str
    dimension: int
    max_tokens: int
    normalize: bool
    reference: str
    sentences: list[str]
    token_counts: list[int]
    embeddings: npt.NDArray[np.float32]


@dataclass(frozen=True)
class Mode:
    """One way a model can be asked for vectors: a prompt name (None: the model's default
    prompt, if any) and whether the vectors are L2-normalised."""

    prompt_name: str | None
    normalize: bool

    def describe(self) -> str:
        prompt = "default prompt" if self.prompt_name is None else f"prompt {self.prompt_name!r}"
        return f"{prompt}, normalize {'on' if self.normalize else 'off'}"


def modes(prompt_names: Sequence[str]) -> list[Mode]:
    """Every mode the parity check covers: each prompt name and none, normalize on and off."""
    return [Mode(name, normalize) for name in (None, *prompt_names) for normalize in (True, False)]


def reference_embeddings(
    reference_dir: Path, sentences: Sequence[str], checked: Sequence[Mode]
) -> tuple[list[npt.NDArray[np.float32]], str]:
    """sentence-transformers' vectors of ``sentences`` from the model in ``reference_dir`` (CPU,
    offline) in each mode of ``checked``, and a label naming the reference and its version.

    A model whose module chain ends in Normalize gives normalised vectors whatever
    ``encode`` is told; its un-normalised vectors are those of the chain without that module."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    import torch

    # float32 whatever config.json declares: a bfloat16 reference would differ from the ONNX
    # export (float32) by more than the threshold
    model = SentenceTransformer(
        str(reference_dir),
        device="cpu",
        local_files_only=True,
        model_kwargs={"dtype": torch.float32},
    )
    ends_normalized = type(model[len(model) - 1]).__name__ == "Normalize"

    def encode(mode: Mode) -> npt.NDArray[np.float32]:
        vectors = model.encode(
            list(sentences),
            prompt_name=mode.prompt_name,
            batch_size=VERIFY_BATCH_SIZE,
            convert_to_numpy=True,
            show_progress_bar=False,
            normalize_embeddings=mode.normalize and not ends_normalized,
        )
        return np.asarray(vectors, dtype=np.float32)

    results: dict[Mode, npt.NDArray[np.float32]] = {}
    for mode in checked:
        if mode.normalize or not ends_normalized:
            results[mode] = encode(mode)
    if ends_normalized:
        del model[len(model) - 1]
        for mode in checked:
            if not mode.normalize:
                results[mode] = encode(mode)
    label = f"sentence-transformers {importlib.metadata.version('sentence-transformers')}"
    return [results[mode] for mode in checked], label


def token_counts(engine: Engine, sentences: Sequence[str]) -> list[int]:
    """Tokens each sentence runs with in the model's default mode (after truncation, special
    tokens and the default prompt included), as ``usage.total_tokens`` counts them."""
    prompt, _ = engine.resolve_prompt(None)
    return [len(ids) for ids in engine.tokenize(sentences, prompt=prompt)]


def compare(
    ours: npt.NDArray[np.float32], reference: npt.NDArray[np.float32], label: str
) -> Parity:
    """The parity figures of ``ours`` against ``reference`` (same sentences, same order)."""
    if ours.shape != reference.shape:
        raise ValueError(f"shape {ours.shape} differs from the reference's {reference.shape}")
    ours64, ref64 = ours.astype(np.float64), reference.astype(np.float64)
    norms = np.linalg.norm(ours64, axis=1) * np.linalg.norm(ref64, axis=1)
    cosines = (ours64 * ref64).sum(axis=1) / np.maximum(norms, 1e-30)
    return Parity(
        reference=label,
        sentences=int(ours.shape[0]),
        min_cosine=float(cosines.min()),
        mean_cosine=float(cosines.mean()),
        max_abs_diff=float(np.abs(ours64 - ref64).max()),
    )


def _float32_text(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (keeps golden.json small)."""
    return float(f"{value:.9g}")


def write_golden(path: Path, golden: Golden) -> None:
    document = {
        "model": golden.model,
        "dimension": golden.dimension,
        "max_tokens": golden.max_tokens,
        "normalize": golden.normalize,
        "reference": golden.reference,
        "sentences": golden.sentences,
        "token_counts": golden.token_counts,
        "embeddings": [[_float32_text(x) for x in row] for row in golden.embeddings.tolist()],
    }
    path.write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")


def read_golden(path: Path) -> Golden:
    raw = json.loads(path.read_text(encoding="utf-8"))
    return Golden(
        model=str(raw["model"]),
        dimension=int(raw["dimension"]),
        max_tokens=int(raw["max_tokens"]),
        normalize=bool(raw["normalize"]),
        reference=str(raw["reference"]),
        sentences=[str(s) for s in raw["sentences"]],
        token_counts=[int(n) for n in raw["token_counts"]],
        embeddings=np.asarray(raw["embeddings"], dtype=np.float32),
    )
