"""Where replicas run: pure rules, no engine, no Ray calls.

One set of rules for both backends: the local one (``plan_placement``: GPUs of
this machine, or CPU core ranges) and the Ray one (``plan_ray_placement``: GPU
or CPU slots counted over a cluster's nodes). Every request the hardware cannot
meet is refused here with a ``ConfigurationError``, before anything starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ConfigurationError

logger = logging.getLogger(__name__)

__all__ = ["Placement", "plan_placement", "visible_gpu_count", "cpu_env", "RayNode", "RayPlan",
           "plan_ray_placement", "free_core_offset", "cores_text", "split_device", "number_shares", "replica_share",
           "replica_memory", "gpu_memory_bytes", "DEFAULT_GPU_MEMORY_UTILIZATION"]

# vLLM's own default: the share of a GPU's memory its engines may take, in all.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9

# vLLM's CPU build otherwise reserves most of the RAM for its KV cache and
# refuses to start beside anything else.
_CPU_KVCACHE_GIB = "2"


@dataclass(frozen=True)
class Placement:
    """The devices of one replica and the environment that pins it to them."""

    index: int
    device: str  # "cuda:0,1", "cpu:0-3", or "cuda:0#1" for the second of several replicas on GPU 0
    env: dict[str, str] = field(default_factory=dict)
    share: int = 0  # which of the replicas sharing its GPU(s) this one is; replicas of share s start together


def split_device(device: str) -> tuple[str, int]:
    """``"cuda:0#1"`` -> ``("cuda:0", 1)``: the GPU and the replica's share of it; a device
    without ``#`` is share 0 of itself."""
    base, sep, share = device.rpartition("#")
    if sep and share.isdigit():
        return base, int(share)
    return device, 0


