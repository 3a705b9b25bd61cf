"""The Ray actor of one replica: one ``Engine`` in one Ray worker process.

Runs on the node Ray placed it on; the driver's side is ``RayReplica``
(``ray.py``). Imported by Ray on every node, so it imports nothing of the
driver's side.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from ..config import ModelSpec
from ..errors import ReplicaStartError
from .placement import cores_text
from ..protocol import Generation, GenerationRequest

__all__ = ["VLLMReplica"]

logger = logging.getLogger(__name__)


class VLLMReplica:
    """The Ray actor: one ``Engine`` in one Ray worker process.

    Every method is a coroutine, so the actor is an async actor: ``generate``
    calls run concurrently (awaiting the engine's future), which is what lets one
    vLLM batch gather every request the driver sends.
    """

    def __init__(self, spec: ModelSpec, name: str, log_level: int, cpu_slot: tuple[int, int] | None):
        logging.basicConfig(level=log_level, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        import ray

        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.engine = None
        self._pieces = _PieceBuffer()
        self.error: str | None = None
        self.engine_processes: list = []  # psutil.Process objects: killing one never hits a reused pid
        try:
            gpu_ids = [str(g) for g in context.get_accelerator_ids().get("GPU", [])]
            if gpu_ids:
                self.device = f"node:{self.node_ip}/gpu:{','.join(gpu_ids)}"
            else:
                self.device = f"node:{self.node_ip}/cpu:{_check_binding(cpu_slot)}"
            spec = _spec_on_this_node(spec, self.node_ip)
            from ..engine.engine import Engine

            self.engine = Engine(spec, name=name)
            self.engine_processes = _processes(self.engine.info().engine_pids)
        except Exception as exc:  # reported by ready(): the driver decides what to do
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ReplicaStartError) else str(exc)

    async def ready(self) -> dict[str, Any]:
        where = {"node_id": self.node_id, "node_ip": self.node_ip, "pid": os.getpid()}
        if self.error is not None:
            return {**where, "error": self.error}
        info = dataclasses.replace(self.engine.info(), node=self.node_ip)
        return {**where, "info": info, "device": self.device}

    async def generate(self, request: GenerationRequest, request_id: str, streamed: bool = False) -> Generation:
        """One request; a streamed one leaves its pieces for ``take_pieces`` as they are decoded."""
        stream = _PieceBuffer.Sink(self._pieces, request_id) if streamed else None
        return await asyncio.wrap_future(self.engine.submit(request, request_id, sink=stream))

    async def cancel(self, request_id: str) -> None:
        """The driver's caller gave up on this request: abort it in the engine."""
        self.engine.cancel(request_id)

    async def take_pieces(self) -> list[tuple[str, str, int]]:
        """Every streamed piece decoded since the last call, of every request: the
        driver polls this while streams run (one call carries all of them)."""
        return self._pieces.take()

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def adapter(self, op: str, payload) -> None:
        """``Engine.add_adapter`` / ``remove_adapter`` off the actor's event loop."""
        method = self.engine.add_adapter if op == "add" else self.engine.remove_adapter
        await asyncio.to_thread(method, payload)

    async def pulse(self) -> tuple[int, int]:
        """The engine's pulse (``Engine.ticks``) and how many requests it holds, read by
        the driver's heartbeat (``ReplicaHandle._pulse``)."""
        return self.engine.ticks, self.engine.in_flight

    async def watch(self) -> str:
        """Returns when the engine has died (the driver then retires this actor);
        fails when the actor itself is lost: either way the driver learns of it."""
        while self.engine.alive:
            await asyncio.sleep(0.5)
        cause = str(self.engine.death or "the vLLM engine died")
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


class _PieceBuffer:
    """Streamed pieces waiting for the driver's next ``take_pieces`` (filled from the engine's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pieces: list[tuple[str, str, int]] = []

    class Sink:
        def __init__(self, buffer: _PieceBuffer, request_id: str):
            self.buffer, self.request_id = buffer, request_id

        def put(self, piece) -> None:
            with self.buffer._lock:
                self.buffer._pieces.append((self.request_id, piece.text, piece.num_tokens))

    def take(self) -> list[tuple[str, str, int]]:
        with self._lock:
            pieces, self._pieces = self._pieces, []
        return pieces


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
        logger.warning("cores %s are not usable here; binding %s instead", cores_text(offset, count), bind)
    return bind


def _spec_on_this_node(spec: ModelSpec, node_ip: str) -> ModelSpec:
    """Weights load on each node from its own disk or hub cache. The default
    model is prepared on the node when the driver's folder is not there; any
    other local folder must exist at the same path on every node."""
    from ..models import DEFAULT_MODEL_NAME, resolve_model

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
