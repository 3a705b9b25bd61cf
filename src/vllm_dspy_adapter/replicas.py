"""Replicas and the pool that feeds them.

- ``plan_placement``: which devices each replica gets (pure; tested on its own).
- ``ProcessReplica``: one replica in its own worker process (``worker.py``),
  pinned to its GPUs (or CPU cores) through the environment it is spawned with.
- ``ReplicaPool``: sends every request to the replica the router picks, counts
  outstanding work, and survives a replica's death: requests it held are sent
  again to healthy replicas (each result is delivered exactly once) and the
  replica is restarted in the background.

Why separate engines, not ``AsyncLLM(data_parallel_size=N)``: in vLLM's native
data parallelism the ranks share one front end and one fate (an engine death
takes every rank down), and vLLM 0.26's balancer knows nothing of prefixes.
Separate engines isolate faults, start in parallel, and spread tokenisation over
one process per replica. Raw vLLM throughput is the same either way, since the
ranks of a dense model run independently (see BENCHMARKS.md).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import EngineSpec
from .errors import ConfigurationError, NoHealthyReplicaError, ReplicaDeadError, ReplicaStartError
from .protocol import Generation, GenerationRequest
from .router import ReplicaLoad, Router

__all__ = ["Placement", "plan_placement", "visible_gpu_count", "ProcessReplica", "ReplicaPool",
           "LocalBackend", "make_backend"]

logger = logging.getLogger(__name__)

# os.environ is process-wide: spawning a replica sets its device variables for
# the instant of the spawn only, one replica at a time.
_SPAWN_ENV_LOCK = threading.Lock()


@dataclass(frozen=True)
class Placement:
    """The devices of one replica and the environment that pins it to them."""

    index: int
    device: str  # "cuda:0,1" or "cpu:0-3"
    env: dict[str, str] = field(default_factory=dict)


def visible_gpu_count() -> int:
    """GPUs this process may use, without initialising CUDA in the driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() != ""])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def plan_placement(*, num_gpus: int | None, gpus: Sequence[int] | None, tensor_parallel_size: int,
                   num_replicas: int | None, available_gpus: int, cpu_count: int) -> list[Placement]:
    """Decide the replicas' devices; every bad request is refused here, before any start."""
    if tensor_parallel_size < 1:
        raise ConfigurationError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if gpus is not None:
        gpu_ids = [int(g) for g in gpus]
        if len(set(gpu_ids)) != len(gpu_ids):
            raise ConfigurationError(f"gpus={list(gpus)} lists a GPU twice")
        missing = [g for g in gpu_ids if g < 0 or g >= available_gpus]
        if missing:
            raise ConfigurationError(
                f"gpus={list(gpus)} asks for GPU(s) {missing}, but this machine shows {available_gpus} GPU(s) "
                f"(ids 0..{available_gpus - 1}); check CUDA_VISIBLE_DEVICES and nvidia-smi."
            )
        if num_gpus is not None and num_gpus != len(gpu_ids):
            raise ConfigurationError(f"num_gpus={num_gpus} contradicts gpus={list(gpus)}; pass one of them")
    elif available_gpus > 0:
        # On a GPU machine a replica count means that many GPU replicas, never CPU ones.
        wanted = num_gpus if num_gpus is not None else (
            num_replicas * tensor_parallel_size if num_replicas is not None else available_gpus)
        if wanted < 1 or wanted > available_gpus:
            raise ConfigurationError(
                f"num_gpus={wanted} but this machine shows {available_gpus} GPU(s); "
                "pass num_gpus between 1 and that, or gpus=[...]."
            )
        gpu_ids = list(range(wanted))
    else:
        gpu_ids = []
    if gpu_ids:
        if len(gpu_ids) % tensor_parallel_size:
            raise ConfigurationError(
                f"{len(gpu_ids)} GPU(s) cannot be split into replicas of tensor_parallel_size="
                f"{tensor_parallel_size}: use a GPU count divisible by it."
            )
        count = len(gpu_ids) // tensor_parallel_size
        if num_replicas is not None and num_replicas != count:
            raise ConfigurationError(
                f"num_replicas={num_replicas} but {len(gpu_ids)} GPU(s) / tensor_parallel_size="
                f"{tensor_parallel_size} make {count}; on GPUs the replica count follows from num_gpus."
            )
        plans = []
        for i in range(count):
            ids = gpu_ids[i * tensor_parallel_size:(i + 1) * tensor_parallel_size]
            plans.append(Placement(i, "cuda:" + ",".join(map(str, ids)),
                                   {"CUDA_VISIBLE_DEVICES": ",".join(map(str, _physical(ids)))}))
        return plans
    if num_gpus:
        raise ConfigurationError(
            f"num_gpus={num_gpus} but no GPU is visible here. On a CPU-only machine pass "
            "num_replicas=N to run N CPU replicas that split the cores."
        )
    count = num_replicas or 1
    if count < 1 or count > cpu_count:
        raise ConfigurationError(f"num_replicas={count} CPU replicas need at least as many cores; this machine has {cpu_count}")
    per = cpu_count // count
    plans = []
    for i in range(count):
        first, last = i * per, (i + 1) * per - 1
        cores = str(first) if first == last else f"{first}-{last}"
        # vLLM's CPU backend binds its OpenMP threads to these cores; without
        # distinct sets, replicas would fight over the same cores.
        plans.append(Placement(i, f"cpu:{cores}", {"VLLM_CPU_OMP_THREADS_BIND": cores, "CUDA_VISIBLE_DEVICES": ""}))
    return plans


