"""Replica backends: what starts replicas and where they run.

- ``inprocess``: one engine in this process (``vLLMOffline``);
- ``local``: one worker process per replica on this machine (``process.py`` + ``worker.py``);
- ``ray``: one Ray actor per replica over a Ray cluster (``ray.py`` + ``ray_actor.py``).

Each implements the ``Backend`` contract of ``protocol.py``; ``base.py`` holds
what they share; ``placement.py`` plans where replicas go (GPUs, CPU core ranges, Ray
nodes: pure). ``make_backend`` picks one by name and checks placement, so a bad
request fails before anything starts.

May import: ``engine`` and the shared modules (``config``, ``errors``, ``protocol``,
``models``). Imports nothing of ``serving`` or ``lm`` (``tests/test_layers.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import ConfigurationError
from .placement import plan_placement, visible_gpu_count
from ..protocol import Backend

__all__ = ["make_backend", "BACKENDS"]

BACKENDS = ("local", "ray")


def make_backend(name: str, *, num_gpus: int | None = None, gpus: Sequence[int] | None = None,
                 tensor_parallel_size: int = 1, num_replicas: int | None = None, ray_address: str | None = None,
                 start_timeout: float | None = None, placement_timeout: float = 60.0,
                 replicas_per_gpu: int = 1) -> Backend:
    """The backend by name ("inprocess", "local" or "ray"); placement errors surface here."""
    if name == "inprocess":
        from .inprocess import InProcessBackend

        return InProcessBackend(start_timeout)
    if name == "local":
        if ray_address is not None:
            raise ConfigurationError("ray_address is only used with backend='ray'")
        from .process import ProcessBackend

        placements = plan_placement(num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
                                    num_replicas=num_replicas, available_gpus=visible_gpu_count(),
                                    cpu_count=os.cpu_count() or 1, replicas_per_gpu=replicas_per_gpu)
        return ProcessBackend(placements, start_timeout)
    if name == "ray":
        try:
            from .ray import RayBackend
        except ImportError as exc:
            raise ConfigurationError(f"backend='ray' needs Ray: pip install 'vllm-dspy-adapter[ray]' ({exc})") from exc
        return RayBackend(num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
                          num_replicas=num_replicas, ray_address=ray_address, start_timeout=start_timeout,
                          placement_timeout=placement_timeout, replicas_per_gpu=replicas_per_gpu)
    raise ConfigurationError(f"Unknown backend {name!r}; choose one of {', '.join(map(repr, BACKENDS))}")
