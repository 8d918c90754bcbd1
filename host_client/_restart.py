"""When a worker slot starts its next worker, and when it gives up: the restart policy.

A small object in the manner of jupyter_client's ``KernelRestarter``, with no process, thread or
lock of its own, and a clock passed in (``time.monotonic`` by default) so that a test drives it
by hand::

    worker ready ──ready()──► clock noted
    worker gone  ──failed()─► uptime >= stable_start_time?  yes: the count starts again at 0
                                │ count += 1
                                ├─ count > restart_limit ──► GiveUp: the slot starts no more
                                └─ else ──► seconds to wait: 0.05 s doubling up to 2 s

A worker that could not start at all counts as a failure without uptime (it never ran stable).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

__all__ = ["RESTART_BACKOFF_FIRST", "RESTART_BACKOFF_MAX", "GiveUp", "RestartPolicy"]

RESTART_BACKOFF_FIRST = 0.05
"""Seconds before the first restart in a row."""
RESTART_BACKOFF_MAX = 2.0
"""The backoff doubles per restart in a row up to this."""


@dataclass(frozen=True)
class GiveUp:
    """The restart budget is spent: ``restarts`` in a row failed, over ``restart_limit``."""

    restarts: int
    restart_limit: int

    def message(self, last_failure: str) -> str:
        return (
            f"giving up after {self.restarts} restart(s) in a row "
            f"(restart_limit={self.restart_limit}); the last failure: {last_failure}"
        )


@dataclass(eq=False)
class RestartPolicy:
    """``restart_limit`` consecutive restarts, a count reset by a worker that served
    ``stable_start_time`` seconds, and an exponential backoff between restarts."""

    restart_limit: int
    stable_start_time: float
    _: KW_ONLY
    backoff_first: float = RESTART_BACKOFF_FIRST
    backoff_max: float = RESTART_BACKOFF_MAX
    clock: Callable[[], float] = time.monotonic
    consecutive_restarts: int = field(default=0, init=False)
    """Failures since the last stable worker (or the start)."""
    _ready_at: float | None = field(default=None, init=False, repr=False)

    def ready(self) -> None:
        """A worker said hello: its uptime counts from now."""
        self._ready_at = self.clock()

    def uptime(self) -> float:
        """Seconds the current (or last) worker has served; 0 for one that never did."""
        return 0.0 if self._ready_at is None else self.clock() - self._ready_at

    def failed(self) -> float | GiveUp:
        """The worker died, hung or could not start: seconds to wait before starting the next
        one, or ``GiveUp`` once more than ``restart_limit`` restarts in a row were needed."""
        stable = self._ready_at is not None and self.uptime() >= self.stable_start_time
        self._ready_at = None
        if stable:
            self.consecutive_restarts = 0
        self.consecutive_restarts += 1
        if self.consecutive_restarts > self.restart_limit:
            return GiveUp(self.consecutive_restarts - 1, self.restart_limit)
        return self.backoff(self.consecutive_restarts)

    def backoff(self, restart: int) -> float:
        """Seconds to wait before the ``restart``-th restart in a row (1-based)."""
        exponent = max(restart - 1, 0)
        return float(min(self.backoff_first * 2**exponent, self.backoff_max))
