"""Errors raised by the adapter.

Each class says whether the condition is *recoverable*: whether the same LM
object can keep serving after it. Errors cross process boundaries (a replica's
worker process reports them to the driver), so every class pickles from its
message alone.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "ConfigurationError",
    "PromptTooLongError",
    "UnsupportedInputError",
    "ReplicaDeadError",
    "ReplicaStartError",
    "NoHealthyReplicaError",
    "EngineDeadError",
]


class AdapterError(RuntimeError):
    """Base class. ``recoverable`` tells whether the LM keeps serving."""

    recoverable: bool = True


class ConfigurationError(AdapterError, ValueError):
    """A bad argument, found before any engine process starts. Nothing was started."""

    recoverable = True


class PromptTooLongError(AdapterError, ValueError):
    """One prompt does not fit ``max_model_len``. Only that request fails; the
    engine keeps serving. DSPy sees it as ``dspy.ContextWindowExceededError``."""

    recoverable = True


class UnsupportedInputError(AdapterError, ValueError):
    """The request asks for something this model or engine cannot do (an image
    for a text-only model, an unknown sampling option). Only that request fails."""

    recoverable = True


class ReplicaDeadError(AdapterError):
    """A replica's engine died while it held this request. The pool resubmits
    the request to a healthy replica; users only see it when no replica is left."""

    recoverable = True


class EngineDeadError(AdapterError):
    """The single in-process engine of a ``vLLMOffline`` died. Unrecoverable for
    this LM object: create a new one (the cause is in the message and the log)."""

    recoverable = False


class ReplicaStartError(AdapterError):
    """A replica failed to start (out of memory, bad argument, no such GPU).
    The message names the replica's device. Nothing is left running."""

    recoverable = False


class NoHealthyReplicaError(AdapterError):
    """Every replica of a pool is dead and none could be restarted. Calls fail
    fast with this error instead of hanging."""

    recoverable = False
