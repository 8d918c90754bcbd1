"""Which ONNX Runtime execution providers the session gets: a pure function of what is asked
for, what this onnxruntime build offers and which platform it runs on.

``auto`` prefers, in order: CoreML on macOS (Apple's Neural Engine / GPU), CUDA where the
installed onnxruntime-gpu offers it, then the CPU. Naming a provider forces it; if this build
does not offer it, the worker refuses to start (``ServiceUnavailable``, hello code
``service_unavailable``, exit 5) instead of quietly running somewhere slower. The CPU provider
always closes the list, as ONNX Runtime's fallback for operators the accelerator lacks.
"""

from __future__ import annotations

from collections.abc import Sequence

from akidb_embed.errors import ServiceUnavailable
from akidb_embed.worker.config import CoreMLOptions

__all__ = ["COREML", "CPU", "CUDA", "PROVIDER_NAMES", "ProviderChoice", "choose_providers"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
COREML = "CoreMLExecutionProvider"

PROVIDER_NAMES = {"cpu": CPU, "cuda": CUDA, "coreml": COREML}
"""The ``--provider`` names and the ONNX Runtime providers they stand for."""

ProviderChoice = tuple[str, dict[str, str]]
"""An execution provider name with its provider options, as ``InferenceSession`` takes them."""


def _with_options(name: str, coreml: CoreMLOptions) -> ProviderChoice:
    return (name, coreml.provider_options() if name == COREML else {})


def choose_providers(
    requested: str, available: Sequence[str], platform: str, coreml: CoreMLOptions
) -> list[ProviderChoice]:
    """The providers, in priority order, for ``requested`` (``auto``, ``cpu``, ``cuda`` or
    ``coreml``) given onnxruntime's ``available`` list and ``sys.platform``."""
    if requested == "auto":
        preferred = []
        if platform == "darwin" and COREML in available:
            preferred.append(COREML)
        if CUDA in available:
            preferred.append(CUDA)
    elif requested in PROVIDER_NAMES:
        wanted = PROVIDER_NAMES[requested]
        if wanted not in available:
            offered = ", ".join(available) or "none"
            raise ServiceUnavailable(
                f"execution provider {requested!r} ({wanted}) is not available in this "
                f"onnxruntime build; available: {offered}"
            )
        preferred = [] if wanted == CPU else [wanted]
    else:
        choices = ", ".join(["auto", *PROVIDER_NAMES])
        raise ServiceUnavailable(f"unknown execution provider {requested!r}; choose {choices}")
    return [_with_options(name, coreml) for name in [*preferred, CPU]]
