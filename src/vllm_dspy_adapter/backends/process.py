"""Replicas in worker processes on this machine (``backend="local"``).

Each replica is one worker process (``worker.py``) hosting one ``Engine``,
pinned to its GPUs (or CPU cores) by the environment it is spawned with, in a
process group of its own so that killing the group takes its engine processes
down too. The driver talks to it over one duplex pipe; every reply carries the
id of what it answers (requests and stats alike), and a reader thread per
incarnation delivers them. The worker sends a heartbeat with its engine's
pulse (``Engine.ticks``) and the requests its engine holds every second; a tick
counts as progress only while the engine holds requests, so requests stuck
between the pipe and the engine are a stall too (the pool's stall check).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from ..config import ModelSpec
from ..errors import ReplicaStartError
from ..protocol import ModelFacts, GenerationRequest, OnDeath, StreamPiece
from .model_facts import vllm_model_facts
from .base import ReplicaHandle, start_all
from .placement import Placement
from .wire import (TO_DRIVER, ProtocolError, AdapterCall, AdapterReply, AskStats, Beat, Cancel, Dead, Done, Error, Pieces, Ready,
                   Shutdown, Start, StatsReply, Submit, checked)
from .worker import serve

__all__ = ["ProcessReplica", "ProcessBackend", "Launcher", "WorkerProcess", "spawn_worker"]

logger = logging.getLogger(__name__)

# os.environ is process-wide: spawning a replica sets its device variables for
# the instant of the spawn only, one replica at a time.
_SPAWN_ENV_LOCK = threading.Lock()

HEARTBEAT_S = 1.0


class WorkerProcess(Protocol):
    """What the replica needs of its worker process (``multiprocessing.Process``)."""

    pid: int | None
    exitcode: int | None

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...

    def kill(self) -> None: ...


Launcher = Callable[[ModelSpec, Placement, str, float], "tuple[WorkerProcess, Connection]"]
"""``launch(spec, placement, name, heartbeat_s) -> (process, driver's end of the pipe)``:
how a worker starts. ``spawn_worker`` is the real one; the fast tests pass a
worker that is a thread on a real pipe."""


def spawn_worker(spec: ModelSpec | None, placement: Placement, name: str, heartbeat_s: float):
    """A worker process pinned to the placement's devices through its environment
    (``spec`` None: one that imports vLLM and waits for ``Start``; see ``serve``)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    process = ctx.Process(target=serve, name=name, daemon=False,
                          args=(child, spec, name, logging.getLogger().getEffectiveLevel(), heartbeat_s))
    with _SPAWN_ENV_LOCK:
        saved = {key: os.environ.get(key) for key in placement.env}
        os.environ.update(placement.env)
        try:
            process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    child.close()
    return process, parent


class ProcessReplica(ReplicaHandle):
    """The driver's handle on one worker process."""

    def __init__(self, spec: ModelSpec, placement: Placement, on_death: OnDeath, *,
                 launch: Launcher | None = None, heartbeat_s: float = HEARTBEAT_S):
        super().__init__(placement.index, placement.device, on_death, share=placement.share)
        self.spec = spec
        self.placement = placement
        self._launch = launch or spawn_worker
        self._heartbeat_s = heartbeat_s
        self._send_lock = threading.Lock()
        self._stats_waiting: dict[int, concurrent.futures.Future] = {}
        self._adapter_waiting: dict[int, concurrent.futures.Future] = {}
        self._streams: dict[str, Any] = {}  # request id -> StreamChannel of a streamed request
        self._stats_ids = itertools.count()
        self._process = None
        self._conn = None
        self._starting = False  # a worker is launched and has not said Ready yet
        self.reports_cache_events = spec.cache_events  # they come with the heartbeat

    # ---------------------------------------------------------------- start

    def spawn(self) -> None:
        """Start the worker; returns at once (``wait_ready`` waits). Refused once the
        replica is shut down: a restart must not outlive the shutdown it raced."""
        with self._launching():
            self._process, self._conn = self._launch(self.spec, self.placement, self.name, self._heartbeat_s)
            self._starting = True

    def wait_ready(self, timeout: float | None = None) -> None:
        conn = self._conn
        if not conn.poll(timeout):
            self._kill()
            raise ReplicaStartError(f"{self.name}: engine did not start within {timeout} s")
        try:
            message = conn.recv()
        except (EOFError, OSError):
            code = self._process.exitcode
            self._kill()
            raise ReplicaStartError(f"{self.name}: worker process exited during start (exit code {code}); "
                                    "see the log above") from None
        if not isinstance(message, Ready):  # Failed(message), or a protocol error
            self._kill()
            raise ReplicaStartError(f"{self.name}: {getattr(message, 'message', message)}")
        self._ticks = -1
        self._starting = False
        incarnation = self._became_ready(message.info)
        if self._closed:  # shut down while it started
            self._kill()
            raise ReplicaStartError(f"{self.name}: shut down")
        process = self._process  # this incarnation's: a restart replaces self._process
        self._guarded(incarnation, "reader", lambda: self._read(conn, incarnation, process))

    # -------------------------------------------------------------- serving

    def submit(self, request: GenerationRequest, request_id: str | None = None, *,
               sink=None) -> concurrent.futures.Future:
        """``sink``: a ``lm.stream_channel.StreamChannel`` that receives the request's pieces
        as the worker reports them (worker.py batches them per engine step)."""
        request_id, future, incarnation = self._admit(request_id)
        if incarnation is None:
            return future
        if sink is not None:
            self._streams[request_id] = sink
            future.add_done_callback(lambda _f, rid=request_id: self._streams.pop(rid, None))
        self._send(Submit(request_id, request, sink is not None))  # a broken pipe: the reader sees the death
        return future

    def _abort(self, request_id: str) -> None:
        self._send(Cancel(request_id))

    def _send(self, message) -> bool:
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, EOFError, BrokenPipeError, ValueError):
            return False

    def _read(self, conn, incarnation: int, process) -> None:
        """Deliver every reply of one incarnation; its end is the replica's death.

        Its pipe's end can reach this thread after a restart has already launched the next
        worker (a stall kills the worker, and the pool restarts at once): so the exit code
        read and the process group reaped are ``process``'s, this incarnation's, never the
        new worker's."""
        cause = "worker process exited"
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            match checked(message, TO_DRIVER):  # anything else: ProtocolError, the reader thread fails
                case Pieces(items):
                    self._touch()  # decoded tokens: progress
                    for request_id, text, num_tokens in items:
                        channel = self._streams.get(request_id)
                        if channel is not None:  # a late piece of a request already ended is dropped
                            channel.put(StreamPiece(text, num_tokens))
                case Done(request_id, generation):
                    self._complete(incarnation, request_id, result=generation)
                case Error(request_id, error):
                    self._complete(incarnation, request_id, error=error)
                case Beat(ticks, engine_in_flight, cache_events):
                    self._pulse(ticks, engine_in_flight)
                    self._add_cache_events(incarnation, cache_events)
                case StatsReply(call_id, stats):
                    _answer(self._stats_waiting, call_id, stats)  # a late reply finds no waiter: dropped
                case AdapterReply(call_id, error):
                    _answer(self._adapter_waiting, call_id, error)
                case Dead(why):
                    cause = why
                case _:  # Ready or Failed after the start
                    raise ProtocolError(f"{type(message).__name__} from a running worker")
        self._died(incarnation, _exit_cause(process, cause))
        with self._lock:
            current = incarnation == self._incarnation
        if current:  # the waiters of a newer incarnation are not this worker's
            for waiter in [*self._stats_waiting.values(), *self._adapter_waiting.values()]:
                waiter.cancel()  # a call waiting on the dead worker

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        base = {**self.base_stats(), "pid": self.pid}
        if not self._alive:
            return base
        stats_id = next(self._stats_ids)
        waiter: concurrent.futures.Future = concurrent.futures.Future()
        self._stats_waiting[stats_id] = waiter
        try:
            if self._send(AskStats(stats_id)):
                return {**base, **waiter.result(timeout=timeout)}
            return base
        except concurrent.futures.TimeoutError:
            return {**base, "stats_error": f"no reply within {timeout:g} s"}
        except concurrent.futures.CancelledError:  # it died meanwhile
            return {**self.base_stats(), "pid": self.pid}
        finally:
            self._stats_waiting.pop(stats_id, None)

    def _adapter_call(self, op: str, payload, timeout: float) -> None:
        from ..errors import ReplicaDeadError

        call_id = next(self._stats_ids)
        waiter: concurrent.futures.Future = concurrent.futures.Future()
        self._adapter_waiting[call_id] = waiter
        try:
            if not self._send(AdapterCall(call_id, op, payload)):
                raise ReplicaDeadError(f"{self.name}: its worker is gone")
            error = waiter.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise ReplicaDeadError(f"{self.name}: no reply to the adapter {op} within {timeout:g} s") from None
        except concurrent.futures.CancelledError:
            raise ReplicaDeadError(f"{self.name} died during the adapter {op}") from None
        finally:
            self._adapter_waiting.pop(call_id, None)
        if error is not None:
            raise error

    # -------------------------------------------------------------- lifetime

    def _kill(self) -> None:
        _kill_worker(self._process)

    def _stop(self, timeout: float) -> None:
        if self._starting:
            # Still starting its engine (a restart): it reads no pipe until Ready and
            # has nothing to finish, so it is killed now; its wait_ready fails at once.
            self._kill()
            return
        if self._conn is not None:
            # A frozen worker reads nothing: once its pipe is full a send would block,
            # so the request to stop in order is sent aside and the kill below ends it.
            threading.Thread(target=self._send, args=(Shutdown(),), daemon=True,
                             name=f"{self.name}-stop").start()
        if self._process is not None:
            self._process.join(timeout=timeout)
        self._kill()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


