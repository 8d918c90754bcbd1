"""The host client's settings and their defaults, defined once.

Both twins (``EmbeddingClient`` and ``AsyncEmbeddingClient``) take these as keyword arguments
and keep the resolved values as a frozen ``ClientConfig`` (``client.config``). The supervision
knobs follow jupyter_client's ``KernelRestarter``: a consecutive-restart budget
(``restart_limit``) that resets once a worker has run for ``stable_start_time``. In a pool
(``workers`` > 1) every knob applies to each worker slot on its own (each slot has its own
restart budget), except ``max_in_flight_texts``, which bounds the whole client.

Timeouts, precisely:

* ``start_timeout``: how long a freshly spawned worker may take to write its hello.
* ``request_timeout``: how long a worker holding requests may go without answering any of them.
  A wire request's clock starts when it is written to a worker and restarts whenever that
  worker delivers a reply, so a worker that is busy working through a deep queue is not taken
  for a hung one, while a hung, stopped or deadlocked worker is killed (SIGKILL) after
  ``request_timeout`` and replaced. For a lone request on an idle worker this is simply "no
  reply within ``request_timeout``". To keep replies coming from a busy worker, the client cuts
  calls into wire requests of about four of the worker's ONNX Runtime runs each (estimated
  from text lengths against ``max_batch_tokens``), a second or so of work on a 2-core CPU.
* ``max_attempts``: how many workers one wire request may be sent to. A worker death or a hang
  costs every request that worker held one attempt; the request is sent again to another ready
  worker of the pool, or to the replacement, while attempts remain, else its call fails with
  ``RequestTimeout`` (the last attempt hung) or ``ServiceUnavailable`` (the last attempt's
  worker died). So a call never waits for a worker longer than about
  ``max_attempts x (request_timeout + start time)`` without progress.
* ``close_timeout``: how long ``close()`` lets the workers finish the requests they already
  hold before killing them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from akidb_embed.cores import auto_workers

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_IN_FLIGHT_TEXTS",
    "DEFAULT_PROVIDER",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_RESTART_LIMIT",
    "DEFAULT_STABLE_START_TIME",
    "DEFAULT_START_TIMEOUT",
    "DEFAULT_WORKERS",
    "DEFAULT_WORKER_MODULE",
    "ClientConfig",
    "resolve_workers",
]

DEFAULT_PROVIDER = "auto"
DEFAULT_WORKERS: Literal["auto"] = "auto"
"""One worker per ``akidb_embed.cores.CPUS_PER_WORKER`` usable CPUs (``auto_workers``): a worker's
lanes fill its cores, and more workers only help once its Python steps are the ceiling."""
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_START_TIMEOUT = 60.0
DEFAULT_CLOSE_TIMEOUT = 10.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RESTART_LIMIT = 5
DEFAULT_STABLE_START_TIME = 10.0
DEFAULT_MAX_IN_FLIGHT_TEXTS = 2048
"""Enough to keep the worker's batcher full (it runs ~2,048 padded tokens at a time) while
keeping the frames held for re-sending small."""

DEFAULT_WORKER_MODULE = "akidb_embed.worker"


@dataclass(frozen=True)
class ClientConfig:
    """How a client spawns and supervises its workers; see the module docstring for timeouts."""

    model_dirs: tuple[Path, ...] = ()
    """Model directories passed to the worker (one ``--model-dir`` each; the first is the
    default model); empty lets the worker use its default (``$AKIDB_EMBED_MODEL_DIR`` or the
    checkout's ``models/all-MiniLM-L6-v2``)."""
    workers: int = 1
    """Worker processes in the pool, each supervised on its own and each serving every model;
    requests go to the one with the fewest estimated tokens in flight. The clients resolve
    ``workers="auto"`` (their default) to a number (``resolve_workers``)."""
    provider: str = DEFAULT_PROVIDER
    """Execution provider asked of the worker (``--provider``): auto, cpu, cuda or coreml."""
    threads: int | None = None
    """ONNX Runtime intra-op threads of each worker's session (``--threads``); ``None``: the
    worker's default, sized for its share of the cores (``akidb_embed.cores.size_lanes``)."""
    lanes: int | None = None
    """ONNX Runtime runs at once in each worker (``--lanes``); ``None``: the worker's default,
    sized for its share of the cores (``akidb_embed.cores.size_lanes``)."""
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    start_timeout: float = DEFAULT_START_TIMEOUT
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    restart_limit: int = DEFAULT_RESTART_LIMIT
    """Consecutive restarts of one worker slot allowed before that slot gives up; once every
    slot has given up, every call fails fast with ``ServiceUnavailable`` naming the last
    death."""
    stable_start_time: float = DEFAULT_STABLE_START_TIME
    """A worker that ran this long after its hello resets the consecutive-restart count."""
    max_in_flight_texts: int = DEFAULT_MAX_IN_FLIGHT_TEXTS
    """Backpressure: texts written to the workers and not yet answered, over all callers and
    the whole pool. More
    waits inside the client (as references to the caller's own strings) until replies come."""
    worker_command: tuple[str, ...] | None = None
    """Replaces ``[sys.executable, "-m", "akidb_embed.worker"]`` as the start of the argv."""
    worker_args: tuple[str, ...] = ()
    """Appended to the argv after the options above (e.g. ``("--max-texts-per-request", "8")``)."""
    env: Mapping[str, str] | None = field(default=None, hash=False)
    """Variables added to (and overriding) this process's environment for the worker."""

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        for name in _NOT_NEGATIVE:
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value!r}")

    def worker_argv(self) -> list[str]:
        """The command line that starts one worker."""
        command = list(self.worker_command or (sys.executable, "-m", DEFAULT_WORKER_MODULE))
        for model_dir in self.model_dirs:
            command += ["--model-dir", str(model_dir)]
        command += ["--provider", self.provider]
        if self.threads is not None:
            command += ["--threads", str(self.threads)]
        if self.lanes is not None:
            command += ["--lanes", str(self.lanes)]
        if self.workers > 1:  # each worker sizes its default lanes x threads for its share
            command += ["--pool-workers", str(self.workers)]
        return command + list(self.worker_args)

    def worker_env(self) -> dict[str, str]:
        """This process's environment with ``env`` laid over it."""
        merged = dict(os.environ)
        merged.update(self.env or {})
        return merged


# The knobs ``ClientConfig`` checks, by name.
_POSITIVE = (
    "request_timeout",
    "start_timeout",
    "max_attempts",
    "max_in_flight_texts",
    "workers",
    "lanes",  # None: the worker's default
)
_NOT_NEGATIVE = ("close_timeout", "restart_limit", "stable_start_time")


def resolve_workers(workers: int | Literal["auto"]) -> int:
    """``workers`` as a number: ``"auto"`` is ``akidb_embed.cores.auto_workers()``."""
    if workers == "auto":
        return auto_workers()
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise ValueError(f'workers must be a positive int or "auto", got {workers!r}')
    return workers


def as_argv(command: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """``worker_command`` as a tuple; a single string is one program path, never split by a
    shell."""
    if command is None:
        return None
    if isinstance(command, str):
        return (command,)
    return tuple(str(part) for part in command)


PathArgument = str | os.PathLike[str]


def as_paths(directories: PathArgument | Sequence[PathArgument] | None) -> tuple[Path, ...]:
    """``model_dir`` as a tuple of paths: none, one, or several."""
    if directories is None:
        return ()
    if isinstance(directories, (str, os.PathLike)):
        directories = [directories]
    return tuple(Path(directory).expanduser() for directory in directories)