def number_shares(devices: Sequence[str]) -> list[str]:
    """Tell apart replicas that report the same device (several on one GPU, as Ray places
    them): each such device gets ``#0``, ``#1``, ... (its share) in order; a device seen
    once is kept."""
    counts: dict[str, int] = {}
    for device in devices:
        counts[device] = counts.get(device, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for device in devices:
        if counts[device] > 1:
            out.append(f"{device}#{seen.get(device, 0)}")
            seen[device] = seen.get(device, 0) + 1
        else:
            out.append(device)
    return out


def gpu_memory_bytes() -> int | None:
    """The first visible GPU's memory in bytes (NVML, without initialising CUDA); None if unknown."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            first = int(visible.split(",")[0]) if visible and visible.split(",")[0].strip().isdigit() else 0
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(first)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def replica_memory(total: float | None, replicas_per_gpu: int, *, gpu_bytes: int | None = None,
                   model_bytes: int | None = None, min_kv_bytes: int = 0) -> float:
    """Each replica's ``gpu_memory_utilization`` when ``replicas_per_gpu`` share a GPU:
    the user's total (vLLM's default 0.9 when None) split evenly.

    Refused with a ``ConfigurationError`` when a replica's share cannot hold the model
    (``model_bytes``, when known) plus 1.5 GiB for activations and CUDA graphs plus
    ``min_kv_bytes`` of KV cache (one sequence of ``max_model_len`` tokens), or is below 2%
    of the GPU when the model's size is unknown.
    """
    total = DEFAULT_GPU_MEMORY_UTILIZATION if total is None else total
    if not isinstance(total, (int, float)) or not 0 < total <= 1:
        raise ConfigurationError(f"gpu_memory_utilization must be in (0, 1], got {total!r}")
    share = total / replicas_per_gpu
    fix = (f"use fewer replicas per GPU (replicas_per_gpu={replicas_per_gpu} now), a higher "
           f"gpu_memory_utilization (the total for all replicas of a GPU, {total:g} now), or a smaller "
           "max_model_len")
    if share < 0.02:
        raise ConfigurationError(f"replicas_per_gpu={replicas_per_gpu} leaves each replica "
                                 f"gpu_memory_utilization={share:.3f}: too little for any model; {fix}.")
    if gpu_bytes and model_bytes:
        need = model_bytes + int(1.5 * 2**30) + min_kv_bytes
        have = int(share * gpu_bytes)
        if have < need:
            raise ConfigurationError(
                f"replicas_per_gpu={replicas_per_gpu}: each replica gets {share:.3f} of the GPU's "
                f"{gpu_bytes / 2**30:.0f} GiB = {have / 2**30:.1f} GiB, but the model's weights "
                f"({model_bytes / 2**30:.1f} GiB), activations (about 1.5 GiB) and a KV cache for one "
                f"max_model_len sequence ({min_kv_bytes / 2**30:.1f} GiB) need {need / 2**30:.1f} GiB; {fix}.")
    return round(share, 4)


def replica_share(model: str | None, total: float | None, replicas_per_gpu: int, engine_kwargs: dict) -> float:
    """Each replica's gpu_memory_utilization, refused before any start when the model
    (estimated from its config.json) and one max_model_len sequence would not fit."""
    from ..models import estimate_memory, resolve_model

    estimate = estimate_memory(resolve_model(model))
    min_kv = 0
    if estimate is not None and engine_kwargs.get("max_model_len"):
        min_kv = estimate[1] * int(engine_kwargs["max_model_len"])
    share = replica_memory(total, replicas_per_gpu, gpu_bytes=gpu_memory_bytes(),
                           model_bytes=estimate[0] if estimate else None, min_kv_bytes=min_kv)
    logger.info("replicas_per_gpu=%d: each replica gets gpu_memory_utilization=%g (%g per GPU in all)",
                replicas_per_gpu, share, total if total is not None else 0.9)
    return share


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


def cpu_env(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """What an engine on a machine without GPUs needs set: a CPU KV cache of a
    size that leaves room for anything else (unless the user chose one)."""
    return {} if "VLLM_CPU_KVCACHE_SPACE" in environ else {"VLLM_CPU_KVCACHE_SPACE": _CPU_KVCACHE_GIB}


def cores_text(first: int, count: int) -> str:
    return str(first) if count == 1 else f"{first}-{first + count - 1}"


def _check_replicas_per_gpu(replicas_per_gpu: int, tensor_parallel_size: int) -> None:
    if not isinstance(replicas_per_gpu, int) or isinstance(replicas_per_gpu, bool) or replicas_per_gpu < 1:
        raise ConfigurationError(f"replicas_per_gpu must be an int >= 1, got {replicas_per_gpu!r}")
    if replicas_per_gpu > 1 and tensor_parallel_size > 1:
        raise ConfigurationError(
            f"replicas_per_gpu={replicas_per_gpu} shares one GPU between replicas; it cannot be combined with "
            f"tensor_parallel_size={tensor_parallel_size} (one replica over several GPUs). Pass one of them.")


def plan_placement(*, num_gpus: int | None, gpus: Sequence[int] | None, tensor_parallel_size: int,
                   num_replicas: int | None, available_gpus: int, cpu_count: int,
                   replicas_per_gpu: int = 1) -> list[Placement]:
    """Decide the replicas' devices on this machine.

    With ``replicas_per_gpu=k``, k replicas share each GPU: replica ``s * G + g`` is the
    ``s``-th on the ``g``-th GPU (device ``cuda:<id>#<s>``), so the first G replicas sit on
    distinct GPUs; ``num_replicas`` then counts replicas (k per GPU)."""
    if tensor_parallel_size < 1:
        raise ConfigurationError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    _check_replicas_per_gpu(replicas_per_gpu, tensor_parallel_size)
    k = replicas_per_gpu
    asked = num_replicas
    if num_replicas is not None and k > 1 and num_replicas >= 1 and available_gpus > 0:
        if num_replicas % k:
            raise ConfigurationError(f"num_replicas={num_replicas} is not a multiple of replicas_per_gpu={k}")
        num_replicas //= k  # from here on: replicas of one share, one per GPU
    if num_replicas is not None and num_replicas < 1:
        raise ConfigurationError(f"num_replicas must be >= 1, got {num_replicas}; leave it out for one per GPU.")
    if num_gpus is not None and num_gpus < 1:
        raise ConfigurationError(f"num_gpus must be >= 1, got {num_gpus}; leave it out for every visible GPU.")
    if gpus is not None:
        gpu_ids = [int(g) for g in gpus]
        if not gpu_ids:
            raise ConfigurationError("gpus=[] names no GPU; leave it out for every visible GPU.")
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
        if wanted > available_gpus:
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
                f"num_replicas={asked} but {len(gpu_ids)} GPU(s) / tensor_parallel_size="
                f"{tensor_parallel_size} x replicas_per_gpu={k} make {count * k}; on GPUs the replica count "
                "follows from num_gpus."
            )
        plans = []
        for share in range(k):
            for i in range(count):
                ids = gpu_ids[i * tensor_parallel_size:(i + 1) * tensor_parallel_size]
                device = "cuda:" + ",".join(map(str, ids)) + (f"#{share}" if k > 1 else "")
                plans.append(Placement(share * count + i, device,
                                       {"CUDA_VISIBLE_DEVICES": ",".join(map(str, _physical(ids)))}, share))
        return plans
    if k > 1:
        raise ConfigurationError(
            f"replicas_per_gpu={k} shares GPUs between replicas, but no GPU is visible here. On a CPU-only "
            "machine pass num_replicas=N to run N CPU replicas that split the cores.")
    if num_gpus:
        raise ConfigurationError(
            f"num_gpus={num_gpus} but no GPU is visible here. On a CPU-only machine pass "
            "num_replicas=N to run N CPU replicas that split the cores."
        )
    count = 1 if num_replicas is None else num_replicas
    if count > cpu_count:
        raise ConfigurationError(f"num_replicas={count} CPU replicas need at least as many cores; this machine has {cpu_count}")
    per = cpu_count // count
    plans = []
    for i in range(count):
        cores = cores_text(i * per, per)
        # vLLM's CPU backend binds its OpenMP threads to these cores; without
        # distinct sets, replicas would fight over the same cores.
        plans.append(Placement(i, f"cpu:{cores}", {"VLLM_CPU_OMP_THREADS_BIND": cores, "CUDA_VISIBLE_DEVICES": "",
                                                   **cpu_env()}))
    return plans


def _physical(ids: list[int]) -> list[str]:
    """Map indices within the driver's visible GPUs to what the child must see."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return [str(i) for i in ids]
    names = [d.strip() for d in visible.split(",") if d.strip()]
    return [names[i] for i in ids]


# ------------------------------------------------------------------ Ray clusters


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
    gpus_per_replica: float  # 0 for CPU replicas; 1/k when k replicas share each GPU
    cpus_per_replica: int  # CPU replicas only; a GPU replica asks for no CPU
    replicas_per_gpu: int = 1

    @property
    def bundle(self) -> dict[str, float]:
        if self.gpus_per_replica:
            return {"GPU": float(self.gpus_per_replica)}
        return {"CPU": float(self.cpus_per_replica)}

    def describe(self) -> str:
        if self.gpus_per_replica:
            return f"{self.gpus_per_replica:g} GPU"
        return f"{self.cpus_per_replica} CPU"


def cluster_text(nodes: Sequence[RayNode]) -> str:
    return "; ".join(node.describe() for node in nodes) or "no alive node"


def plan_ray_placement(*, num_gpus: int | None, gpus: Sequence[int] | None, tensor_parallel_size: int,
                       num_replicas: int | None, nodes: Sequence[RayNode], replicas_per_gpu: int = 1) -> RayPlan:
    """See ``_plan_ray``; ``replicas_per_gpu=k`` puts k replicas on each GPU (each asks Ray
    for 1/k of a GPU) and makes ``num_replicas`` count replicas, k per GPU."""
    _check_replicas_per_gpu(replicas_per_gpu, tensor_parallel_size)
    k = replicas_per_gpu
    if k == 1:
        return _plan_ray(num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
                         num_replicas=num_replicas, nodes=nodes)
    if not any(node.gpus for node in nodes):
        raise ConfigurationError(f"replicas_per_gpu={k} shares GPUs between replicas, but the Ray cluster has no "
                                 f"GPU ({cluster_text(nodes)}); on CPU nodes pass num_replicas=N.")
    if num_replicas is not None and num_replicas % k:
        raise ConfigurationError(f"num_replicas={num_replicas} is not a multiple of replicas_per_gpu={k}")
    plan = _plan_ray(num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=1, nodes=nodes,
                     num_replicas=None if num_replicas is None else num_replicas // k)
    return RayPlan(plan.count * k, 1 / k, 0, k)


def _plan_ray(*, num_gpus: int | None, gpus: Sequence[int] | None, tensor_parallel_size: int,
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
    if num_replicas is not None and num_replicas < 1:
        raise ConfigurationError(f"num_replicas must be >= 1, got {num_replicas}")
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
                f"room for {fits}: {cluster_text(nodes)}."
            )
        return RayPlan(count, tensor_parallel_size, 0)
    if num_gpus:
        raise ConfigurationError(
            f"num_gpus={num_gpus} but the Ray cluster has no GPU ({cluster_text(nodes)}). On CPU nodes pass "
            "num_replicas=N to run N CPU replicas."
        )
    if tensor_parallel_size > 1:
        raise ConfigurationError("tensor_parallel_size > 1 needs GPUs; the Ray cluster has none.")
    count = 1 if num_replicas is None else num_replicas
    total_cpus = sum(node.cpus for node in nodes)
    if count > total_cpus:
        raise ConfigurationError(
            f"num_replicas={count} CPU replicas need at least one CPU each and the Ray cluster has {total_cpus}: "
            f"{cluster_text(nodes)}."
        )
    # The most CPUs per replica that still lets every replica fit on some node.
    per = max(c for c in range(1, max(node.cpus for node in nodes) + 1)
              if sum(node.cpus // c for node in nodes) >= count)
    return RayPlan(count, 0, per)


def free_core_offset(host_cores: int, per: int, taken: set[int]) -> int:
    """The first block of ``per`` cores of a host that no other replica binds."""
    for offset in range(0, max(host_cores - per, 0) + 1, per):
        if offset not in taken:
            return offset
    return (len(taken) * per) % max(host_cores, 1)  # oversubscribed host: share, as the OS would