def _physical(ids: list[int]) -> list[str]:
    """Map indices within the driver's visible GPUs to what the child must see."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return [str(i) for i in ids]
    names = [d.strip() for d in visible.split(",") if d.strip()]
    return [names[i] for i in ids]


class ReplicaHandle:
    """The driver's side of one replica, whatever hosts it (a worker process here,
    a Ray actor in ``ray_backend``): the futures of the requests it holds, by id.
    A request is admitted only while the replica is alive, each future is taken
    once when its result arrives, and a death fails every future still held (the
    pool then resubmits those requests)."""

    name: str

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._alive = False
        self._ids = itertools.count()

    @property
    def alive(self) -> bool:
        return self._alive

    def _admit(self, request_id: str | None, target: Callable[[], Any]):
        """Register a new request. Returns ``(request_id, future, target())``, where
        ``target()`` (what to send it to) is read under the same lock as the alive
        check; or a future already failed and ``None`` when the replica is down."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        request_id = request_id or f"{self.name}-{next(self._ids)}"
        with self._lock:
            if not self._alive:
                future.set_exception(ReplicaDeadError(f"{self.name} is not running"))
                return request_id, future, None
            self._pending[request_id] = future
            return request_id, future, target()

    def _take(self, request_id: str) -> concurrent.futures.Future | None:
        with self._lock:
            return self._pending.pop(request_id, None)

    @staticmethod
    def _fail(futures, message: str) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(ReplicaDeadError(message))


class ProcessReplica(ReplicaHandle):
    """A replica in its own worker process. Same surface as ``LocalEngine``:
    ``submit``, ``stats``, ``alive``, ``shutdown``."""

    def __init__(self, spec: EngineSpec, placement: Placement, *, on_death: Callable[[ProcessReplica, str], None]):
        super().__init__()
        self.spec = spec
        self.placement = placement
        self.index = placement.index
        self.device = placement.device
        self.name = f"replica-{placement.index}[{placement.device}]"
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self._on_death = on_death
        self._send_lock = threading.Lock()
        self._stats_reply: concurrent.futures.Future | None = None
        self._process = None
        self._conn = None

    # ---------------------------------------------------------------- start

    def spawn(self) -> None:
        """Start the worker process; returns at once (``wait_ready`` waits)."""
        from . import worker

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=worker.serve, name=self.name, daemon=False,
                              args=(child, self.spec, self.name, logging.getLogger().getEffectiveLevel()))
        with _SPAWN_ENV_LOCK:
            saved = {key: os.environ.get(key) for key in self.placement.env}
            os.environ.update(self.placement.env)
            try:
                process.start()
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        child.close()
        self._process, self._conn = process, parent

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._conn.poll(timeout):
            self.kill()
            raise ReplicaStartError(f"{self.name}: engine did not start within {timeout} s")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            code = self._process.exitcode
            self.kill()
            raise ReplicaStartError(f"{self.name}: worker process exited during start (exit code {code}); see the log above") from None
        if kind != "ready":
            self.kill()
            raise ReplicaStartError(f"{self.name}: {payload}")
        self.info = payload
        self._alive = True
        threading.Thread(target=self._read, name=f"{self.name}-reader", daemon=True).start()

    # -------------------------------------------------------------- serving

    def submit(self, request: GenerationRequest, request_id: str | None = None) -> concurrent.futures.Future:
        request_id, future, conn = self._admit(request_id, lambda: self._conn)
        if conn is None:
            return future
        try:
            with self._send_lock:
                conn.send(("submit", request_id, request))
        except (OSError, EOFError, BrokenPipeError):
            pass  # the reader thread sees the death and fails every pending request
        return future

    def _read(self) -> None:
        conn = self._conn
        cause = "worker process exited"
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "done" or kind == "error":
                future = self._take(message[1])
                if future is not None:
                    if kind == "done":
                        future.set_result(message[2])
                    else:
                        future.set_exception(message[2])
            elif kind == "stats" and self._stats_reply is not None:
                self._stats_reply.set_result(message[1])
            elif kind == "dead":
                cause = message[1]
        self._died(cause)

    def _died(self, cause: str) -> None:
        self._process.join(timeout=5)
        code = self._process.exitcode
        if code is not None and code < 0:
            cause = f"{cause} (killed by signal {signal.Signals(-code).name})"
        elif code not in (None, 0):
            cause = f"{cause} (exit code {code})"
        self._reap_engine_processes()
        with self._lock:
            was_alive, self._alive = self._alive, False
            pending, self._pending = self._pending, {}
        self._fail(pending.values(), f"{self.name} died: {cause}")
        if was_alive:
            self._on_death(self, cause)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        base = {"replica": self.index, "device": self.device, "alive": self._alive, "restarts": self.restarts}
        if not self._alive:
            return base
        with self._lock:
            reply = self._stats_reply = concurrent.futures.Future()
        try:
            with self._send_lock:
                self._conn.send(("stats",))
            return {**base, **reply.result(timeout=timeout)}
        except Exception:
            return base

    # -------------------------------------------------------------- lifetime

    def _reap_engine_processes(self) -> None:
        """Kill whatever is left of the worker's process group (the worker made
        itself a group leader), so no engine process outlives its replica."""
        if self._process is None or self._process.pid is None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._alive = False
        if self._conn is not None:
            try:
                with self._send_lock:
                    self._conn.send(("shutdown",))
            except (OSError, EOFError, BrokenPipeError):
                pass
        if self._process is not None:
            self._process.join(timeout=timeout)
        self.kill()

    def kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)
        self._reap_engine_processes()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


