"""The in-process backend: one ``Engine`` in the user's own process (``vLLMOffline``).

The engine is a replica like any other, so ``vLLMOffline`` and
``vLLMOfflineMultiGPU`` share one start path, one pool and one death and stall
handling. Its pulse is the engine's probe count (``Engine.ticks``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from typing import Any

from ..config import ModelSpec
from ..errors import ReplicaStartError
from .placement import cpu_env, visible_gpu_count
from ..protocol import ModelFacts, GenerationRequest, OnDeath
from .model_facts import vllm_model_facts
from .base import ReplicaHandle, start_all

__all__ = ["InProcessReplica", "InProcessBackend", "inprocess_device"]

logger = logging.getLogger(__name__)


def inprocess_device(gpu_count: int, tensor_parallel_size: int = 1) -> str:
    """Where an engine of this process runs, in the replicas' device names: vLLM takes
    the first visible GPU(s), so "cuda:0" ("cuda:0,1" with tensor parallelism), or
    "cpu" on a machine without GPUs. The GRPO trainer's placement reads it: an unknown
    name would put the trainer on the CPU beside a GPU engine."""
    if gpu_count == 0:
        return "cpu"
    return "cuda:" + ",".join(str(i) for i in range(max(1, tensor_parallel_size)))


class InProcessReplica(ReplicaHandle):
    """A replica whose engine runs in this process (its engine core in a child)."""

    def __init__(self, spec: ModelSpec, on_death: OnDeath, start_timeout: float | None):
        tp = int(spec.engine_kwargs.get("tensor_parallel_size") or 1)
        super().__init__(0, inprocess_device(visible_gpu_count(), tp), on_death)
        self.name = "engine"
        self.spec = spec
        self.start_timeout = start_timeout
        self.engine = None
        self._watch_stop = threading.Event()
        self.reports_cache_events = spec.cache_events

    def start(self) -> None:
        from ..engine.engine import Engine

        if self.device == "cpu":  # no GPU visible (read once, in __init__)
            for key, value in cpu_env().items():
                os.environ[key] = value
                logger.info("no GPU and no %s: using %s GiB of CPU KV cache", key, value)
        self.engine = Engine(self.spec, name=self.name, start_timeout=self.start_timeout,
                             on_dead=lambda exc: self._died(incarnation, str(exc)))
        incarnation = self._became_ready(self.engine.info())

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def last_progress(self) -> float:
        engine = self.engine
        if engine is not None:
            self._pulse(engine.ticks, engine.in_flight)
        return self._progress

    def submit(self, request: GenerationRequest, request_id: str | None = None, *,
               sink=None) -> concurrent.futures.Future:
        request_id, future, incarnation = self._admit(request_id)
        if incarnation is None:
            return future
        inner = self.engine.submit(request, request_id, sink=sink)  # pieces go straight to the channel
        inner.add_done_callback(lambda done: self._deliver(incarnation, request_id, done))
        return future

    def take_cache_events(self) -> list:
        engine = self.engine
        if engine is not None:
            self._add_cache_events(self._incarnation, engine.take_cache_events())
        return super().take_cache_events()

    def _abort(self, request_id: str) -> None:
        engine = self.engine
        if engine is not None:
            engine.cancel(request_id)

    def _deliver(self, incarnation: int, request_id: str, done: concurrent.futures.Future) -> None:
        if done.cancelled():  # cancel(): the request was already forgotten here
            return
        error = done.exception()
        if error is None:
            self._complete(incarnation, request_id, result=done.result())
        else:
            self._complete(incarnation, request_id, error=error)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        base = self.base_stats()
        return {**base, **self.engine.stats(), "alive": self._alive} if self.engine is not None else base

    def _adapter_call(self, op: str, payload, timeout: float) -> None:
        if op == "add":
            self.engine.add_adapter(payload, timeout=timeout)
        else:
            self.engine.remove_adapter(payload, timeout=timeout)

    def _kill(self) -> None:
        if self.engine is not None:
            self.engine.kill()

    def _stop(self, timeout: float) -> None:
        if self.engine is not None:
            self.engine.shutdown()


class InProcessBackend:
    """One engine in this process (the ``Backend`` contract, with one replica)."""

    def __init__(self, start_timeout: float | None):
        self.start_timeout = start_timeout

    def start(self, spec: ModelSpec, on_death: OnDeath) -> list[InProcessReplica]:
        replica = InProcessReplica(spec, on_death, self.start_timeout)
        return start_all([replica], lambda r: None, InProcessReplica.start)

    def model_facts(self, model, engine_kwargs, sampling) -> ModelFacts:
        return vllm_model_facts(model, engine_kwargs, sampling)

    def restart(self, replica: InProcessReplica) -> None:
        raise ReplicaStartError(f"{replica.name}: a vLLMOffline engine is not restarted; create a new LM")

    def shutdown(self) -> None:
        """Nothing of its own to release."""
