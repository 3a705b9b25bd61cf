"""Replicas as Ray actors, over every node of a Ray cluster (``backend="ray"``).

``RayBackend`` has the contract of ``LocalBackend`` (``start(spec, on_death)``
returns ready replicas, ``restart(replica)`` brings a dead one back or raises),
and ``RayReplica`` the surface of ``ProcessReplica``, so ``ReplicaPool`` and the
prefix router work unchanged over a cluster.

Why one actor per replica, each hosting its own ``LocalEngine``, and not vLLM's
own data parallelism on Ray (``data_parallel_backend="ray"``): there, every rank
sits behind one front end and shares one fate (one dead rank or node takes the
whole engine down), and requests are balanced without regard to prefixes. One
actor per replica isolates faults exactly as the local worker processes do (a
lost node costs its replicas only; their requests go to the survivors) and keeps
our prefix router in front of the replicas.

Placement: each replica reserves its resources in a placement group of its
own, one bundle (``tensor_parallel_size`` GPUs, or a CPU replica's CPUs) with
``STRICT_PACK``: a replica always sits on one node, and Ray places such groups
on the least used node that fits, which spreads the replicas over the nodes (see
``RayBackend`` for why not one group for all). Inside the actor, vLLM runs its
tensor-parallel workers with its multiprocessing executor on the GPUs Ray
assigned (Ray sets ``CUDA_VISIBLE_DEVICES``). CPU replicas (a cluster without
GPUs) bind vLLM's OpenMP threads to distinct cores of their host
(``VLLM_CPU_OMP_THREADS_BIND``, in the actor's ``runtime_env``).

Ray is imported lazily: ``import vllm_dspy_adapter`` never needs it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import EngineSpec
from .errors import ConfigurationError, ReplicaDeadError, ReplicaStartError
from .protocol import Generation, GenerationRequest
from .replicas import ReplicaHandle

__all__ = ["RayBackend", "RayReplica", "RayNode", "RayPlan", "plan_ray_placement"]

logger = logging.getLogger(__name__)

# The driver's settings that every replica gets, as local worker processes
# inherit them. Anything else comes from the environment `ray start` ran in on
# each node (Ray workers inherit their raylet's environment). No secrets: a
# runtime_env is stored by Ray and shown in its dashboard.
FORWARDED_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_DSPY_MODEL", "VLLM_DSPY_CACHE", "VLLM_LOGGING_LEVEL",
                 "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")

# An async actor runs this many requests at once (coroutines, not threads):
# enough never to be the limit in front of vLLM's own scheduler.
_MAX_CONCURRENCY = 100_000


# ------------------------------------------------------------------ placement


@dataclass(frozen=True)
class RayNode:
    """What placement needs to know of one alive node."""

    node_id: str
    ip: str
    cpus: int
    gpus: int

    def describe(self) -> str:
        return f"node {self.ip} ({self.node_id[:8]}): {self.gpus} GPU, {self.cpus} CPU"


@dataclass(frozen=True)
class RayPlan:
    """How many replicas, and what one replica asks of its node."""

    count: int
    gpus_per_replica: int  # 0 for CPU replicas
    cpus_per_replica: int  # CPU replicas only; a GPU replica asks for no CPU

    @property
    def bundle(self) -> dict[str, float]:
        if self.gpus_per_replica:
            return {"GPU": float(self.gpus_per_replica)}
        return {"CPU": float(self.cpus_per_replica)}

    def describe(self) -> str:
        if self.gpus_per_replica:
            return f"{self.gpus_per_replica} GPU"
        return f"{self.cpus_per_replica} CPU"


def _cluster_text(nodes: Sequence[RayNode]) -> str:
    return "; ".join(node.describe() for node in nodes) or "no alive node"


def plan_ray_placement(*, num_gpus: int | None, gpus: Sequence[int] | None, tensor_parallel_size: int,
                       num_replicas: int | None, nodes: Sequence[RayNode]) -> RayPlan:
    """The replicas of a cluster; every request the cluster cannot meet is refused here.

    The arguments mean what they mean on one machine, counted over the cluster:
    ``num_gpus`` GPUs in all (default: every GPU), one replica per
    ``tensor_parallel_size`` of them, each replica's GPUs on one node;
    ``num_replicas`` alone on a GPU cluster asks for that many replicas of
    ``tensor_parallel_size`` GPUs. On a cluster without GPUs, ``num_replicas``
    CPU replicas (default 1), each with as many CPUs as lets all of them fit.
    """
    if tensor_parallel_size < 1:
        raise ConfigurationError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if gpus is not None:
        raise ConfigurationError(
            f"gpus={list(gpus)} picks GPUs of one machine; with backend='ray' pass num_gpus=N (counted over the "
            "cluster) or num_replicas=N, and Ray picks the GPUs on each node."
        )
    total_gpus = sum(node.gpus for node in nodes)
    if total_gpus > 0:
        fits = sum(node.gpus // tensor_parallel_size for node in nodes)  # a replica stays on one node
        if num_gpus is not None:
            if num_gpus < 1:
                raise ConfigurationError(f"num_gpus must be >= 1, got {num_gpus}")
            if num_gpus % tensor_parallel_size:
                raise ConfigurationError(
                    f"num_gpus={num_gpus} cannot be split into replicas of tensor_parallel_size="
                    f"{tensor_parallel_size}: use a GPU count divisible by it."
                )
            count = num_gpus // tensor_parallel_size
            if num_replicas is not None and num_replicas != count:
                raise ConfigurationError(
                    f"num_replicas={num_replicas} but num_gpus={num_gpus} / tensor_parallel_size="
                    f"{tensor_parallel_size} make {count}; pass one of them."
                )
        elif num_replicas is not None:
            count = num_replicas
        else:
            count = fits
        if count < 1 or count > fits:
            raise ConfigurationError(
                f"{count} replica(s) of tensor_parallel_size={tensor_parallel_size} need {count} node slot(s) of "
                f"{tensor_parallel_size} GPU(s) each (a replica's GPUs must be on one node), but the cluster has "
                f"room for {fits}: {_cluster_text(nodes)}."
            )
        return RayPlan(count, tensor_parallel_size, 0)
    if num_gpus:
        raise ConfigurationError(
            f"num_gpus={num_gpus} but the Ray cluster has no GPU ({_cluster_text(nodes)}). On CPU nodes pass "
            "num_replicas=N to run N CPU replicas."
        )
    if tensor_parallel_size > 1:
        raise ConfigurationError("tensor_parallel_size > 1 needs GPUs; the Ray cluster has none.")
    count = 1 if num_replicas is None else num_replicas
    total_cpus = sum(node.cpus for node in nodes)
    if count < 1 or count > total_cpus:
        raise ConfigurationError(
            f"num_replicas={count} CPU replicas need at least one CPU each and the Ray cluster has {total_cpus}: "
            f"{_cluster_text(nodes)}."
        )
    # The most CPUs per replica that still lets every replica fit on some node.
    per = max(c for c in range(1, max(node.cpus for node in nodes) + 1)
              if sum(node.cpus // c for node in nodes) >= count)
    return RayPlan(count, 0, per)


def _free_offset(host_cores: int, per: int, taken: set[int]) -> int:
    """The first block of ``per`` cores of a host that no other replica binds."""
    for offset in range(0, max(host_cores - per, 0) + 1, per):
        if offset not in taken:
            return offset
    return (len(taken) * per) % max(host_cores, 1)  # oversubscribed host: share, as the OS would


def _cores_text(first: int, count: int) -> str:
    return str(first) if count == 1 else f"{first}-{first + count - 1}"


# ------------------------------------------------------------------ the actor


class VLLMReplica:
    """The Ray actor: one ``LocalEngine`` in one Ray worker process.

    Every method is a coroutine, so the actor is an async actor: ``generate``
    calls run concurrently (awaiting the engine's future), which is what lets one
    vLLM batch gather every request the driver sends.
    """

    def __init__(self, spec: EngineSpec, name: str, log_level: int, cpu_slot: tuple[int, int] | None):
        logging.basicConfig(level=log_level, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        import ray

        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.engine = None
        self.error: str | None = None
        self.engine_processes: list = []  # psutil.Process objects: killing one never hits a reused pid
        try:
            gpu_ids = [str(g) for g in context.get_accelerator_ids().get("GPU", [])]
            if gpu_ids:
                self.device = f"node:{self.node_ip}/gpu:{','.join(gpu_ids)}"
            else:
                self.device = f"node:{self.node_ip}/cpu:{_check_binding(cpu_slot)}"
            spec = _spec_on_this_node(spec, self.node_ip)
            from .engine import LocalEngine

            self.engine = LocalEngine(spec, name=name)
            self.engine_processes = _processes(self.engine.info()["engine_pids"])
        except Exception as exc:  # reported by ready(): the driver decides what to do
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ReplicaStartError) else str(exc)

    async def ready(self) -> dict[str, Any]:
        where = {"node_id": self.node_id, "node_ip": self.node_ip, "pid": os.getpid()}
        if self.error is not None:
            return {**where, "error": self.error}
        return {**self.engine.info(), **where, "device": self.device}

    async def generate(self, request: GenerationRequest, request_id: str) -> Generation:
        return await asyncio.wrap_future(self.engine.submit(request, request_id))

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def watch(self) -> str:
        """Returns when the engine has died (the driver then retires this actor);
        fails when the actor itself is lost: either way the driver learns of it."""
        while self.engine.alive:
            await asyncio.sleep(0.5)
        cause = str(getattr(self.engine, "_dead", None) or "the vLLM engine died")
        await asyncio.to_thread(self._stop)
        return cause

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        for process in self.engine_processes:  # whatever the engine's shutdown left behind
            try:
                process.kill()
            except Exception:  # already gone
                pass


def _check_binding(cpu_slot: tuple[int, int] | None) -> str:
    """The cores this CPU replica binds. The driver numbered them 0..N-1 on the
    host (in ``VLLM_CPU_OMP_THREADS_BIND``); where this process may only use
    other cores (a cpuset), the same block of the cores it may use is bound."""
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
    if cpu_slot is None or not hasattr(os, "sched_getaffinity"):
        return bind or "all"
    offset, count = cpu_slot
    allowed = sorted(os.sched_getaffinity(0))
    wanted = list(range(offset, offset + count))
    if not set(wanted) <= set(allowed):
        block = allowed[offset % len(allowed):][:count] or allowed[:count]
        bind = ",".join(map(str, block))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        logger.warning("cores %s are not usable here; binding %s instead", _cores_text(offset, count), bind)
    return bind


def _spec_on_this_node(spec: EngineSpec, node_ip: str) -> EngineSpec:
    """Weights load on each node from its own disk or hub cache. The default
    model is prepared on the node when the driver's folder is not there; any
    other local folder must exist at the same path on every node."""
    from .models import DEFAULT_MODEL_NAME, resolve_model

    if os.path.exists(spec.model) or not spec.model.startswith(("/", "./", "../", "~")):
        return spec  # here, or a hub id
    if spec.model_name == DEFAULT_MODEL_NAME:
        return dataclasses.replace(spec, model=resolve_model(None))
    raise ReplicaStartError(
        f"model folder {spec.model} does not exist on node {node_ip}: copy it to the same path on every node, "
        "or pass a hub id so that each node downloads it."
    )


def _processes(pids: Sequence[int]) -> list:
    import psutil

    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return out


# ------------------------------------------------------------------ the driver's side


def _classify(exc: BaseException) -> tuple[BaseException, str | None]:
    """(the request's error, the death cause or None). A task error carries the
    engine's own exception; any other Ray error means the actor or its node is gone."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, ReplicaDeadError):
            return cause, str(cause)
        return cause, None
    if isinstance(exc, rex.RayError):
        text = str(exc).strip().splitlines()
        return exc, f"{type(exc).__name__}: {' '.join(line.strip() for line in text[:4])}"
    return exc, None


class RayReplica(ReplicaHandle):
    """The driver's handle on one replica actor. Same surface as ``ProcessReplica``."""

    def __init__(self, backend: RayBackend, index: int, on_death: Callable[[RayReplica, str], None]):
        super().__init__()
        self.index = index
        self.name = f"replica-{index}"
        self.device = "ray:pending"
        self.node_id: str | None = None
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self._backend = backend
        self._on_death = on_death
        self._closed = False
        self._actor = None
        self._ready_ref = None
        self._incarnation = 0  # results of a replaced actor are told apart by it
        self._cpu_slot: tuple[int, int] | None = None  # (first core, cores) on its host, CPU replicas
        self._host_ip: str | None = None
        self._starting = False
        self._pg = None  # its placement group (RayBackend)
        # Ray completes ObjectRef futures on its own threads, where no blocking
        # call belongs; every completion is handled on this replica's thread.
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._handle_events, name=f"{self.name}-ray-events", daemon=True).start()

    # ---------------------------------------------------------------- start

    def launch(self, actor_class, options: dict[str, Any], spec: EngineSpec, log_level: int) -> None:
        """Create the actor; returns at once (``wait_ready`` waits)."""
        self._starting = True
        self._actor = actor_class.options(**options).remote(spec, self.name, log_level, self._cpu_slot)
        self._ready_ref = self._actor.ready.remote()

    def wait_ready(self, timeout: float | None) -> None:
        try:
            self._wait_ready(timeout)
        finally:
            self._starting = False

    def _wait_ready(self, timeout: float | None) -> None:
        import ray

        try:
            info = ray.get(self._ready_ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.kill()
            raise ReplicaStartError(f"{self.name}: engine did not start within {timeout} s") from None
        except Exception as exc:
            self.kill()
            raise ReplicaStartError(f"{self.name}: the Ray actor died during start: {_classify(exc)[0]}") from None
        where = f"node {info.get('node_ip')} ({str(info.get('node_id'))[:8]})"
        if "error" in info:
            self.kill()
            raise ReplicaStartError(f"{self.name} on {where}: {info['error']}")
        with self._lock:
            self.info = info
            self.node_id = info["node_id"]
            self.device = info["device"]
            self.name = f"replica-{self.index}[{self.device}]"
            self._incarnation += 1
            incarnation = self._incarnation
            closed = self._closed
            self._alive = not closed
        if closed:  # shut down while it started
            self.kill()
            raise ReplicaStartError(f"{self.name}: shut down")
        watch = self._actor.watch.remote()
        watch.future().add_done_callback(lambda f: self._events.put(("watch", incarnation, None, f)))

    # -------------------------------------------------------------- serving

    def submit(self, request: GenerationRequest, request_id: str | None = None) -> concurrent.futures.Future:
        request_id, future, target = self._admit(request_id, lambda: (self._actor, self._incarnation))
        if target is None:
            return future
        actor, incarnation = target
        try:
            if _ray_if_up() is None:
                raise RuntimeError("this process is no longer connected to Ray")
            ref = actor.generate.remote(request, request_id)
        except Exception as exc:  # Ray itself is gone
            self._events.put(("lost", incarnation, request_id, f"submitting to the actor failed: {exc}"))
            return future
        ref.future().add_done_callback(lambda f: self._events.put(("done", incarnation, request_id, f)))
        return future

    def _handle_events(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            kind, incarnation, request_id, payload = event
            try:
                if kind == "lost":
                    self._died(incarnation, payload)
                elif kind == "watch":
                    exc = payload.exception()
                    cause = payload.result() if exc is None else (_classify(exc)[1] or f"{type(exc).__name__}: {exc}")
                    self._died(incarnation, cause)
                else:
                    self._finish(incarnation, request_id, payload)
            except Exception:  # never let one bad event stop the others
                logger.exception("%s: error handling a Ray completion", self.name)

    def _finish(self, incarnation: int, request_id: str, done: concurrent.futures.Future) -> None:
        if done.cancelled():
            error, cause = concurrent.futures.CancelledError(), None
        else:
            exc = done.exception()
            if exc is None:
                future = self._take(request_id)
                if future is not None and not future.done():
                    future.set_result(done.result())
                return
            error, cause = _classify(exc)
        if cause is not None:
            self._died(incarnation, cause)  # fails this request and every other one the actor held
            return
        future = self._take(request_id)
        if future is not None and not future.done():
            future.set_exception(error)

    def _died(self, incarnation: int, cause: str) -> None:
        with self._lock:
            if incarnation != self._incarnation or not self._alive:
                # Already handled (or shut down): its requests were failed then, and
                # self._actor may by now be the replacement a restart is starting.
                return
            self._alive = False
            pending, self._pending = self._pending, {}
            actor = self._actor
        self._fail(pending.values(), f"{self.name} died: {cause}")
        _ray_kill(actor)
        # At once, restart or not: a group whose node is lost would keep Ray's GCS busy.
        self._backend.drop_placement(self)
        self._on_death(self, cause)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        base = {"replica": self.index, "device": self.device, "node_id": self.node_id,
                "node_ip": self.info.get("node_ip"), "alive": self._alive, "restarts": self.restarts}
        ray = _ray_if_up()
        if not self._alive or ray is None:
            return base
        try:
            return {**base, **ray.get(self._actor.stats.remote(), timeout=timeout)}
        except Exception:
            return base

    # -------------------------------------------------------------- lifetime

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._alive = False
            pending, self._pending = self._pending, {}
            actor = self._actor
        self._fail(pending.values(), f"{self.name} was shut down")
        ray = _ray_if_up()
        if actor is not None and ray is not None:
            try:
                ray.get(actor.shutdown.remote(), timeout=timeout)  # stops the engine processes in order
            except Exception:
                pass
        self.kill()
        self._events.put(None)
        self._backend._replica_closed(self)

    def kill(self) -> None:
        """Kill the actor at once; Ray ends its child processes (the engine's) with it."""
        _ray_kill(self._actor)

    @property
    def closed(self) -> bool:
        return self._closed


def _ray_if_up():
    """Ray, if this process is still connected. Every call made after a shutdown
    goes through here: most Ray calls would otherwise start a new local instance
    (at interpreter exit, Ray's own atexit handler may already have disconnected)."""
    import ray

    return ray if ray.is_initialized() else None


def _ray_kill(actor) -> None:
    ray = _ray_if_up()
    if actor is None or ray is None:
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead
        pass


# ------------------------------------------------------------------ the backend

# ray.init() is process-wide: the backends that share a connection we opened
# close it when the last one is done.
_RAY_LOCK = threading.Lock()
_RAY_STATE = {"users": 0, "owned": False, "atexit": False}
_BACKENDS: weakref.WeakSet = weakref.WeakSet()


def _shutdown_backends() -> None:
    """At interpreter exit, stop the engines in order while Ray is still connected.

    Registered after ``ray.init``, so it runs before Ray's own exit handlers
    (atexit runs the last registered first), which would otherwise disconnect
    (or stop a local instance) first and leave Ray to kill the actors, their
    engines with them."""
    for backend in list(_BACKENDS):
        try:
            backend.shutdown(timeout=10)
        except Exception:
            pass


def _ray_connect(address: str | None):
    import ray

    with _RAY_LOCK:
        if not ray.is_initialized():
            try:
                ray.init(address=address or None, logging_level=logging.WARNING)
            except (ConnectionError, ValueError) as exc:
                why = str(exc).rstrip(".")
                raise ConfigurationError(
                    f"Could not connect to a Ray cluster at ray_address={address!r}: {why}. Start one with "
                    "`ray start --head` (and `ray start --address=HEAD_IP:6379` on the other nodes), or pass "
                    "ray_address=None for a Ray instance on this machine only."
                ) from exc
            _RAY_STATE["owned"] = True
        elif address not in (None, "auto"):
            logger.warning("Ray is already initialised in this process; ray_address=%r is ignored.", address)
        if not _RAY_STATE["atexit"]:  # after ray.init, which registers exit handlers of its own
            atexit.register(_shutdown_backends)
            _RAY_STATE["atexit"] = True
        _RAY_STATE["users"] += 1
    return ray


def _ray_release() -> None:
    import ray

    with _RAY_LOCK:
        _RAY_STATE["users"] -= 1
        if _RAY_STATE["users"] <= 0 and _RAY_STATE["owned"]:
            _RAY_STATE["owned"] = False
            try:
                ray.shutdown()
            except Exception:
                pass


def _alive_nodes(ray) -> list[RayNode]:
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        nodes.append(RayNode(node_id=node["NodeID"], ip=node.get("NodeManagerAddress", "?"),
                             cpus=int(resources.get("CPU", 0)), gpus=int(resources.get("GPU", 0))))
    return nodes


class RayBackend:
    """Replicas as Ray actors over a Ray cluster.

    ``ray_address``: ``"auto"`` or ``"HEAD_IP:6379"`` joins a running cluster
    (``"auto"``: the one ``$RAY_ADDRESS`` names or the last one ``ray start``
    started on this machine); None does the same but starts a Ray instance on
    this machine only when there is none. If Ray is already initialised in this
    process, that connection is used.
    Placement is checked in the constructor, before any engine starts.

    Each replica has a placement group of its own with one bundle (all of the
    replica's resources, so on one node). Ray places single-bundle groups on the
    least used node that fits, which spreads the replicas over the nodes. Not one
    group with a bundle per replica: when a node is lost, such a group goes to
    RESCHEDULING and, while the lost bundle fits nowhere, Ray 2.60's GCS and
    dashboard agent spin on it (measured: 35-90% of a core each, for as long as
    the group exists), and the group can only be removed whole, which kills the
    surviving replicas too. A replica's own group is removed the moment it dies.
    """

    def __init__(self, *, num_gpus: int | None, gpus: Sequence[int] | None, tensor_parallel_size: int,
                 num_replicas: int | None, ray_address: str | None, start_timeout: float | None,
                 placement_timeout: float = 60.0):
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError(
                f"backend='ray' needs Ray: pip install 'vllm-dspy-adapter[ray]' ({exc})"
            ) from exc
        self._lock = threading.Lock()
        self._released = False
        self.replicas: list[RayReplica] = []
        self.start_timeout = start_timeout
        # How long placing a replica may wait for a node with room: at start, and
        # at each restart (after which the pool continues without the replica).
        self.placement_timeout = placement_timeout
        self._ray = _ray_connect(ray_address)
        try:
            self.nodes = _alive_nodes(self._ray)
            self.plan = plan_ray_placement(num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
                                           num_replicas=num_replicas, nodes=self.nodes)
        except BaseException:
            self._release()
            raise
        self.tensor_parallel_size = tensor_parallel_size
        self._spec: EngineSpec | None = None
        self._open = 0
        _BACKENDS.add(self)

    # ---------------------------------------------------------------- start

    def start(self, spec: EngineSpec, on_death) -> list[RayReplica]:
        if self.plan.gpus_per_replica > 1:
            # In a placement group vLLM would pick its Ray executor and ask Ray for
            # GPUs this actor already holds; its multiprocessing executor uses them.
            spec = spec.with_engine_kwargs(
                distributed_executor_backend=spec.engine_kwargs.get("distributed_executor_backend", "mp"))
        self._spec = spec
        replicas = [RayReplica(self, i, on_death) for i in range(self.plan.count)]
        self.replicas = replicas
        self._open = len(replicas)
        deadline = time.monotonic() + self.placement_timeout
        errors = []
        try:
            nodes = [self._place(replica, deadline, probe=False) for replica in replicas]
            for replica, node_id in zip(replicas, nodes):  # every actor first, so the engines load in parallel
                self._launch(replica, node_id)
        except Exception as exc:
            errors.append(str(exc))
        if not errors:
            for replica in replicas:
                try:
                    replica.wait_ready(self.start_timeout)
                except Exception as exc:
                    errors.append(str(exc))
        if errors:
            for replica in replicas:
                replica.shutdown(timeout=5)  # the last one removes the groups and closes Ray
            raise ReplicaStartError("Replica start failed; nothing is left running.\n  " + "\n  ".join(errors))
        return replicas

    def _place(self, replica: RayReplica, deadline: float, *, probe: bool) -> str:
        """Reserve the replica's resources in a placement group of its own; the node it got.

        With ``probe``, a no-op task confirms the node is alive: just after a node
        loss the GCS may not know yet and could place the group on the lost node."""
        ray = self._ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        while True:
            self.drop_placement(replica)
            pg = placement_group([self.plan.bundle], strategy="STRICT_PACK")
            replica._pg = pg
            while not pg.wait(1):
                if replica.closed:
                    raise ReplicaStartError(f"{replica.name}: shut down")
                if time.monotonic() > deadline:
                    self.drop_placement(replica)
                    raise ReplicaStartError(
                        f"no node has room for {replica.name} ({self.plan.describe()}) within "
                        f"{self.placement_timeout:.0f} s; the cluster: {_cluster_text(_alive_nodes(ray))}"
                    )
            node_id = placement_group_table(pg)["bundles_to_node_id"][0]
            if not probe:
                return node_id
            check = ray.remote(_node_id).options(
                num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg)).remote()
            try:
                return ray.get(check, timeout=max(deadline - time.monotonic(), 10.0))
            except Exception:  # that node is gone (or hung): place again
                ray.cancel(check, force=True)
                if time.monotonic() > deadline or replica.closed:
                    self.drop_placement(replica)
                    raise ReplicaStartError(f"{replica.name}: found no live node with room within "
                                            f"{self.placement_timeout:.0f} s") from None

    def _launch(self, replica: RayReplica, node_id: str) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
        options: dict[str, Any] = {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=replica._pg),
            "max_restarts": 0,  # the pool restarts replicas (and resubmits their requests), not Ray
            "max_concurrency": _MAX_CONCURRENCY,
        }
        if self.plan.gpus_per_replica:
            options.update(num_gpus=self.plan.gpus_per_replica, num_cpus=0)
            replica._cpu_slot = None
        else:
            replica._cpu_slot = self._cpu_slot(replica, node_id)
            offset, per = replica._cpu_slot
            env.update(VLLM_CPU_OMP_THREADS_BIND=_cores_text(offset, per), CUDA_VISIBLE_DEVICES="")
            options["num_cpus"] = per
        options["runtime_env"] = {"env_vars": env}
        actor_class = self._ray.remote(VLLMReplica)
        replica.launch(actor_class, options, self._spec, logging.getLogger().getEffectiveLevel())

    def _cpu_slot(self, replica: RayReplica, node_id: str) -> tuple[int, int]:
        """A block of cores of the replica's host that no other replica there binds.

        A host's cores are the CPUs of every Ray node on its IP address: one node
        per machine in a real cluster, several in a test cluster on one machine,
        whose replicas must still bind different cores."""
        nodes = _alive_nodes(self._ray)
        ip = next((node.ip for node in nodes if node.node_id == node_id), None)
        host_cores = sum(node.cpus for node in nodes if node.ip == ip) or self.plan.cpus_per_replica
        with self._lock:
            taken = {other._cpu_slot[0] for other in self.replicas
                     if other is not replica and other._host_ip == ip and other._cpu_slot is not None
                     and (other.alive or other._starting)}
            offset = _free_offset(host_cores, self.plan.cpus_per_replica, taken)
            replica._host_ip = ip
        return offset, self.plan.cpus_per_replica

    # -------------------------------------------------------------- restart

    def restart(self, replica: RayReplica) -> None:
        """A new actor for a dead replica, on any node with room (its old one if it
        is still there); raises when none has room within ``placement_timeout``,
        and the pool continues without the replica."""
        replica.kill()
        node_id = self._place(replica, time.monotonic() + self.placement_timeout, probe=True)
        if replica.closed:
            self.drop_placement(replica)
            raise ReplicaStartError(f"{replica.name}: shut down")
        self._launch(replica, node_id)
        try:
            replica.wait_ready(self.start_timeout)
        except BaseException:
            self.drop_placement(replica)
            raise

    def drop_placement(self, replica: RayReplica) -> None:
        """Remove a replica's placement group (killing whatever actor still runs in it)."""
        pg, replica._pg = replica._pg, None
        if pg is None or _ray_if_up() is None:
            return
        try:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)
        except Exception:  # Ray gone, or the group already removed
            pass

    # -------------------------------------------------------------- lifetime

    def shutdown(self, timeout: float = 30.0) -> None:
        """Shut every replica down (in parallel); the last one out closes the rest."""
        replicas = [r for r in self.replicas if not r.closed]
        if not replicas:
            self._release()
            return
        threads = [threading.Thread(target=r.shutdown, args=(timeout,), daemon=True) for r in replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 15)

    def _replica_closed(self, replica: RayReplica) -> None:
        self.drop_placement(replica)
        with self._lock:
            self._open -= 1
            last = self._open <= 0
        if last:
            self._release()

    def _release(self) -> None:
        """Disconnect from Ray if this process connected for us (and we are the last user)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        _ray_release()


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