class _AdoptFirst:
    """A replica's launcher whose first launch adopts a worker spawned ahead of its spec
    (it imported vLLM while the driver checked the arguments) by sending it ``Start``;
    a later launch (a restart), or one whose waiting worker died, spawns a fresh worker."""

    def __init__(self, waiting: tuple[Any, Connection] | None):
        self._waiting = waiting

    def __call__(self, spec: ModelSpec, placement: Placement, name: str, heartbeat_s: float):
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            process, conn = waiting
            try:
                conn.send(Start(spec, name, heartbeat_s))
                return process, conn
            except (OSError, EOFError, ValueError):
                _stop_waiting(process, conn)
        return spawn_worker(spec, placement, name, heartbeat_s)


def _stop_waiting(process, conn: Connection) -> None:
    conn.close()
    _kill_worker(process)


class ProcessBackend:
    """Replicas as worker processes on this machine (the ``Backend`` contract).

    ``model_facts`` spawns each replica's worker first (with the real launcher): they
    import vLLM, about 5 s, while the driver checks the arguments, and ``start`` hands
    each its spec. A failed check stops them before it raises; ``shutdown`` stops any
    not taken."""

    def __init__(self, placements: list[Placement], start_timeout: float | None, *,
                 launch: Launcher | None = None, heartbeat_s: float = HEARTBEAT_S):
        self.placements = placements
        self.start_timeout = start_timeout
        self._launch = launch
        self._heartbeat_s = heartbeat_s
        self._waiting: dict[int, tuple[Any, Connection]] = {}  # placement index -> a worker spawned ahead

    def start(self, spec: ModelSpec, on_death: OnDeath) -> list[ProcessReplica]:
        waiting, self._waiting = self._waiting, {}
        replicas = [ProcessReplica(spec, placement, on_death, heartbeat_s=self._heartbeat_s,
                                   launch=self._launch or _AdoptFirst(waiting.pop(placement.index, None)))
                    for placement in self.placements]
        for process, conn in waiting.values():  # none left unless the placements changed
            _stop_waiting(process, conn)
        # Replicas sharing a GPU start share by share: each one's memory profiling sees the others.
        return start_all(replicas, ProcessReplica.spawn, lambda r: r.wait_ready(self.start_timeout),
                         wave=lambda r: r.share)

    def model_facts(self, model, engine_kwargs, sampling) -> ModelFacts:
        if self._launch is None and not self._waiting:
            try:
                for placement in self.placements:
                    self._waiting[placement.index] = spawn_worker(None, placement, f"worker[{placement.device}]",
                                                                  self._heartbeat_s)
            except BaseException:
                self._stop_all_waiting()
                raise
        try:
            return vllm_model_facts(model, engine_kwargs, sampling)
        except BaseException:  # bad input: no process outlives the refusal
            self._stop_all_waiting()
            raise

    def _stop_all_waiting(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for process, conn in waiting.values():
            _stop_waiting(process, conn)

    def restart(self, replica: ProcessReplica) -> None:
        replica._kill()
        replica.spawn()
        replica.wait_ready(self.start_timeout)

    def shutdown(self) -> None:
        """Stop the workers spawned ahead that no replica took (a start that never came)."""
        self._stop_all_waiting()


def _answer(waiting: dict[int, concurrent.futures.Future], call_id: int, value) -> None:
    waiter = waiting.pop(call_id, None)
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


def _exit_cause(process, cause: str) -> str:
    """``cause`` with how ``process`` (one incarnation's worker) ended."""
    process.join(timeout=5)
    code = process.exitcode
    if code is not None and code < 0:
        cause = f"{cause} (killed by signal {signal.Signals(-code).name})"
    elif code not in (None, 0):
        cause = f"{cause} (exit code {code})"
    _reap_group(process)
    return cause


def _kill_worker(process) -> None:
    """Kill a worker process (if any) and whatever is left of its process group."""
    if process is not None and process.is_alive():
        process.kill()
        process.join(timeout=10)
    _reap_group(process)


def _reap_group(process) -> None:
    """Kill whatever is left of ``process``'s group (the worker made itself a group
    leader), so no engine process outlives its replica. SIGKILL ends stopped
    (SIGSTOPped) processes too."""
    if process is None or process.pid is None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
