"""What every replica handle shares, whatever hosts the replica.

``ReplicaHandle`` holds the driver's side of one replica: the futures of the
requests it holds (by id), its incarnation (bumped at each start, so a reply of
a replaced engine is dropped, never delivered), its last sign of progress, and
the one death path: a death fails every request still held with
``ReplicaDeadError`` and then tells the pool (``on_death``), once per
incarnation. A late or duplicate reply finds no future and is dropped.

``start_all`` is the one start-all-or-none rule of every backend: launch every
replica first (they load in parallel), then wait for each; on any failure, or
Ctrl-C, every replica is killed and ``ReplicaStartError`` lists what failed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from ..errors import LMClosedError, ReplicaDeadError, ReplicaStartError
from ..protocol import CacheCleared, Generation, OnDeath, ReplicaInfo

__all__ = ["ReplicaHandle", "start_all"]

logger = logging.getLogger(__name__)

R = TypeVar("R", bound="ReplicaHandle")


class ReplicaHandle:
    """The shared part of the ``Replica`` contract (see ``protocol.py``).

    Subclasses implement how a request reaches the replica (``submit``, using
    ``_admit`` and ``_complete``), ``stats``, ``_kill`` (stop whatever runs it,
    at once, in any state) and ``shutdown``; they report a death through
    ``_died``.
    """

    def __init__(self, index: int, device: str, on_death: OnDeath, share: int = 0) -> None:
        self.index = index
        self.device = device
        self.share = share
        self.name = f"replica-{index}[{device}]"
        self.restarts = 0
        self.info: ReplicaInfo | None = None
        self._on_death = on_death
        self._lock = threading.Lock()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._alive = False
        self._closed = False
        # Held while an engine is launched (_launching) and by shutdown before it stops
        # anything: a restart racing a shutdown launches nothing, or what it launched is stopped.
        self._launch_lock = threading.Lock()
        self._incarnation = 0
        self._ids = itertools.count()
        self._progress = time.monotonic()
        self._ticks = -1  # the engine pulse last read (see _pulse)
        self._stalls: list[str] = []  # when each stall was declared (UTC, ISO 8601)
        self._adapters: frozenset[str] = frozenset()  # LoRA adapters of the current incarnation's engine
        self._last_cause: str | None = None
        self._cache_events: list = []  # KV-cache events reported and not taken yet (under _lock)
        self.reports_cache_events = False  # set by a subclass whose engine publishes them

    # ------------------------------------------------------------- contract

    @property
    def cache_events(self) -> bool:
        return self.reports_cache_events

    def take_cache_events(self) -> list:
        with self._lock:
            events, self._cache_events = self._cache_events, []
        return events

    def _add_cache_events(self, incarnation: int, events) -> None:
        """Events of the engine of ``incarnation`` (those of a replaced engine are dropped)."""
        if not events:
            return
        with self._lock:
            if incarnation == self._incarnation:
                self._cache_events.extend(events)

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def closed(self) -> bool:
        return self._closed

    def last_progress(self) -> float:
        return self._progress

    def cancel(self, request_id: str) -> None:
        """The caller gave up: forget the request (a late reply is dropped) and ask
        whatever runs the replica to abort it (``_abort``)."""
        with self._lock:
            future = self._pending.pop(request_id, None)
            incarnation = self._incarnation if self._alive else None
        if future is None:
            return
        future.cancel()
        if incarnation is not None:
            try:
                self._abort(request_id)
            except Exception:  # noqa: BLE001 - a replica that cannot be reached holds nothing to abort
                logger.debug("%s: abort of %s failed", self.name, request_id, exc_info=True)

    def declare_dead(self, cause: str) -> None:
        """Kill the replica now and run the death path (the pool's stall check)."""
        with self._lock:
            incarnation = self._incarnation
            if not self._alive:
                return
            self._stalls.append(datetime.now(timezone.utc).isoformat(timespec="seconds"))
        logger.error("%s: %s; killing it", self.name, cause)
        self._died(incarnation, cause, kill=True)

    @property
    def adapters(self) -> frozenset[str]:
        return self._adapters

    def add_adapter(self, adapter, timeout: float = 120.0) -> None:
        incarnation = self._running()
        self._adapter_call("add", adapter, timeout)
        with self._lock:
            if incarnation == self._incarnation:
                self._adapters = self._adapters | {adapter.name}

    def remove_adapter(self, name: str, timeout: float = 60.0) -> None:
        with self._lock:
            self._adapters = self._adapters - {name}
        if self._alive:
            self._adapter_call("remove", name, timeout)

    def _running(self) -> int:
        with self._lock:
            if not self._alive:
                raise ReplicaDeadError(f"{self.name} is not running")
            return self._incarnation

    def _adapter_call(self, op: str, payload, timeout: float) -> None:
        """Run ``Engine.add_adapter(payload)`` or ``Engine.remove_adapter(payload)`` on the replica."""
        raise NotImplementedError

    def base_stats(self) -> dict[str, Any]:
        return {"replica": self.index, "device": self.device, "alive": self._alive, "restarts": self.restarts,
                "stalls": len(self._stalls), "last_stall": self._stalls[-1] if self._stalls else None,
                "last_death": self._last_cause, "engine_pids": list(self.info.engine_pids) if self.info else []}

    # -------------------------------------------------------- for subclasses

    def _kill(self) -> None:
        raise NotImplementedError

    def _abort(self, request_id: str) -> None:
        """Abort one request in the replica's engine (returns at once)."""
        raise NotImplementedError

    def _touch(self) -> None:
        """A sign of progress: a reply, or decoded text of a streamed request."""
        self._progress = time.monotonic()

    def _pulse(self, ticks: int, engine_in_flight: int) -> None:
        """The one progress rule of the contract, for every backend: the engine's pulse
        (``Engine.ticks``) moved since the last reading *while the engine held requests*.
        An idle engine that ticks is no progress: requests stuck before it (a worker whose
        main thread stopped handing them over) must become a stall."""
        if ticks != self._ticks:
            self._ticks = ticks
            if engine_in_flight:
                self._touch()

    def _became_ready(self, info: ReplicaInfo) -> int:
        """Mark a (re)started replica alive; returns its new incarnation."""
        with self._lock:
            self.info = info
            self._incarnation += 1
            self._adapters = frozenset()  # a new engine: the pool loads the adapters again
            self._cache_events = [CacheCleared()]  # a new engine: an empty cache
            self._alive = not self._closed
            self._touch()
            return self._incarnation

    def _admit(self, request_id: str | None) -> tuple[str, concurrent.futures.Future, int | None]:
        """Register a new request: ``(id, future, incarnation)``; the incarnation is
        None (and the future already failed) when the replica is not alive."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        request_id = request_id or f"{self.name}-{next(self._ids)}"
        with self._lock:
            if not self._alive:
                future.set_exception(ReplicaDeadError(f"{self.name} is not running"))
                return request_id, future, None
            if not self._pending:
                self._touch()  # idle until now: the stall clock starts here
            self._pending[request_id] = future
            return request_id, future, self._incarnation

    def _complete(self, incarnation: int, request_id: str, result: Generation | None = None,
                  error: BaseException | None = None) -> None:
        """Deliver one reply. A reply of an older incarnation, or for a request no
        longer held (late, duplicate, already failed by a death), is dropped."""
        with self._lock:
            if incarnation != self._incarnation:
                return
            future = self._pending.pop(request_id, None)
            self._touch()
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            held, self._pending = self._pending, {}
        for future in held.values():
            if not future.done():
                future.set_exception(error)

    def _died(self, incarnation: int, cause: str, *, kill: bool = False) -> None:
        """The one death path: once per incarnation, fail what it held, tell the pool.
        With ``kill``, the replica is killed after its death is recorded, so the
        death the kill itself causes (a closed pipe) is not reported a second time."""
        with self._lock:
            if incarnation != self._incarnation or not self._alive:
                return  # already handled, or shut down, or a restart replaced it
            self._alive = False
            self._last_cause = cause
            held, self._pending = self._pending, {}
        if kill:
            self._kill()
        if not self._closed:
            self._on_death(self, cause)  # first, so that the pool knows the cause when the requests come back
        error = ReplicaDeadError(f"{self.name} died: {cause}")
        for future in held.values():
            if not future.done():
                future.set_exception(error)

    def shutdown(self, timeout: float = 30.0) -> None:
        """The contract's shutdown, one template for every backend: the first call
        marks the replica closed, fails what it still holds with ``LMClosedError`` and
        stops whatever runs it (``_stop``); later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._alive = False
        self._fail_all(LMClosedError(f"{self.name} was shut down with this request in flight"))
        with self._launch_lock:  # a launch in progress has finished: what it launched is stopped below
            pass
        self._stop(timeout)

    @contextlib.contextmanager
    def _launching(self):
        """Wrap the launch of an engine (a start or restart): refused with
        ``ReplicaStartError`` once the replica is shut down, and a shutdown waits for
        a launch in progress, so no restart leaves an engine running after it."""
        with self._launch_lock:
            if self._closed:
                raise ReplicaStartError(f"{self.name}: shut down")
            yield

    def _stop(self, timeout: float) -> None:
        """Stop the engine in order within ``timeout``, then make sure nothing is left."""
        raise NotImplementedError

    def _guarded(self, incarnation: int, what: str, target: Callable[[], None]) -> threading.Thread:
        """A daemon thread that never dies silently: if ``target`` raises, the
        replica is killed and declared dead with the error as its cause."""

        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - reported, never swallowed
                logger.exception("%s: %s failed", self.name, what)
                self._died(incarnation, f"its {what} thread failed: {type(exc).__name__}: {exc}", kill=True)

        thread = threading.Thread(target=run, name=f"{self.name}-{what}", daemon=True)
        thread.start()
        return thread


def start_all(replicas: Sequence[R], launch: Callable[[R], None], wait: Callable[[R], None], *,
              wave: Callable[[R], int] | None = None) -> list[R]:
    """Launch every replica, then wait for each; all ready, or none left running.

    ``wave``: replicas of wave 0 start (in parallel) and are ready before those of
    wave 1 launch, and so on: several replicas sharing a GPU start one after
    another, so each one's memory profiling sees what the others took."""
    errors: list[str] = []
    waves: dict[int, list[R]] = {}
    for replica in replicas:
        waves.setdefault(wave(replica) if wave else 0, []).append(replica)
    try:
        for number in sorted(waves):
            for replica in waves[number]:  # every launch of a wave first, so its engines load in parallel
                try:
                    launch(replica)
                except Exception as exc:
                    errors.append(f"{replica.name}: {exc}")
                    break
            if not errors:
                for replica in waves[number]:
                    try:
                        wait(replica)
                    except Exception as exc:
                        errors.append(str(exc))
            if errors:
                break
    except BaseException:  # Ctrl-C while starting: take every replica down with us
        for replica in replicas:
            replica._kill()
        raise
    if errors:
        for replica in replicas:
            replica._kill()
        raise ReplicaStartError("Replica start failed; nothing is left running.\n  " + "\n  ".join(errors))
    return list(replicas)