@dataclass
class _Job:
    request: GenerationRequest
    future: concurrent.futures.Future
    cost: int
    attempts: int = 0


class ReplicaPool:
    """Routes requests over replicas and keeps every result through replica deaths.

    ``replicas`` share the surface of ``LocalEngine``/``ProcessReplica``.
    ``restart(replica)`` brings a dead replica back (or raises); None means a
    dead replica stays dead and the pool shrinks.
    """

    def __init__(self, replicas: Sequence[Any], router: Router, *, restart: Callable[[Any], None] | None = None,
                 max_restarts: int = 3, max_attempts: int = 3, dead_error: type[Exception] = NoHealthyReplicaError):
        self.replicas = list(replicas)
        self.router = router
        self._restart = restart
        self.max_restarts = max_restarts
        self.max_attempts = max_attempts
        self._dead_error = dead_error
        self._lock = threading.Lock()
        self._outstanding = [0] * len(self.replicas)
        self._in_flight = [0] * len(self.replicas)
        self._routed = [0] * len(self.replicas)
        self._resubmitted = 0
        self._last_death = ""
        self._closed = False

    def loads(self) -> list[ReplicaLoad]:
        with self._lock:
            return [ReplicaLoad(r.index, r.alive, self._outstanding[i], self._in_flight[i])
                    for i, r in enumerate(self.replicas)]

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        cost = request.estimated_output_tokens() + request.estimated_prompt_tokens() // 8
        job = _Job(request, concurrent.futures.Future(), cost)
        self._dispatch(job)
        return job.future

    def _dispatch(self, job: _Job) -> None:
        job.attempts += 1
        loads = self.loads()
        if self._closed or not any(load.alive for load in loads):
            why = "the LM was shut down" if self._closed else f"every replica is dead (last cause: {self._last_death})"
            job.future.set_exception(self._dead_error(f"No replica can serve this request: {why}."))
            return
        with self._lock:  # routing decisions update the router's tables: one at a time
            index = self.router.choose(job.request.prompt, loads)
            self._outstanding[index] += job.cost
            self._in_flight[index] += 1
            self._routed[index] += 1
        inner = self.replicas[index].submit(job.request)
        inner.add_done_callback(lambda f, i=index: self._finished(job, i, f))

    def _finished(self, job: _Job, index: int, inner: concurrent.futures.Future) -> None:
        with self._lock:
            self._outstanding[index] -= job.cost
            self._in_flight[index] -= 1
        if inner.cancelled():
            job.future.cancel()
            return
        exc = inner.exception()
        if exc is None:
            generation: Generation = inner.result()
            generation.replica = index
            job.future.set_result(generation)
        elif isinstance(exc, ReplicaDeadError) and job.attempts < self.max_attempts:
            with self._lock:
                self._resubmitted += 1
            self._dispatch(job)  # to a healthy replica: the dead one is no longer alive
        else:
            job.future.set_exception(exc)

    def replica_died(self, replica: Any, cause: str) -> None:
        """Called once per death, by the replica. Logs, forgets its prefixes and restarts it."""
        self._last_death = f"{replica.name}: {cause}"
        alive = sum(r.alive for r in self.replicas)
        forget = getattr(self.router, "forget", None)
        if forget is not None:
            with self._lock:
                forget(replica.index)
        if self._closed:
            return
        if self._restart is None or replica.restarts >= self.max_restarts:
            logger.error("%s died: %s. Pool continues with %d of %d replicas.", replica.name, cause, alive, len(self.replicas))
            return
        logger.error("%s died: %s. Its requests go to the %d healthy replica(s); restarting it in the background.",
                     replica.name, cause, alive)
        threading.Thread(target=self._restart_replica, args=(replica,), daemon=True,
                         name=f"restart-{replica.index}").start()

    def _restart_replica(self, replica: Any) -> None:
        replica.restarts += 1
        try:
            self._restart(replica)
            logger.warning("%s restarted (restart %d of at most %d).", replica.name, replica.restarts, self.max_restarts)
        except Exception as exc:
            if self._closed:
                return  # shut down while restarting: nothing to report
            logger.error("%s could not be restarted: %s. Pool continues with %d of %d replicas.", replica.name, exc,
                         sum(r.alive for r in self.replicas), len(self.replicas))

    def stats(self) -> list[dict[str, Any]]:
        out = []
        loads = self.loads()
        for replica, load in zip(self.replicas, loads):
            entry = {"replica": replica.index, "device": getattr(replica, "device", "local"),
                     "routed": self._routed[replica.index], "outstanding_tokens": load.outstanding,
                     **replica.stats()}
            out.append(entry)
        return out

    @property
    def resubmitted(self) -> int:
        return self._resubmitted

    def close(self) -> None:
        """Refuse new requests; requests already in flight still finish."""
        self._closed = True


