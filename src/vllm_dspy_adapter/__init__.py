"""vllm-dspy-adapter: DSPy programs on local models through in-process vLLM,
on one GPU (``vLLMOffline``) or data-parallel over many (``vLLMOfflineMultiGPU``).

Importing this package is cheap: vLLM, torch and DSPy load on first use, so
``python -m vllm_dspy_adapter --help`` works on a machine without a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    VllmDspyAdapterError,
    ConfigurationError,
    LMClosedError,
    NoHealthyReplicaError,
    PromptTooLongError,
    ReplicaDeadError,
    ReplicaStartError,
    TrainingStepError,
    UnsupportedInputError,
)

__version__ = "0.1.0"

__all__ = [
    "vLLMOffline",
    "vLLMOfflineMultiGPU",
    "GenerationOutput",
    "FakeBackend",
    "FakeTokenizer",
    "Generation",
    "GenerationRequest",
    "StreamPiece",
    "default_model_path",
    "visible_gpu_count",
    "VllmDspyAdapterError",
    "AdapterError",  # deprecated alias of VllmDspyAdapterError
    "ConfigurationError",
    "LMClosedError",
    "NoHealthyReplicaError",
    "PromptTooLongError",
    "ReplicaDeadError",
    "ReplicaStartError",
    "TrainingStepError",
    "UnsupportedInputError",
    "__version__",
]

if TYPE_CHECKING:
    from .backends.fake import FakeBackend, FakeTokenizer
    from .lm.offline import GenerationOutput, vLLMOffline, vLLMOfflineMultiGPU
    from .protocol import Generation, GenerationRequest, StreamPiece


def default_model_path() -> str:
    """The prepared embedded default model (SmolLM2-135M-Instruct), prepared on first use."""
    from .models import resolve_model

    return resolve_model(None)


def visible_gpu_count() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES, else NVML), without initialising CUDA."""
    from .backends.placement import visible_gpu_count as count

    return count()


def __getattr__(name: str) -> Any:
    if name == "AdapterError":  # deprecated: warns, then the same class
        from . import errors

        return errors.AdapterError
    # The LM classes import DSPy (and, when used, vLLM): load them on first access.
    if name in ("vLLMOffline", "vLLMOfflineMultiGPU", "GenerationOutput"):
        from .lm import offline

        return getattr(offline, name)
    # The test seam (docs/VLLM_OFFLINE_GUIDE.md, "Testing without a model") and the types its handler sees.
    if name in ("FakeBackend", "FakeTokenizer"):
        from .backends import fake

        return getattr(fake, name)
    if name in ("Generation", "GenerationRequest", "StreamPiece"):
        from . import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'vllm_dspy_adapter' has no attribute {name!r}")
