"""The benchmark's mixed-length corpus of real English text, built reproducibly offline.

The text is the documentation of Python's standard library (the docstrings of a fixed list of
modules), so no download is needed and every machine with the same Python builds the same
corpus; ``corpus_digest`` names it so that results from different runs can be compared.

Texts come in three lengths, shuffled with a fixed seed:
- short: one paragraph's first sentence (about 5 to 30 tokens), the common search-query case;
- medium: one paragraph (about 30 to 150 tokens);
- long: consecutive paragraphs joined to more than 256 tokens, which the model truncates.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
import warnings
from collections.abc import Sequence

__all__ = ["SOURCE_MODULES", "build_corpus", "corpus_digest", "docstring_paragraphs"]

SOURCE_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "email", "enum", "functools", "heapq", "http.client",
    "inspect", "io", "itertools", "json", "logging", "multiprocessing", "os", "pathlib",
    "queue", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest",
    "urllib.parse", "uuid", "zipfile",
)  # fmt: skip

SHORT_SHARE, MEDIUM_SHARE = 0.5, 0.35  # the rest is long
LONG_TEXT_MIN_CHARS = 1600  # comfortably above 256 word pieces of English prose


def docstring_paragraphs(
    modules: Sequence[str] = SOURCE_MODULES, methods: bool = False
) -> list[str]:
    """The distinct paragraphs (over 40 characters, no doctest or list lines) of the docstrings
    of the functions and classes of ``modules`` (and of the classes' methods when ``methods``),
    in a fixed order."""
    seen: dict[str, None] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for obj in _documented(vars(module), methods):
            with warnings.catch_warnings():  # typing's deprecated typing.io / typing.re
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            for block in re.split(r"\n\s*\n", doc or ""):
                text = " ".join(block.split())
                if len(text) > 40 and not text.startswith((">>>", "..", "-")):
                    seen.setdefault(text, None)
    return list(seen)


def _documented(namespace: dict[str, object], methods: bool) -> list[object]:
    found: list[object] = []
    for _, obj in sorted(namespace.items()):
        if inspect.isfunction(obj) or inspect.isclass(obj):
            found.append(obj)
            if methods and inspect.isclass(obj):
                found.extend(m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m))
    return found


def _first_sentence(paragraph: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


def build_corpus(size: int = 1000, seed: int = 20261124) -> list[str]:
    """``size`` texts of mixed length, the same for the same ``size``, ``seed`` and Python."""
    paragraphs = docstring_paragraphs()
    rng = random.Random(seed)
    texts: list[str] = []
    n_short = round(size * SHORT_SHARE)
    n_medium = round(size * MEDIUM_SHARE)
    for index in range(size):
        start = rng.randrange(len(paragraphs))
        if index < n_short:
            texts.append(_first_sentence(paragraphs[start]))
        elif index < n_short + n_medium:
            texts.append(paragraphs[start])
        else:
            parts: list[str] = []
            position = start
            while sum(len(p) + 1 for p in parts) < LONG_TEXT_MIN_CHARS:
                parts.append(paragraphs[position % len(paragraphs)])
                position += 1
            texts.append(" ".join(parts))
    rng.shuffle(texts)
    return texts


def corpus_digest(texts: list[str]) -> str:
    """A short fingerprint of a corpus, to tell whether two runs measured the same texts."""
    digest = hashlib.sha256("\x1e".join(texts).encode("utf-8"))
    return digest.hexdigest()[:16]
