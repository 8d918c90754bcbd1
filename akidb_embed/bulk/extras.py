"""Optional extras of a bulk job: a module imported, or one line naming the extra that installs
it (Parquet needs pyarrow, ``--ray`` needs Ray), checked before any work is done."""

from __future__ import annotations

import importlib
from typing import Any

from akidb_embed.errors import ServiceUnavailable

__all__ = ["require_extra", "require_pyarrow"]


def require_extra(module: str, extra: str, purpose: str) -> Any:
    """``module`` imported, or ``ServiceUnavailable`` naming the extra of akidb-embed that
    installs it (checked before any work, so that a missing one costs nothing)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ServiceUnavailable(
            f"{purpose} needs {module.split('.')[0]}, which the `{extra}` extra installs "
            f"(pip install -e '.[{extra}]' in the checkout)"
        ) from None


def require_pyarrow() -> Any:
    return require_extra("pyarrow.parquet", "files", "Parquet input and output")
