"""Replicas as Ray actors over every node of a Ray cluster (``backend="ray"``).

``RayBackend`` implements the ``Backend`` contract and ``RayReplica``
(``ray_replica.py``) the ``Replica`` one, so the pool and the router work
unchanged over a cluster. The actor itself (one ``Engine`` per actor) is in
``ray_actor.py``.

Why one actor per replica, each hosting its own engine, and not vLLM's own data
parallelism on Ray (``data_parallel_backend="ray"``): there, every rank sits
behind one front end and shares one fate, and requests are balanced without
regard to prefixes. One actor per replica isolates faults exactly as the local
worker processes do (a lost node costs its replicas only; their requests go to
the survivors) and keeps our prefix router in front of the replicas.

Placement: each replica reserves its resources in a placement group of its
own, one bundle (``tensor_parallel_size`` GPUs, or a CPU replica's CPUs) with
``STRICT_PACK``: a replica always sits on one node, and Ray places such groups
on the least used node that fits, which spreads the replicas over the nodes.
Not one group with a bundle per replica: when a node is lost, such a group goes
to RESCHEDULING and, while the lost bundle fits nowhere, Ray 2.60's GCS and
dashboard agent spin on it (measured: 35-90% of a core each), and the group can
only be removed whole, which kills the surviving replicas too. Inside the
actor, vLLM runs its tensor-parallel workers with its multiprocessing executor
on the GPUs Ray assigned. CPU replicas bind vLLM's OpenMP threads to distinct
cores of their host (``VLLM_CPU_OMP_THREADS_BIND``, in the actor's runtime_env).

Ray is imported lazily: ``import vllm_dspy_adapter`` never needs it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..config import ModelSpec
from ..errors import ConfigurationError, ReplicaStartError
from .placement import cluster_text, cores_text, free_core_offset, number_shares, plan_ray_placement, split_device
from ..protocol import ModelFacts, OnDeath
from .model_facts import vllm_model_facts
from .base import start_all
from .ray_cluster import alive_nodes, ray_connect, ray_if_up, ray_release, register
from .ray_cluster import node_id as current_node_id
from .ray_replica import Launch, RayReplica

__all__ = ["RayBackend", "RayReplica"]

logger = logging.getLogger(__name__)

# The driver's settings that every replica gets, as local worker processes
# inherit them. Anything else comes from the environment `ray start` ran in on
# each node. No secrets: a runtime_env is stored by Ray and shown in its dashboard.
FORWARDED_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_DSPY_MODEL", "VLLM_DSPY_CACHE", "VLLM_LOGGING_LEVEL",
                 "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")

# An async actor runs this many requests at once (coroutines, not threads):
# enough never to be the limit in front of vLLM's own scheduler.
_MAX_CONCURRENCY = 100_000


# ------------------------------------------------------------------ the backend

class RayBackend:
    """Replicas as Ray actors over a Ray cluster (the ``Backend`` contract).

    ``ray_address``: ``"auto"`` or ``"HEAD_IP:6379"`` joins a running cluster
    (``"auto"``: the one ``$RAY_ADDRESS`` names or the last one ``ray start``
    started on this machine); None does the same but starts a Ray instance on
    this machine only when there is none. If Ray is already initialised in this
    process, that connection is used. Placement is checked in the constructor,
    before any engine starts. The backend owns each replica's placement group
    and, for CPU replicas, its block of host cores.
    """

    def __init__(self, *, num_gpus: int | None, gpus: Sequence[int] | None, tensor_parallel_size: int,
                 num_replicas: int | None, ray_address: str | None, start_timeout: float | None,
                 placement_timeout: float = 60.0, replicas_per_gpu: int = 1):
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
        self._groups: dict[int, Any] = {}  # replica index -> its placement group
        self._cores: dict[int, tuple[str | None, int]] = {}  # replica index -> (host ip, first core), CPU replicas
        self._ray = ray_connect(ray_address)
        try:
            self.nodes = alive_nodes(self._ray)
            self.plan = plan_ray_placement(num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
                                           num_replicas=num_replicas, nodes=self.nodes,
                                           replicas_per_gpu=replicas_per_gpu)
        except BaseException:
            self._release()
            raise
        self._spec: ModelSpec | None = None
        self._open = 0
        register(self)

    # ---------------------------------------------------------------- start

    def start(self, spec: ModelSpec, on_death: OnDeath) -> list[RayReplica]:
        if self.plan.gpus_per_replica > 1:
            # In a placement group vLLM would pick its Ray executor and ask Ray for
            # GPUs this actor already holds; its multiprocessing executor uses them.
            spec = spec.with_engine_kwargs(
                distributed_executor_backend=spec.engine_kwargs.get("distributed_executor_backend", "mp"))
        self._spec = spec

        def died(replica: RayReplica, cause: str) -> None:
            # At once, restart or not: a group whose node is lost would keep Ray's GCS busy.
            self.drop_placement(replica)
            on_death(replica, cause)

        replicas = [RayReplica(i, died, self._replica_closed) for i in range(self.plan.count)]
        self.replicas = replicas
        self._open = len(replicas)
        deadline = time.monotonic() + self.placement_timeout
        # Several replicas per GPU: Ray, not us, picks the GPU a fractional replica lands on, so
        # they start one after another (each one's memory profiling sees the others).
        one_by_one = (lambda r: r.index) if self.plan.replicas_per_gpu > 1 else None
        try:
            started = start_all(replicas, lambda r: self._launch(r, self._place(r, deadline, probe=False)),
                                lambda r: r.wait_ready(self.start_timeout), wave=one_by_one)
            if self.plan.replicas_per_gpu > 1:
                self._number_shares()
            return started
        except BaseException:
            for replica in replicas:
                replica.shutdown(timeout=5)  # the last one removes the groups and closes Ray
            raise

    def _number_shares(self) -> None:
        """Replicas on one GPU report the same device: name them ``...#0``, ``...#1``."""
        names = number_shares([split_device(r.device)[0] for r in self.replicas])
        for replica, device in zip(self.replicas, names):
            replica.device = device
            replica.share = split_device(device)[1]
            replica.name = f"replica-{replica.index}[{device}]"

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
            self._groups[replica.index] = pg
            while not pg.wait(1):
                if replica.closed:
                    raise ReplicaStartError(f"{replica.name}: shut down")
                if time.monotonic() > deadline:
                    self.drop_placement(replica)
                    raise ReplicaStartError(
                        f"no node has room for {replica.name} ({self.plan.describe()}) within "
                        f"{self.placement_timeout:.0f} s; the cluster: {cluster_text(alive_nodes(ray))}"
                    )
            node_id = placement_group_table(pg)["bundles_to_node_id"][0]
            if not probe:
                return node_id
            check = ray.remote(current_node_id).options(
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

        from .ray_actor import VLLMReplica

        env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
        options: dict[str, Any] = {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=self._groups[replica.index]),
            "max_restarts": 0,  # the pool restarts replicas (and resubmits their requests), not Ray
            "max_concurrency": _MAX_CONCURRENCY,
        }
        cpu_cores = None
        if self.plan.gpus_per_replica:
            options.update(num_gpus=self.plan.gpus_per_replica, num_cpus=0)
            self._cores.pop(replica.index, None)
        else:
            cpu_cores = self._cpu_cores(replica, node_id)
            offset, per = cpu_cores
            env.update(VLLM_CPU_OMP_THREADS_BIND=cores_text(offset, per), CUDA_VISIBLE_DEVICES="")
            options["num_cpus"] = per
        options["runtime_env"] = {"env_vars": env}
        replica.launch(Launch(self._ray.remote(VLLMReplica), options, self._spec, cpu_cores))

    def _cpu_cores(self, replica: RayReplica, node_id: str) -> tuple[int, int]:
        """A block of cores of the replica's host that no other replica there binds.

        A host's cores are the CPUs of every Ray node on its IP address: one node
        per machine in a real cluster, several in a test cluster on one machine,
        whose replicas must still bind different cores."""
        nodes = alive_nodes(self._ray)
        ip = next((node.ip for node in nodes if node.node_id == node_id), None)
        host_cores = sum(node.cpus for node in nodes if node.ip == ip) or self.plan.cpus_per_replica
        with self._lock:
            taken = {offset for index, (host, offset) in self._cores.items()
                     if index != replica.index and host == ip
                     and (self.replicas[index].alive or self.replicas[index].starting)}
            offset = free_core_offset(host_cores, self.plan.cpus_per_replica, taken)
            self._cores[replica.index] = (ip, offset)
        return offset, self.plan.cpus_per_replica

    # -------------------------------------------------------------- restart

    def model_facts(self, model, engine_kwargs, sampling) -> ModelFacts:
        return vllm_model_facts(model, engine_kwargs, sampling)

    def restart(self, replica: RayReplica) -> None:
        """A new actor for a dead replica, on any node with room (its old one if it
        is still there); raises when none has room within ``placement_timeout``,
        and the pool continues without the replica."""
        replica._kill()
        node_id = self._place(replica, time.monotonic() + self.placement_timeout, probe=True)
        try:
            self._launch(replica, node_id)  # refused (ReplicaStartError) once the replica is shut down
            replica.wait_ready(self.start_timeout)
        except BaseException:
            self.drop_placement(replica)
            raise
        if self.plan.replicas_per_gpu > 1:
            self._number_shares()

    def drop_placement(self, replica: RayReplica) -> None:
        """Remove a replica's placement group (killing whatever actor still runs in it)."""
        pg = self._groups.pop(replica.index, None)
        if pg is None or ray_if_up() is None:
            return
        try:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)
        except Exception:  # Ray gone, or the group already removed
            pass

    # -------------------------------------------------------------- lifetime

    def shutdown_replicas(self, timeout: float = 30.0) -> None:
        """Shut every replica down (in parallel); the last one out closes the rest."""
        replicas = [r for r in self.replicas if not r.closed]
        threads = [threading.Thread(target=r.shutdown, args=(timeout,), daemon=True) for r in replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 15)

    def shutdown(self) -> None:
        self.shutdown_replicas()
        self._release()

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
        ray_release()
