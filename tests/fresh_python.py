"""Python code run by a fresh interpreter of this environment: what a test sees only from outside
the test process (the modules an import pulls in, a command's exit and its one-line error when
an extra is missing)."""

from __future__ import annotations

import subprocess
import sys


def run_python(*lines: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``lines`` run as one script by ``python -c``, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=timeout
    )
