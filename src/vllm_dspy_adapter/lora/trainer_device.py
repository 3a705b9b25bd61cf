"""Where the GRPO trainer runs, and whether it fits there: pure logic, no torch.

- The CPU build (replicas on the CPU, or no GPU visible): the trainer trains on the CPU.
- ``train_kwargs={"device": "cuda:N"}``: that GPU. On several GPUs, name one the
  replicas do not use and they keep the others.
- Otherwise: a visible GPU no replica uses, if any; else the replicas' first GPU,
  shared with them.

On a GPU the replicas also use, the replicas hold ``gpu_memory_utilization`` of it
(each replica's share times the replicas on that GPU); the trainer needs the
model's weights plus room for the adapter, its optimiser and the activations.
``check_room`` refuses, before the trainer loads anything, a GPU where that does
not fit, naming the ``gpu_memory_utilization`` that would leave the room.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import ConfigurationError

__all__ = ["ServingPlacement", "choose_trainer_device", "check_room", "trainer_bytes", "usable_cores"]

GIB = 1 << 30
VLLM_DEFAULT_UTILIZATION = 0.9
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def usable_cores() -> int:
    """The cores this process may run on: a CPU trainer's threads when ``cpu_threads`` is unset."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ServingPlacement:
    """What the trainer's placement depends on, as the LM knows it."""

    replica_devices: tuple[str, ...]  # "cuda:0", "cuda:1#0", "cpu:0-3", "node:10.0.0.2/gpu:1", ...
    gpu_count: int  # GPUs visible to this process
    gpu_memory_utilization: float | None  # each replica's share (None: vLLM's default)
    model_bytes: int | None  # the base model's weights (None: unknown)
    gpu_bytes: int | None  # one GPU's memory (None: unknown or no GPU)


def _gpu_index(device: str) -> int | None:
    """The local GPU index of a replica's device ("cuda:1#0" -> 1), None for CPU or remote."""
    match = re.match(r"^cuda:(\d+)", device)
    return int(match.group(1)) if match else None


def choose_trainer_device(requested: str | None, placement: ServingPlacement) -> str:
    """The trainer's torch device (see the module docstring)."""
    if requested is not None:
        if requested == "cpu":
            return "cpu"
        match = _CUDA.match(str(requested))
        if not match:
            raise ConfigurationError(f"train_kwargs device={requested!r} is not a device: use 'cpu' or 'cuda:N'.")
        index = int(match.group(1) or 0)
        if index >= placement.gpu_count:
            raise ConfigurationError(f"train_kwargs device={requested!r}: this process sees {placement.gpu_count} "
                                     f"GPU(s); use 'cuda:0' to 'cuda:{placement.gpu_count - 1}'."
                                     if placement.gpu_count else
                                     f"train_kwargs device={requested!r}: no GPU is visible; use 'cpu'.")
        return f"cuda:{index}"
    used = {_gpu_index(d) for d in placement.replica_devices} - {None}
    if placement.gpu_count == 0 or not used:
        return "cpu"
    free = [i for i in range(placement.gpu_count) if i not in used]
    return f"cuda:{free[0] if free else min(used)}"


def trainer_bytes(model_bytes: int) -> int:
    """GPU memory the trainer needs: the weights, ~20% for the adapter, its optimiser
    and the gradients' buffers, and 1 GiB of activations and allocator slack."""
    return int(model_bytes * 1.2) + GIB


def check_room(device: str, placement: ServingPlacement) -> None:
    """On a GPU the replicas share, refuse a ``gpu_memory_utilization`` that leaves the
    trainer too little; nothing to check on the CPU or on a GPU of its own."""
    index = _gpu_index(device)
    if index is None or placement.model_bytes is None or not placement.gpu_bytes:
        return
    sharing = sum(1 for d in placement.replica_devices if _gpu_index(d) == index)
    if not sharing:
        return
    share = placement.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION
    used = share * sharing
    need = trainer_bytes(placement.model_bytes) / placement.gpu_bytes
    if used + need <= 0.97:
        return
    fit = max(0.0, (0.97 - need) / sharing)
    advice = (f"build the LM with gpu_memory_utilization={fit:.2f} or less" if fit * sharing > 0.05 else
              "the model is too large to train beside its replicas on one GPU")
    raise ConfigurationError(
        f"The GRPO trainer needs about {trainer_bytes(placement.model_bytes) / GIB:.1f} GiB on {device}, but its "
        f"{sharing} replica(s) hold {used:.0%} of its {placement.gpu_bytes / GIB:.0f} GiB "
        f"(gpu_memory_utilization={share:g}): {advice}, or pass train_kwargs={{'device': 'cuda:N'}} with a GPU "
        "the replicas do not use.")
