"""The quality gate of a quantised variant: its thresholds, and the texts it is measured on.

``Gate``: what a variant must keep of the fp32 model (recall@10 of corpus neighbours and min
cosine, both >= 0.98 by default). ``quantize.py`` compares a variant's vectors with the fp32
model's on real English text: the distinct paragraphs of the docstrings of a fixed list of
standard-library modules (functions, classes and their methods), so no download is needed and
the same Python builds the same texts. They are shuffled with a fixed seed and split in two
disjoint parts::

    docstring paragraphs (about 4,400 on CPython 3.11) --shuffle(seed)--> evaluation (2,000)
                                                                      +-> calibration (256)

The evaluation texts measure recall@10 and cosine against fp32; the calibration texts feed a
static recipe's activation ranges, so no text is both calibrated on and judged by. Lengths are
those of the paragraphs: mostly one or two sentences, some over the model's max tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from akidb_embed.bench.corpus import corpus_digest, docstring_paragraphs

__all__ = [
    "CALIBRATION_TEXTS",
    "DEFAULT_GATE",
    "EVALUATION_TEXTS",
    "GATE_MODULES",
    "Gate",
    "GateCorpus",
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
    """The first ``evaluation`` shuffled paragraphs to judge on, the next ``calibration`` to
    calibrate with; the same for the same sizes and Python. ``ValueError`` when the standard
    library documents fewer paragraphs than asked for."""
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
