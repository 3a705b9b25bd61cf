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
import os
import threading
from typing import Any

from .config import ModelSpec
from .errors import (
    AdapterError,
    ConfigurationError,
    LMClosedError,
    NoHealthyReplicaError,
    PromptTooLongError,
    ReplicaDeadError,
    ReplicaStartError,
    UnsupportedInputError,
    UnsupportedModalityError,
)
from .modalities import check_modalities, supported_from_info
from .pool import ReplicaPool
from .protocol import Backend, Generation, GenerationRequest, Replica, ReplicaInfo
from .render import config_to_sampling, generation_to_response, render_chat, request_to_messages

__all__ = ["DSPyEngine", "AsyncDSPyEngine", "Runtime", "SUPPORTED_PARAMS"]

SUPPORTED_PARAMS = frozenset({
    "temperature", "max_tokens", "top_p", "top_k", "stop", "seed", "presence_penalty", "frequency_penalty",
    "logprobs", "top_logprobs", "response_format", "n",
})

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


def to_lm15_error(exc: AdapterError) -> BaseException:
    from dspy import lm15

    name = next(name for kind, name in _LM15_ERRORS.items() if isinstance(exc, kind))
    return getattr(lm15, name)(str(exc), provider="vllm")


class Runtime:
    """What an LM and all its copies share: the pool, its replicas, the prompt renderer."""

    def __init__(self, spec: ModelSpec, pool: ReplicaPool, backend: Backend, replicas: list[Replica]):
        from vllm import SamplingParams

        self.spec = spec
        self.pool = pool
        self.backend = backend
        self.replicas = replicas
        self.info: ReplicaInfo = replicas[0].info
        self.tokenizer = spec.load_tokenizer()
        self.label = spec.label()
        self.model_name = spec.model_name or os.path.basename(os.path.normpath(spec.model)) or spec.model
        self.modalities = supported_from_info(self.info)
        self.sampling_fields = frozenset(SamplingParams.__struct_fields__)
        self._close_lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self.pool.closed

    def build(self, request) -> GenerationRequest:
        """A DSPy Request to an engine request: chat template, sampling options, images."""
        check_modalities(request, self.modalities, model=self.model_name)  # before anything is rendered
        messages, images = request_to_messages(request)
        chat_kwargs = dict(self.spec.chat_template_kwargs)
        reasoning = request.config.reasoning
        if reasoning is not None and reasoning.is_off:
            chat_kwargs.setdefault("enable_thinking", False)  # Qwen3's switch; ignored by other templates
        prompt = render_chat(self.tokenizer, messages, chat_kwargs)
        sampling = {**self.spec.sampling, **config_to_sampling(request.config, allowed=self.sampling_fields)}
        return GenerationRequest(prompt=prompt, sampling=sampling, chat=True, images=images)

    def prompt_request(self, prompt, sampling: dict[str, Any]) -> GenerationRequest:
        """A batch_generate prompt: raw text, token ids, or chat messages."""
        if isinstance(prompt, str):
            return GenerationRequest(prompt=prompt, sampling=sampling)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return GenerationRequest(prompt=list(prompt["prompt_token_ids"]), sampling=sampling)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
            text = render_chat(self.tokenizer, list(prompt), self.spec.chat_template_kwargs)
            return GenerationRequest(prompt=text, sampling=sampling, chat=True)
        raise ConfigurationError(
            f"A batch_generate prompt must be a string, a list of chat messages ({{'role': ..., 'content': ...}}) "
            f"or {{'prompt_token_ids': [...]}}; got {type(prompt).__name__}: {str(prompt)[:80]!r}"
        )

    def to_response(self, generation: Generation):
        return generation_to_response(generation, model=self.label)

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


class DSPyEngine:
    """DSPy's synchronous engine over a runtime. Called from every DSPy thread at
    once: each call becomes one request of the running replicas and waits for it."""

    supports_response_schema = True
    supports_reasoning = False  # CoT keeps its text field; <think> blocks still arrive as reasoning
    supports_function_calling = False
    supported_params = SUPPORTED_PARAMS

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def _submit(self, request):
        from dspy.clients.engines.base import validate_request

        validate_request(request)
        try:
            return self.runtime.pool.submit(self.runtime.build(request))
        except AdapterError as exc:
            raise to_lm15_error(exc) from exc

    def complete(self, request):
        future = self._submit(request)
        try:
            generation = future.result()
        except AdapterError as exc:
            raise to_lm15_error(exc) from exc
        return self.runtime.to_response(generation)

    def stream(self, request):
        from dspy.lm15 import response_to_events

        # vLLM streams, but DSPy's ChatAdapter needs whole answers; one final event
        # keeps the engine-side batch (FINAL_ONLY outputs) free of per-token traffic.
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Borrowed by DSPy: the LM's shutdown() owns the replicas' lifetime."""


class AsyncDSPyEngine(DSPyEngine):
    """DSPy's async engine: the same requests, awaited without blocking the loop."""

    async def complete(self, request):
        future = await asyncio.to_thread(self._submit, request)  # rendering off the event loop
        try:
            generation = await asyncio.wrap_future(future)
        except AdapterError as exc:
            raise to_lm15_error(exc) from exc
        return self.runtime.to_response(generation)

    async def stream(self, request):
        from dspy.lm15 import response_to_events

        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """See ``DSPyEngine.close``."""
