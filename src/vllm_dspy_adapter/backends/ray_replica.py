"""The driver's handle on one replica actor of the Ray backend (``RayReplica``,
the ``Replica`` contract): it launches the actor the backend placed, waits for
it, sends requests and streams' pieces, reads the engine's pulse once a second
and turns any lost actor, node or Ray connection into the one death path of
``ReplicaHandle``. Ray completes futures on its own threads; every completion
is handled on the replica's own event thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..config import ModelSpec
from ..errors import ReplicaDeadError, ReplicaStartError
from ..protocol import GenerationRequest, OnDeath, StreamPiece
from .base import ReplicaHandle
from .ray_cluster import ray_if_up, ray_kill

__all__ = ["RayReplica", "Launch"]

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
PIECE_POLL_S = 0.02  # how often the driver fetches streamed pieces from an actor while streams run


def _classify(exc: BaseException) -> tuple[BaseException, str | None]:
    """(the request's error, the death cause or None). A task error carries the
    engine's own exception; any other Ray error means the actor or its node is gone."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        if isinstance(cause, ReplicaDeadError):
            return cause, str(cause)
        return cause, None
    if isinstance(exc, rex.RayError):
        text = str(exc).strip().splitlines()
        return exc, f"{type(exc).__name__}: {' '.join(line.strip() for line in text[:4])}"
    return exc, None


@dataclass
class Launch:
    """What the backend decided for one start of a replica's actor."""

    actor_class: Any
    options: dict[str, Any]
    spec: ModelSpec
    cpu_cores: tuple[int, int] | None


class RayReplica(ReplicaHandle):
    """The driver's handle on one replica actor."""

    def __init__(self, index: int, on_death: OnDeath, on_closed):
        super().__init__(index, "ray:pending", on_death)
        self.name = f"replica-{index}"
        self.node_id: str | None = None
        self.pid: int | None = None  # the actor's process, on its node
        self.starting = False
        self._on_closed = on_closed
        self._actor = None
        self._ready_ref = None
        # Ray completes ObjectRef futures on its own threads, where no blocking
        # call belongs; every completion is handled on this replica's thread.
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, Any] = {}  # request id -> StreamChannel of a streamed request
        self._stream_lock = threading.Lock()
        self._polling = False
        threading.Thread(target=self._handle_events, name=f"{self.name}-ray-events", daemon=True).start()

    # ---------------------------------------------------------------- start

    def launch(self, launch: Launch) -> None:
        """Create the actor; returns at once (``wait_ready`` waits). Refused once shut down."""
        with self._launching():
            self.starting = True
            self._actor = launch.actor_class.options(**launch.options).remote(
                launch.spec, self.name, logging.getLogger().getEffectiveLevel(), launch.cpu_cores)
            self._ready_ref = self._actor.ready.remote()

    def wait_ready(self, timeout: float | None) -> None:
        try:
            self._wait_ready(timeout)
        finally:
            self.starting = False

    def _wait_ready(self, timeout: float | None) -> None:
        import ray

        try:
            ready = ray.get(self._ready_ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self._kill()
            raise ReplicaStartError(f"{self.name}: engine did not start within {timeout} s") from None
        except Exception as exc:
            self._kill()
            raise ReplicaStartError(f"{self.name}: the Ray actor died during start: {_classify(exc)[0]}") from None
        where = f"node {ready.get('node_ip')} ({str(ready.get('node_id'))[:8]})"
        if "error" in ready:
            self._kill()
            raise ReplicaStartError(f"{self.name} on {where}: {ready['error']}")
        self.node_id, self.pid = ready["node_id"], ready["pid"]
        self.device = ready["device"]
        self.name = f"replica-{self.index}[{self.device}]"
        incarnation = self._became_ready(ready["info"])
        if self._closed:  # shut down while it started
            self._kill()
            raise ReplicaStartError(f"{self.name}: shut down")
        actor = self._actor
        watch = actor.watch.remote()
        watch.future().add_done_callback(lambda f: self._events.put(("watch", incarnation, None, f)))
        self._guarded(incarnation, "heartbeat", lambda: self._beat(actor, incarnation))

    def _beat(self, actor, incarnation: int) -> None:
        """Read the engine's pulse once a second; a frozen actor or engine stops it."""
        import ray

        self._ticks = -1
        while self._alive and self._incarnation == incarnation and ray_if_up() is not None:
            try:
                ticks, engine_in_flight = ray.get(actor.pulse.remote(), timeout=HEARTBEAT_S * 5)
            except ray.exceptions.GetTimeoutError:
                continue  # no answer: no progress (the pool's stall check decides)
            except Exception:  # the actor is gone: its watch reports the death
                return
            self._pulse(ticks, engine_in_flight)
            time.sleep(HEARTBEAT_S)

    # -------------------------------------------------------------- serving

    def submit(self, request: GenerationRequest, request_id: str | None = None, *,
               sink=None) -> concurrent.futures.Future:
        """``sink``: a ``lm.stream_channel.StreamChannel``; the actor keeps the request's pieces
        and a poller thread here fetches those of every sink in one call."""
        request_id, future, incarnation = self._admit(request_id)
        if incarnation is None:
            return future
        actor = self._actor
        try:
            if ray_if_up() is None:
                raise RuntimeError("this process is no longer connected to Ray")
            if sink is not None:
                with self._stream_lock:
                    self._streams[request_id] = sink
                    if not self._polling:
                        self._polling = True
                        threading.Thread(target=self._poll_pieces, args=(actor, incarnation), daemon=True,
                                         name=f"{self.name}-pieces").start()
            ref = actor.generate.remote(request, request_id, sink is not None)
        except Exception as exc:  # Ray itself is gone
            self._events.put(("lost", incarnation, request_id, f"submitting to the actor failed: {exc}"))
            return future
        ref.future().add_done_callback(lambda f: self._events.put(("done", incarnation, request_id, f)))
        return future

    def _abort(self, request_id: str) -> None:
        actor = self._actor
        if actor is not None and ray_if_up() is not None:
            actor.cancel.remote(request_id)  # fire and forget: a dead actor holds nothing

    def _handle_events(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            kind, incarnation, request_id, payload = event
            try:
                if kind == "lost":
                    self._declare(incarnation, payload)
                elif kind == "watch":
                    exc = payload.exception()
                    cause = payload.result() if exc is None else (
                        _classify(exc)[1] or f"{type(exc).__name__}: {exc}")
                    self._declare(incarnation, cause)
                else:
                    self._finish(incarnation, request_id, payload)
            except Exception as exc:  # a completion we cannot read: this actor can no longer be trusted
                logger.exception("%s: error handling a Ray completion", self.name)
                self._declare(incarnation, f"handling a Ray completion failed: {type(exc).__name__}: {exc}")

    def _poll_pieces(self, actor, incarnation: int) -> None:
        """Fetch streamed pieces while streams run; ends with the last stream."""
        while True:
            with self._stream_lock:
                if not self._streams or not self._alive or self._incarnation != incarnation:
                    self._polling = False
                    return
                self._fetch_pieces(actor)
            time.sleep(PIECE_POLL_S)

    def _fetch_pieces(self, actor) -> None:  # under self._stream_lock
        import ray

        try:
            pieces = ray.get(actor.take_pieces.remote(), timeout=HEARTBEAT_S * 5)
        except Exception:  # no answer now: the next poll asks again; a lost actor is reported by its watch
            return
        self._touch()  # decoded tokens: progress
        for request_id, text, num_tokens in pieces:
            channel = self._streams.get(request_id)
            if channel is not None:
                channel.put(StreamPiece(text, num_tokens))

    def _finish(self, incarnation: int, request_id: str, done: concurrent.futures.Future) -> None:
        with self._stream_lock:
            if request_id in self._streams:
                if not done.cancelled() and done.exception() is None:
                    self._fetch_pieces(self._actor)  # its last pieces reach its channel before its result
                self._streams.pop(request_id, None)
        if done.cancelled():
            self._complete(incarnation, request_id, error=concurrent.futures.CancelledError())
            return
        exc = done.exception()
        if exc is None:
            self._complete(incarnation, request_id, result=done.result())
            return
        error, cause = _classify(exc)
        if cause is not None:
            self._declare(incarnation, cause)  # fails this request and every other one the actor held
        else:
            self._complete(incarnation, request_id, error=error)

    def _declare(self, incarnation: int, cause: str) -> None:
        self._died(incarnation, cause, kill=True)  # the actor goes at once, restart or not

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        base = {**self.base_stats(), "pid": self.pid, "node_id": self.node_id,
                "node_ip": self.info.node if self.info else None}
        ray = ray_if_up()
        if not self._alive or ray is None:
            return base
        try:
            return {**base, **ray.get(self._actor.stats.remote(), timeout=timeout)}
        except ray.exceptions.GetTimeoutError:
            return {**base, "stats_error": f"no reply within {timeout:g} s"}
        except Exception:  # the actor is gone; its watch reports it
            return base

    def _adapter_call(self, op: str, payload, timeout: float) -> None:
        import ray

        from ..errors import VllmDspyAdapterError

        try:
            ray.get(self._actor.adapter.remote(op, payload), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ReplicaDeadError(f"{self.name}: no reply to the adapter {op} within {timeout:g} s") from None
        except ray.exceptions.RayTaskError as exc:  # the engine's own error, raised on the actor
            cause = exc.as_instanceof_cause()
            raise (cause if isinstance(cause, VllmDspyAdapterError) else ReplicaDeadError(f"{self.name}: {cause}")) from None

    # -------------------------------------------------------------- lifetime

    def _stop(self, timeout: float) -> None:
        actor = self._actor
        ray = ray_if_up()
        if actor is not None and ray is not None:
            try:
                ray.get(actor.shutdown.remote(), timeout=timeout)  # stops the engine processes in order
            except Exception:
                pass
        self._kill()
        self._events.put(None)
        self._on_closed(self)

    def _kill(self) -> None:
        """Kill the actor at once; Ray ends its child processes (the engine's) with it."""
        ray_kill(self._actor)
