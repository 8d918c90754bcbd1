"""The quality gate of a quantised variant: its thresholds, and the texts it is measured on.

``Gate``: what a variant must keep of the fp32 model (recall@10 of corpus neighbours and min
cosine, both >= 0.98 by default). ``quantize.py`` compares a variant's vectors with the fp32
model's on real English text shipped with the project, ``gate_corpus.txt`` (one text a line):
2,000 evaluation texts, then 256 calibration texts, disjoint::

    gate_corpus.txt --> evaluation (lines 1-2,000)    recall@10 and cosine against fp32
                    +-> calibration (2,001-2,256)    a static recipe's activation ranges, the
                                                     SmoothQuant scales, GPTQ's statistics

so no text is both calibrated on and judged by. Lengths are those of documentation paragraphs:
mostly one or two sentences, some over the model's max tokens.

The file was drawn once (``draw_from_docstrings``, ``python -m akidb_embed.models.gate_corpus``
in a fresh CPython 3.11 interpreter): the distinct paragraphs of the docstrings of a fixed list
of standard-library modules (functions, classes and their methods), shuffled with a fixed seed.
It is shipped rather than drawn at each run because the draw depends on its interpreter: a
module imported earlier can patch one docstring (typing_extensions replaces
``typing._collect_parameters``), and one paragraph more reshuffles every text; so do other
Python versions' docstrings.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

from akidb_embed.bench.corpus import corpus_digest, docstring_paragraphs

__all__ = [
    "CALIBRATION_TEXTS",
    "CORPUS_FILE",
    "DEFAULT_GATE",
    "EVALUATION_TEXTS",
    "GATE_MODULES",
    "Gate",
    "GateCorpus",
    "draw_from_docstrings",
    "gate_corpus",
]

GATE_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "configparser", "contextlib", "copy", "csv", "ctypes", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "email", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "lzma", "mailbox", "mimetypes",
    "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3",
    "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "wave", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zipimport",
)  # fmt: skip
EVALUATION_TEXTS = 2000
CALIBRATION_TEXTS = 256
SEED = 20261204
CORPUS_FILE = Path(__file__).with_name("gate_corpus.txt")
"""The texts, one a line: the evaluation texts, then the calibration texts."""


@dataclass(frozen=True)
class Gate:
    """What a variant must keep of the fp32 model, measured on the evaluation texts."""

    min_recall: float = 0.98
    """Mean share of each text's ``neighbours`` nearest texts (by fp32 vectors) that the
    variant's vectors find too."""
    min_cosine: float = 0.98
    """Least cosine between a text's variant vector and its fp32 vector."""
    neighbours: int = 10


DEFAULT_GATE = Gate()


@dataclass(frozen=True)
class GateCorpus:
    """Evaluation and calibration texts (disjoint), and a fingerprint of each."""

    evaluation: list[str]
    calibration: list[str]

    @property
    def evaluation_digest(self) -> str:
        return corpus_digest(self.evaluation)

    @property
    def calibration_digest(self) -> str:
        return corpus_digest(self.calibration)


def gate_corpus(
    evaluation: int = EVALUATION_TEXTS, calibration: int = CALIBRATION_TEXTS
) -> GateCorpus:
    """The first ``evaluation`` texts of ``CORPUS_FILE`` to judge on, the ``calibration`` texts
    after its evaluation texts to calibrate with; the same wherever it runs."""
    lines = CORPUS_FILE.read_text(encoding="utf-8").splitlines()
    if evaluation > EVALUATION_TEXTS or calibration > len(lines) - EVALUATION_TEXTS:
        raise ValueError(
            f"{evaluation} + {calibration} texts asked for, {CORPUS_FILE.name} holds "
            f"{EVALUATION_TEXTS} + {len(lines) - EVALUATION_TEXTS}"
        )
    return GateCorpus(
        evaluation=lines[:evaluation],
        calibration=lines[EVALUATION_TEXTS : EVALUATION_TEXTS + calibration],
    )


def draw_from_docstrings(
    evaluation: int = EVALUATION_TEXTS, calibration: int = CALIBRATION_TEXTS
) -> GateCorpus:
    """How ``CORPUS_FILE`` was drawn: the distinct paragraphs of ``GATE_MODULES``' docstrings,
    shuffled with ``SEED``, the first ``evaluation`` to judge on and the next ``calibration``
    to calibrate with. ``ValueError`` when the standard library documents fewer paragraphs
    than asked for."""
    paragraphs = docstring_paragraphs(GATE_MODULES, methods=True)
    if evaluation + calibration > len(paragraphs):
        raise ValueError(
            f"{evaluation} + {calibration} texts asked for, the documentation has "
            f"{len(paragraphs)} paragraphs"
        )
    random.Random(SEED).shuffle(paragraphs)
    return GateCorpus(
        evaluation=paragraphs[:evaluation],
        calibration=paragraphs[evaluation : evaluation + calibration],
    )


if __name__ == "__main__":  # the draw, one text a line: ... > models/gate_corpus.txt
    drawn = draw_from_docstrings()
    sys.stdout.writelines(f"{text}\n" for text in drawn.evaluation + drawn.calibration)
