"""Errors raised by the adapter, and which of them the pool acts on.

| error | raised when | the pool | DSPy sees |
| --- | --- | --- | --- |
| ``ConfigurationError`` | a bad argument or input, before anything runs | - | the error itself |
| ``PromptTooLongError`` | one prompt does not fit ``max_model_len`` | fails that request | ``ContextWindowExceededError`` |
| ``UnsupportedInputError`` | a request the model or engine cannot serve | fails that request | an invalid-request error |
| ``UnsupportedModalityError`` | an image/audio/video part for a model without it, before submission | - | ``LMUnsupportedFeatureError`` |
| ``ReplicaDeadError`` | a replica died or stalled holding the request | resubmits it elsewhere | only if no replica is left |
| ``StreamInterruptedError`` | a streamed request's replica died after its first token | fails it (no replay) | a provider error |
| ``ReplicaStartError`` | a replica failed to start; nothing is left running | continues without it | the error itself |
| ``NoHealthyReplicaError`` | every replica is dead and none could be restarted | fails fast | a provider error (no retry) |
| ``LMClosedError`` | the LM was shut down | fails fast | a provider error (no retry) |
| ``TrainingStepError`` | a GRPO step ran out of memory or went non-finite | undoes the step; the last version serves | the error itself (from ``job.step``) |

Errors cross process boundaries (a worker reports them to the driver), so every
class pickles from its message alone.
"""

from __future__ import annotations

import re

__all__ = [
    "VllmDspyAdapterError",
    "ConfigurationError",
    "PromptTooLongError",
    "UnsupportedInputError",
    "UnsupportedModalityError",
    "ReplicaDeadError",
    "ReplicaStartError",
    "StreamInterruptedError",
    "NoHealthyReplicaError",
    "LMClosedError",
    "TrainingStepError",
    "is_context_length_message",
]


class VllmDspyAdapterError(RuntimeError):
    """Base class of every error this package raises."""


class ConfigurationError(VllmDspyAdapterError, ValueError):
    """A bad argument, found before any engine process starts. Nothing was started."""


class PromptTooLongError(VllmDspyAdapterError, ValueError):
    """One prompt does not fit ``max_model_len``. Only that request fails."""


class UnsupportedInputError(VllmDspyAdapterError, ValueError):
    """The request asks for something this model or engine cannot do (an image
    for a text-only model, an unknown sampling option). Only that request fails."""


class UnsupportedModalityError(UnsupportedInputError):
    """An image, audio or video part sent to a model that does not take that
    modality. Raised before anything is submitted; DSPy sees it as
    ``dspy.LMUnsupportedFeatureError`` naming the modality and the model."""

    def __init__(self, message: str, *, modality: str | None = None, model: str | None = None,
                 where: str | None = None):
        super().__init__(message)
        self.modality, self.model, self.where = modality, model, where


class ReplicaDeadError(VllmDspyAdapterError):
    """A replica died (or was declared stalled) while it held this request. The
    pool resubmits the request to a healthy replica; users see it only when no
    replica is left."""


class StreamInterruptedError(VllmDspyAdapterError):
    """A streamed request's replica died after the stream's first tokens were
    delivered. Unlike a whole answer, a stream cannot be replayed elsewhere, so
    the request fails; a stream cut before its first token is resubmitted."""


class ReplicaStartError(VllmDspyAdapterError):
    """A replica failed to start (out of memory, bad argument, no such GPU).
    The message names the replica's device. Nothing is left running."""


class NoHealthyReplicaError(VllmDspyAdapterError):
    """Every replica of the LM is dead and none could be restarted (for
    ``vLLMOffline``: its one engine died or stalled). Calls fail at once; create
    a new LM (the cause is in the message and the log)."""


class LMClosedError(VllmDspyAdapterError):
    """The LM was shut down (``shutdown()``, the end of a ``with`` block, or the
    interpreter's exit). Requests in flight at that moment fail with it too."""


_CONTEXT_RE = re.compile(r"longer than the maximum model length|maximum context length|exceeds the max", re.I)


class TrainingStepError(VllmDspyAdapterError):
    """One training step failed (out of memory, a non-finite loss or weights). The
    trainer is back at its state before the step and the adapter version served
    before it keeps serving; the job can take the next step."""


def is_context_length_message(message: str) -> bool:
    """Whether a vLLM validation error is the prompt-too-long one."""
    return bool(_CONTEXT_RE.search(message))


def __getattr__(name: str):
    # The base was called AdapterError, a name DSPy adapters and LoRA adapters make ambiguous.
    if name == "AdapterError":
        import warnings

        warnings.warn("vllm_dspy_adapter.AdapterError is deprecated: use VllmDspyAdapterError (the same class).",
                      DeprecationWarning, stacklevel=2)
        return VllmDspyAdapterError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
