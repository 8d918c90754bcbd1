"""The worker's settings and their defaults, defined once.

``WorkerConfig`` is what the command line (``__main__``) builds and what the engine, the batcher
and the server read. The limits announced in the hello (protocol.md section 7) are its fields;
their defaults live here and nowhere else.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from akidb_embed.cores import size_lanes, usable_cores
from akidb_embed.models import default_model_dir
from akidb_embed.wire import DEFAULT_MAX_FRAME_BYTES

__all__ = [
    "PROVIDER_CHOICES",
    "CoreMLOptions",
    "WorkerConfig",
    "default_coreml_cache_dir",
    "default_lanes",
    "default_threads",
]

PROVIDER_CHOICES = ("auto", "cpu", "cuda", "coreml")


def default_coreml_cache_dir() -> Path:
    """A per-user directory where CoreML keeps compiled models, so a restart skips compiling."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "akidb-embed" / "coreml"


def default_threads() -> int:
    """ONNX Runtime intra-op threads of a worker sized for this process's cores."""
    return size_lanes(usable_cores())[1]


def default_lanes() -> int:
    """Runs at once of a worker sized for this process's cores."""
    return size_lanes(usable_cores())[0]


@dataclass(frozen=True)
class CoreMLOptions:
    """Options of ONNX Runtime's CoreML execution provider (used on macOS only)."""

    compute_units: str = "ALL"
    model_format: str = "MLProgram"
    cache_dir: Path = field(default_factory=default_coreml_cache_dir)

    def provider_options(self) -> dict[str, str]:
        return {
            "MLComputeUnits": self.compute_units,
            "ModelFormat": self.model_format,
            "ModelCacheDirectory": str(self.cache_dir),
        }


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker can be told; the defaults are the documented ones."""

    model_dir: Path = field(default_factory=default_model_dir)
    """The default model's directory: a request whose ``model`` is nil gets this model."""
    extra_model_dirs: tuple[Path, ...] = ()
    """Further models served by the same worker, chosen per request by their id."""
    provider: str = "auto"
    threads: int = field(default_factory=default_threads)
    """ONNX Runtime intra-op threads of the session (shared by the lanes); 0 lets ONNX Runtime
    choose. Default: ``size_lanes`` for this process's cores."""
    lanes: int = field(default_factory=default_lanes)
    """ONNX Runtime runs at once over one session per model (batcher.py). Default:
    ``size_lanes`` for this process's cores."""
    coreml: CoreMLOptions = field(default_factory=CoreMLOptions)
    spin_wait: bool = False
    """Let ONNX Runtime's pool threads spin between runs: a lone short request answers about
    0.6-0.8 ms sooner (1.5-1.7 vs 2.3-2.4 ms measured on 2 cores), for about 1.5-2 ms more CPU
    per request burnt spinning, which the host process on the same machine no longer gets."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_texts_per_request: int = 1024
    max_text_bytes: int = 256 * 1024
    max_batch_tokens: int = 1024
    """Padded tokens per ONNX Runtime run. Measured on a 2-core CPU: CPU time per token is flat
    or better below this, and the peak RSS grows with it (see engine._session_options)."""
    max_pending_texts: int = 16 * 1024

    @property
    def model_dirs(self) -> tuple[Path, ...]:
        """Every model directory, the default one first."""
        return (self.model_dir, *self.extra_model_dirs)

    def limits(self) -> dict[str, int]:
        """The limits as announced in the hello (protocol.md section 7)."""
        return {
            "max_frame_bytes": self.max_frame_bytes,
            "max_texts_per_request": self.max_texts_per_request,
            "max_text_bytes": self.max_text_bytes,
            "max_batch_tokens": self.max_batch_tokens,
            "max_pending_texts": self.max_pending_texts,
        }

    def describe(self) -> str:
        """One log line with every setting."""
        settings = asdict(self)
        return " ".join(f"{name}={value}" for name, value in settings.items())
