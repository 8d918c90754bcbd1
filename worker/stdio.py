"""The fd guard: the protocol gets private copies of stdin and stdout, nothing else touches them.

::

    before:  fd 0 = host's request pipe     fd 1 = host's reply pipe     fd 2 = log
    after:   fd 0 = /dev/null               fd 1 = same as fd 2 (log)    fd 2 = log
             protocol_in  = dup of the request pipe   (close-on-exec, private)
             protocol_out = dup of the reply pipe     (close-on-exec, private)

A stray ``print()``, a C library writing to fd 1, or a child process inheriting fds 0 and 1
then writes to the log and reads an empty stdin, instead of corrupting the frame stream or
swallowing requests. ``guard_stdio`` must run before onnxruntime or tokenizers are imported.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["configure_logging", "guard_stdio"]


def guard_stdio() -> tuple[int, int]:
    """Move the protocol onto private fds and neutralise fds 0 and 1; returns
    ``(protocol_in, protocol_out)``."""
    sys.stdout.flush()
    try:
        os.fstat(2)
    except OSError:  # spawned with stderr closed: logs go nowhere, but fd 1 still leaves the pipe
        null_out = os.open(os.devnull, os.O_WRONLY)
        if null_out != 2:
            os.dup2(null_out, 2)
            os.close(null_out)
    # os.dup makes non-inheritable fds (PEP 446): child processes never see the protocol
    protocol_in = os.dup(0)
    protocol_out = os.dup(1)
    os.dup2(2, 1)
    null_in = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_in, 0)
    os.close(null_in)
    sys.stdout = sys.stderr
    return protocol_in, protocol_out


def configure_logging(level: int = logging.INFO) -> None:
    """Log lines on stderr, marked with the worker's pid (the host may interleave several)."""
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="akidb-embed-worker[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
