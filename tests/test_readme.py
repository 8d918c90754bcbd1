"""The README stays true: its shell and Python examples run as written.

Each ``sh`` block is cut into commands (one a line, a trailing backslash joining the next) and
each command runs in bash; each ``python`` block runs whole. They run in a scratch directory
that holds the files the examples name (``texts.txt``, ``docs.jsonl``) and links to the
checkout's ``models/`` and ``.venv/``, with the environment's ``bin/`` first on PATH and HOME
inside the scratch directory, so that nothing outside it changes.

A command that needs what a test run cannot have (the network, minutes, a Ray cluster, a model
directory of your own) is left out by ``NOT_RUN``, with the reason, and every entry there must
still match a command of the README. A command that names a model directory that is not
provisioned here still runs: it must fail saying just that, so its options parsed as written.

The README is a user's page: at most ``MAX_README_LINES`` lines, the measurements and design
notes living in docs/. Every relative link of the README, of the pages under docs/ and of
protocol.md points at a file that exists, and a link's ``#anchor`` at a heading of that file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent
README = (CHECKOUT / "README.md").read_text(encoding="utf-8")
TIMEOUT = 300
MAX_README_LINES = 350
LINKED_PAGES = ("README.md", "protocol.md", "docs/*.md")
"""The Markdown pages whose relative links must resolve (globs under the checkout)."""

NOT_RUN = {
    "make demo": "creates .venv, installs and provisions the model: what `make test` did first",
    "make test": "the whole suite, this test included",
    "pip install": "installs packages (from the network)",
    "akidb-embed bench": "a benchmark: minutes of measuring",
    "akidb-embed embed --input docs.jsonl --id-field id --output vectors.parquet --ray": (
        "needs the ray extra and a Ray cluster (`make test-ray` runs the Ray job)"
    ),
    "python -m akidb_embed.models provision --source-dir ~/my-e5-model": (
        "needs a sentence-transformers model directory of your own"
    ),
    "akidb-embed serve": (
        "a server, running until stopped: tests/test_serve.py starts it on a free port and "
        "calls it with curl's body and OpenAI's client"
    ),
    "curl -s http://127.0.0.1:8081/v1/embeddings": "needs the server above (tests/test_serve.py)",
}
NOT_RUN_PYTHON = {
    "from openai import OpenAI": "needs the server above (tests/test_serve.py runs this client)",
}
"""Python examples left out, by their first line, with the reason."""
NOT_PROVISIONED_HERE = ("models/e5",)
"""Model directories the examples name that `make` does not provision."""


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def shell_commands() -> list[str]:
    commands = []
    for block in blocks("sh"):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                commands.append(command.strip())
    return commands


def runnable(command: str) -> bool:
    return not any(command.startswith(start) for start in NOT_RUN)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("readme")
    (directory / "texts.txt").write_text("a cat on a mat\na dog on a log\n", encoding="utf-8")
    docs = [{"id": f"doc-{n}", "text": f"document number {n}"} for n in range(3)]
    (directory / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "models").symlink_to(CHECKOUT / "models")
    (directory / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (directory / "home").mkdir()
    return directory


def run(command: list[str], scratch: Path) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("AKIDB_EMBED_MODEL_DIR", "XDG_CACHE_HOME", "VIRTUAL_ENV")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(scratch / "home")
    return subprocess.run(
        command, cwd=scratch, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


@pytest.mark.parametrize("command", [c for c in shell_commands() if runnable(c)])
def test_each_shell_command_runs_as_written(command: str, scratch: Path) -> None:
    result = run(["bash", "-c", command], scratch)
    missing = [name for name in NOT_PROVISIONED_HERE if name in command]
    if missing and not (CHECKOUT / missing[0]).is_dir():
        # parsed as written, and refused for the one thing this checkout lacks
        assert result.returncode == 2, result.stderr
        assert f"no model at {missing[0]}" in result.stderr, result.stderr
        return
    assert result.returncode == 0, f"{command}\n{result.stderr}"


def python_runnable(block: str) -> bool:
    return not any(block.startswith(start) for start in NOT_RUN_PYTHON)


@pytest.mark.parametrize("block", [b for b in blocks("python") if python_runnable(b)])
def test_each_python_example_runs_as_written(block: str, scratch: Path) -> None:
    result = run([sys.executable, "-c", block], scratch)
    assert result.returncode == 0, result.stderr


def test_every_command_not_run_is_still_in_the_readme() -> None:
    commands = shell_commands()
    for start in NOT_RUN:
        assert any(command.startswith(start) for command in commands), start
    for start in NOT_RUN_PYTHON:
        assert any(block.startswith(start) for block in blocks("python")), start


def test_the_readme_is_a_page_of_at_most_max_readme_lines() -> None:
    lines = len(README.splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


def without_code(markdown: str) -> str:
    """``markdown`` without fenced blocks and inline code, where brackets are not links."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", prose)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page``: lower case, punctuation dropped,
    spaces to hyphens, a repeated one numbered."""
    seen: dict[str, int] = {}
    found = set()
    prose = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    targets = re.findall(r"\]\(([^()\s]+)\)", without_code(page.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


PAGES = sorted({page for pattern in LINKED_PAGES for page in CHECKOUT.glob(pattern)})


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(CHECKOUT)))
def test_every_relative_link_points_at_an_existing_file_and_heading(page: Path) -> None:
    broken = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading with that anchor in {target.name}")
    assert not broken, f"{page.relative_to(CHECKOUT)}: " + "; ".join(broken)


def test_the_link_checker_sees_the_readme_links() -> None:
    # a checker that found no link would pass whatever the pages say
    links = relative_links(CHECKOUT / "README.md")
    assert "docs/performance.md" in links
    assert "protocol.md" in links
    assert "int8-variants" in anchors(CHECKOUT / "README.md")