class LocalBackend:
    """Replicas as worker processes on this machine.

    A backend owns placement and the replicas' lifetime: ``start(spec, on_death)``
    starts every replica in parallel and returns them ready (or raises with
    nothing left running); ``restart(replica)`` brings a dead one back.
    """

    def __init__(self, placements: list[Placement], start_timeout: float | None):
        self.placements = placements
        self.start_timeout = start_timeout

    def start(self, spec: EngineSpec, on_death) -> list[ProcessReplica]:
        replicas = [ProcessReplica(spec, placement, on_death=on_death) for placement in self.placements]
        for replica in replicas:  # spawn all first, so they load in parallel
            replica.spawn()
        errors = []
        try:
            for replica in replicas:
                try:
                    replica.wait_ready(self.start_timeout)
                except Exception as exc:
                    errors.append(str(exc))
        except BaseException:  # Ctrl-C while starting: take every replica down with us
            for replica in replicas:
                replica.kill()
            raise
        if errors:
            for replica in replicas:
                replica.kill()
            raise ReplicaStartError("Replica start failed; nothing is left running.\n  " + "\n  ".join(errors))
        return replicas

    def restart(self, replica: ProcessReplica) -> None:
        replica.kill()
        replica.spawn()
        replica.wait_ready(self.start_timeout)


def make_backend(name: str, *, num_gpus, gpus, tensor_parallel_size, num_replicas, ray_address, start_timeout):
    """The replica backend by name; placement errors surface here, before any start."""
    if name == "local":
        if ray_address is not None:
            raise ConfigurationError("ray_address is only used with backend='ray'")
        placements = plan_placement(num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
                                    num_replicas=num_replicas, available_gpus=visible_gpu_count(),
                                    cpu_count=os.cpu_count() or 1)
        return LocalBackend(placements, start_timeout)
    if name == "ray":
        try:
            from .ray_backend import RayBackend
        except ImportError as exc:
            raise ConfigurationError(
                f"backend='ray' needs Ray: pip install 'vllm-dspy-adapter[ray]' ({exc})"
            ) from exc
        return RayBackend(num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
                          num_replicas=num_replicas, ray_address=ray_address, start_timeout=start_timeout)
    raise ConfigurationError(f"Unknown backend {name!r}; choose 'local' or 'ray'")
