"""The messages on a worker's pipe: one frozen dataclass each, shared by the worker
(``worker.py``), the driver's handle (``process.py``) and the test fake.

driver -> worker: ``Start`` (only to a worker spawned ahead of its spec, and only first),
``Submit``, ``Cancel``, ``AskStats``, ``AdapterCall``, ``Shutdown``
worker -> driver: ``Ready``, ``Failed``, ``Done``, ``Error``, ``Pieces``, ``StatsReply``,
``Beat``, ``Dead``, ``AdapterReply``

Every reply names what it answers (a request id, or a call id for stats and adapter
calls, which have separate tables on the driver), so a late or duplicate reply finds
nothing and is dropped. Anything else on the pipe is a ``ProtocolError``: the reader
fails the replica with it, never drops it silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..protocol import Generation, GenerationRequest, ReplicaInfo

__all__ = ["Start", "Submit", "Cancel", "AskStats", "AdapterCall", "Shutdown", "Ready", "Failed", "Done", "Error", "Pieces",
           "StatsReply", "Beat", "Dead", "AdapterReply", "ProtocolError", "TO_WORKER", "TO_DRIVER", "checked"]


class ProtocolError(RuntimeError):
    """A message neither side of the pipe knows: a version mismatch or a bug."""


# ------------------------------------------------------------- driver -> worker


@dataclass(frozen=True)
class Start:
    """The spec of a worker spawned ahead of it (it imported vLLM while the driver checked
    the arguments): start this engine, under this name and heartbeat."""

    spec: Any  # a config.ModelSpec
    name: str
    heartbeat_s: float


@dataclass(frozen=True)
class Submit:
    request_id: str
    request: GenerationRequest
    streamed: bool = False  # DELTA outputs: the worker sends the request's text as ``Pieces``


@dataclass(frozen=True)
class Cancel:
    """The caller gave up: abort the request in the engine (an id not held is ignored)."""

    request_id: str


@dataclass(frozen=True)
class AskStats:
    call_id: int


@dataclass(frozen=True)
class AdapterCall:
    call_id: int
    op: str  # "add" (payload: a lora.AdapterSpec) or "remove" (payload: its name)
    payload: Any


@dataclass(frozen=True)
class Shutdown:
    pass


# ------------------------------------------------------------- worker -> driver


@dataclass(frozen=True)
class Ready:
    info: ReplicaInfo


@dataclass(frozen=True)
class Failed:
    """The engine did not start."""

    message: str


@dataclass(frozen=True)
class Done:
    request_id: str
    generation: Generation


@dataclass(frozen=True)
class Error:
    request_id: str
    error: BaseException


@dataclass(frozen=True)
class Pieces:
    """New text of every streamed request ready at one moment: (request id, text, tokens)."""

    items: tuple[tuple[str, str, int], ...]


@dataclass(frozen=True)
class StatsReply:
    call_id: int
    stats: dict[str, Any]


@dataclass(frozen=True)
class Beat:
    """The heartbeat: the engine's pulse, how many requests the engine holds, and the
    KV-cache events since the last beat (``protocol.CacheEvent``; none without ``cache_events``)."""

    ticks: int
    in_flight: int
    cache_events: tuple = ()


@dataclass(frozen=True)
class Dead:
    """The engine died; the worker exits right after."""

    cause: str


@dataclass(frozen=True)
class AdapterReply:
    call_id: int
    error: BaseException | None = None


TO_WORKER = (Submit, Cancel, AskStats, AdapterCall, Shutdown)
TO_DRIVER = (Ready, Failed, Done, Error, Pieces, StatsReply, Beat, Dead, AdapterReply)


def checked(message: Any, kinds: tuple[type, ...]) -> Any:
    """``message`` if it is one of ``kinds``, else ``ProtocolError`` naming it."""
    if not isinstance(message, kinds):
        raise ProtocolError(f"unknown message on the worker pipe: {message!r:.200} (expected one of "
                            f"{', '.join(k.__name__ for k in kinds)})")
    return message
