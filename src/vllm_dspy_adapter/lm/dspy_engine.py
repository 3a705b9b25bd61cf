"""DSPy 3.4's engine contract over our replicas.

A ``dspy.LM`` is built with ``engine=`` and ``async_engine=`` objects whose
``complete`` takes one canonical ``dspy.lm15.Request`` and returns one
``Response``; DSPy keeps its cache, retries, history, usage tracking,
callbacks, ``copy()`` and ``acall``. ``DSPyEngine`` turns a Request into a
``GenerationRequest`` for the pool and the result back (through the pure
functions of ``render.py``). ``Runtime`` is what an LM and all its copies share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any

from ..config import ModelSpec, lora_slots_warning
from ..errors import (
    VllmDspyAdapterError,
    ConfigurationError,
    LMClosedError,
    NoHealthyReplicaError,
    PromptTooLongError,
    ReplicaDeadError,
    ReplicaStartError,
    UnsupportedInputError,
    UnsupportedModalityError,
)
from .dspy_stream import astream_events, stream_events, submit_off_loop
from .render import SUPPORTED_PARAMS
from .modalities import supported_from_info
from .renderer import Prepared, Renderer
from .waiting import result as wait_for_result
from ..serving.pool import ReplicaPool
from ..protocol import Backend, ModelFacts, Replica, ReplicaInfo

logger = logging.getLogger(__name__)

__all__ = ["AdapterBinding", "DSPyEngine", "AsyncDSPyEngine", "Runtime", "SUPPORTED_PARAMS"]


# Our errors as the lm15 errors DSPy maps to its public ones. None of them is a
# lm15 ServerError: DSPy would retry those with back-off, and a dead or closed
# LM must fail fast.
_LM15_ERRORS = {
    PromptTooLongError: "ContextLengthError",  # -> dspy.ContextWindowExceededError
    UnsupportedModalityError: "UnsupportedFeatureError",  # -> dspy.LMUnsupportedFeatureError
    UnsupportedInputError: "InvalidRequestError",
    ConfigurationError: "InvalidRequestError",
    ReplicaDeadError: "ProviderError",
    ReplicaStartError: "ProviderError",
    NoHealthyReplicaError: "ProviderError",
    LMClosedError: "ProviderError",
}


def to_lm15_error(exc: VllmDspyAdapterError) -> BaseException:
    from dspy import lm15

    name = next(name for kind, name in _LM15_ERRORS.items() if isinstance(exc, kind))
    return getattr(lm15, name)(str(exc), provider="vllm")


class Runtime:
    """What an LM and all its copies share: the pool, its replicas, the backend that
    started them, and the ``Renderer`` of the model they serve."""

    def __init__(self, spec: ModelSpec, facts: ModelFacts, pool: ReplicaPool, backend: Backend,
                 replicas: list[Replica], tool_call_parser: str | None = None):
        self.spec = spec
        self.pool = pool
        self.backend = backend
        self.replicas = replicas
        self.info: ReplicaInfo = replicas[0].info
        self.renderer = Renderer(spec, facts, supported_from_info(self.info), tool_call_parser)
        self.label = self.renderer.label
        self._close_lock = threading.Lock()
        self._warned_slots = False

    @property
    def closed(self) -> bool:
        return self.pool.closed

    # ------------------------------------------------ LoRA (the provider's LoRAHost)

    @property
    def base_model_path(self) -> str:
        return self.spec.model

    @property
    def chat_template_kwargs(self) -> dict[str, Any]:
        return dict(self.spec.chat_template_kwargs)

    @property
    def max_lora_rank(self) -> int | None:
        return self.spec.max_lora_rank

    def load_adapter(self, name: str, path: str, timeout: float = 300.0):
        """Check the adapter folder, then load it on every live replica (or none)."""
        from ..lora.registry import read_adapter

        if self.closed:
            raise LMClosedError("This LM was shut down; create a new one.")
        adapter = read_adapter(name, path, max_lora_rank=self.max_lora_rank, lora_id=self.pool.adapters.next_id())
        self.pool.load_adapter(adapter, timeout=timeout)
        warning = lora_slots_warning(len(self.pool.adapters.all()), self.spec.max_loras)
        if warning is not None and not self._warned_slots:
            self._warned_slots = True  # once per LM: every later load would say the same
            logger.warning("%s", warning)
        return adapter

    def retire_adapter(self, name: str, timeout: float = 60.0) -> bool:
        """Unload adapter ``name`` once no request holds it (``ReplicaPool.retire_adapter``)."""
        return self.pool.retire_adapter(name, timeout=timeout)

    def trainer_placement(self):
        """Where the replicas run and what they hold, for the GRPO trainer's placement
        (``lora.trainer_device``)."""
        from ..backends.placement import gpu_memory_bytes, visible_gpu_count
        from ..lora.trainer_device import ServingPlacement
        from ..models import estimate_memory

        gpus = visible_gpu_count()
        estimate = estimate_memory(self.spec.model)
        return ServingPlacement(replica_devices=tuple(r.device for r in self.replicas), gpu_count=gpus,
                                gpu_memory_utilization=self.spec.engine_kwargs.get("gpu_memory_utilization"),
                                model_bytes=estimate[0] if estimate else None,
                                gpu_bytes=gpu_memory_bytes() if gpus else None)

    def adapter_model(self, name: str) -> str:
        """The model label of an LM serving adapter ``name`` (what ``lm.copy(model=...)`` takes)."""
        return self.pool.adapters.get(name).label(self.label)

    def adapter_of_label(self, label: str) -> str | None:
        return next((a.name for a in self.pool.adapters.all() if a.label(self.label) == label), None)

    def shutdown(self) -> None:
        """Stop every replica (in parallel); idempotent. Calls from now on fail with ``LMClosedError``."""
        with self._close_lock:
            if self.pool.closed:
                return
            self.pool.close()
        threads = [threading.Thread(target=r.shutdown, daemon=True) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        self.backend.shutdown()


class AdapterBinding:
    """The adapter an LM's engines put on each request, and its label, as one value.

    The sync and async engine of an LM (and every shallow ``copy`` of it, which shares
    them) hold the same binding, so ``switch`` moves all their requests to another
    adapter in one assignment: a request reads the pair once, just before it is
    submitted, holding the adapter from that read on (``ReplicaPool.hold_chosen``), and
    runs and is labelled with that pair (``dspy.GRPO`` updates the student LM in place,
    see ``lm.switch_adapter``)."""

    def __init__(self, adapter: str | None, label: str):
        self.current: tuple[str | None, str] = (adapter, label)

    def switch(self, adapter: str | None, label: str) -> None:
        self.current = (adapter, label)


class DSPyEngine:
    """DSPy's synchronous engine over a runtime. Called from every DSPy thread at
    once: each call becomes one request of the running replicas and waits for it."""

    supports_response_schema = True
    supports_reasoning = False  # CoT keeps its text field; <think> blocks still arrive as reasoning
    supports_function_calling = False
    supported_params = SUPPORTED_PARAMS

    def __init__(self, runtime: Runtime, adapter: str | None = None, binding: AdapterBinding | None = None):
        self.runtime = runtime
        # DSPy reads this to choose native tool calls over tools described in text.
        self.supports_function_calling = runtime.renderer.tool_parser is not None
        # The LoRA adapter every request carries (lm.with_adapter), or None; shared with the LM's other engine.
        self.binding = binding or AdapterBinding(
            adapter, runtime.adapter_model(adapter) if adapter is not None else runtime.label)

    @property
    def adapter(self) -> str | None:
        return self.binding.current[0]

    @property
    def label(self) -> str:
        return self.binding.current[1]

    def _submit(self, request, sink=None) -> tuple[concurrent.futures.Future, Prepared]:
        from dspy.clients.engines.base import validate_request

        validate_request(request)
        try:
            prepared = self.runtime.renderer.build(request)
            pool = self.runtime.pool
            # Read once, just before submitting, and held from this read on (a swap's retirement waits for it).
            (prepared.request.adapter, prepared.label), hold = pool.hold_chosen(lambda: self.binding.current)
            try:
                return pool.submit(prepared.request, sink=sink, hold=hold), prepared
            except BaseException:
                if hold is not None:
                    hold.release()
                raise
        except VllmDspyAdapterError as exc:
            raise to_lm15_error(exc) from exc

    def complete(self, request):
        future, prepared = self._submit(request)
        try:
            generation = wait_for_result(future)  # an interrupt is seen at once (waiting.py)
        except VllmDspyAdapterError as exc:
            raise to_lm15_error(exc) from exc
        except BaseException:  # Ctrl-C, a pool shutting down: abort the request, never leave it running
            future.cancel()
            raise
        return self.runtime.renderer.to_response(generation, prepared.plan, prepared.label)

    def stream(self, request):
        """Real token streaming: vLLM's DELTA outputs for this request only
        (``dspy_stream.py``); every other request keeps FINAL_ONLY."""
        return stream_events(self, request, to_lm15_error)

    def close(self) -> None:
        """Borrowed by DSPy: the LM's shutdown() owns the replicas' lifetime."""


class AsyncDSPyEngine(DSPyEngine):
    """DSPy's async engine: the same requests, awaited without blocking the loop."""

    async def complete(self, request):
        future, prepared = await submit_off_loop(self._submit, request)  # rendering off the event loop
        try:
            generation = await asyncio.wrap_future(future)
        except VllmDspyAdapterError as exc:
            raise to_lm15_error(exc) from exc
        return self.runtime.renderer.to_response(generation, prepared.plan, prepared.label)

    def stream(self, request):
        """See ``DSPyEngine.stream``; waits on the caller's event loop, no thread per stream."""
        return astream_events(self, request, to_lm15_error)

    async def aclose(self) -> None:
        """See ``DSPyEngine.close``."""
