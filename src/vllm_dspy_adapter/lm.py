"""The DSPy side: ``vLLMOffline`` and ``vLLMOfflineMultiGPU``.

Both are ``dspy.LM`` subclasses built on DSPy 3.4's engine contract: the LM is
constructed with ``engine=`` and ``async_engine=`` objects whose ``complete``
takes one canonical ``dspy.lm15.Request`` and returns one ``Response``. DSPy
itself keeps its cache, retries, history, usage tracking, callbacks, ``copy()``
and ``acall``; this module only turns a Request into an engine request and the
result back (through the pure functions of ``render.py``).

The extension contract, for a new kind of replica (for example a Ray actor): it
needs ``submit(GenerationRequest) -> concurrent.futures.Future[Generation]``,
``stats() -> dict``, an ``alive`` property, ``index``, ``name``, ``device``,
``restarts`` and ``shutdown()``; ``ReplicaPool`` does the rest.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import dspy

from .config import EngineSpec, check_engine_kwargs, check_sampling_kwargs
from .errors import (
    AdapterError,
    ConfigurationError,
    EngineDeadError,
    PromptTooLongError,
    UnsupportedInputError,
)
from .protocol import Generation, GenerationRequest
from .render import config_to_sampling, generation_to_response, render_chat, request_to_messages

__all__ = ["vLLMOffline", "vLLMOfflineMultiGPU", "GenerationOutput"]

logger = logging.getLogger(__name__)

# Constructor arguments that belong to dspy.LM; every other keyword is a vLLM engine argument.
_DSPY_ARGS = ("temperature", "max_tokens", "cache", "callbacks", "num_retries", "top_p", "stop", "rollout_id")

_SUPPORTED_PARAMS = frozenset({
    "temperature", "max_tokens", "top_p", "top_k", "stop", "seed", "presence_penalty", "frequency_penalty",
    "logprobs", "top_logprobs", "response_format", "n",
})

GenerationOutput = Generation  # the public name for a full batch_generate result


def _to_lm15_error(exc: BaseException) -> BaseException:
    """Our errors as the lm15 errors DSPy maps to its public ones
    (ContextLengthError -> dspy.ContextWindowExceededError, and so on)."""
    from dspy import lm15

    if isinstance(exc, PromptTooLongError):
        return lm15.ContextLengthError(str(exc), provider="vllm")
    if isinstance(exc, UnsupportedInputError):
        return lm15.InvalidRequestError(str(exc), provider="vllm")
    if isinstance(exc, AdapterError):
        # Not a ServerError: DSPy would retry it with back-off, and a dead pool
        # must fail fast.
        return lm15.ProviderError(str(exc), provider="vllm")
    return exc


class _Runtime:
    """What an LM and all its copies share: the replicas and the prompt renderer."""

    def __init__(self, spec: EngineSpec, pool, tokenizer, info: dict[str, Any], replicas: list):
        self.spec = spec
        self.pool = pool
        self.tokenizer = tokenizer
        self.info = info
        self.replicas = replicas
        self.label = spec.label()
        self.closed = False
        self._close_lock = threading.Lock()
        from vllm import SamplingParams

        self.sampling_fields = frozenset(getattr(SamplingParams, "__struct_fields__", ()) or ())

    def build(self, request) -> GenerationRequest:
        """A DSPy Request to an engine request: chat template, sampling options, images."""
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
        if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in prompt):
            text = render_chat(self.tokenizer, list(prompt), self.spec.chat_template_kwargs)
            return GenerationRequest(prompt=text, sampling=sampling, chat=True)
        raise ConfigurationError(
            f"A batch_generate prompt must be a string, a list of chat messages ({{'role': ..., 'content': ...}}) "
            f"or {{'prompt_token_ids': [...]}}; got {type(prompt).__name__}: {str(prompt)[:80]!r}"
        )

    def to_response(self, generation: Generation):
        return generation_to_response(generation, model=self.label)

    def shutdown(self) -> None:
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        self.pool.close()
        threads = [threading.Thread(target=r.shutdown, daemon=True) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)


class vLLMEngine:
    """DSPy's synchronous engine over a runtime. Called from every DSPy thread at
    once: each call becomes one request of the running engine(s) and waits for it."""

    supports_response_schema = True
    supports_reasoning = False  # CoT keeps its text field; <think> blocks still arrive as reasoning
    supports_function_calling = False
    supported_params = _SUPPORTED_PARAMS

    def __init__(self, runtime: _Runtime):
        self.runtime = runtime

    def _submit(self, request):
        from dspy.clients.engines.base import validate_request

        validate_request(request)
        try:
            return self.runtime.pool.submit(self.runtime.build(request))
        except AdapterError as exc:
            raise _to_lm15_error(exc) from exc

    def complete(self, request):
        future = self._submit(request)
        try:
            generation = future.result()
        except AdapterError as exc:
            raise _to_lm15_error(exc) from exc
        return self.runtime.to_response(generation)

    def stream(self, request):
        from dspy.lm15 import response_to_events

        # vLLM streams, but DSPy's ChatAdapter needs whole answers; one final event
        # keeps the engine-side batch (FINAL_ONLY outputs) free of per-token traffic.
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Borrowed by DSPy: the LM's shutdown() owns the engines' lifetime."""


class AsyncvLLMEngine(vLLMEngine):
    """DSPy's async engine: the same requests, awaited without blocking the loop."""

    async def complete(self, request):
        future = await asyncio.to_thread(self._submit, request)  # rendering off the event loop
        try:
            generation = await asyncio.wrap_future(future)
        except AdapterError as exc:
            raise _to_lm15_error(exc) from exc
        return self.runtime.to_response(generation)

    async def stream(self, request):
        from dspy.lm15 import response_to_events

        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """See ``vLLMEngine.close``."""


_LIVE: weakref.WeakSet = weakref.WeakSet()

# atexit runs handlers last-registered-first, and multiprocessing registers one
# that joins every non-daemon child (our replica workers) forever. Importing it
# first makes our handler, registered below, run before it and stop the workers.
import multiprocessing.util  # noqa: E402,F401


@atexit.register
def _shutdown_all() -> None:
    for runtime in list(_LIVE):
        try:
            runtime.shutdown()
        except Exception:
            pass


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    dspy_kwargs = {k: kwargs.pop(k) for k in _DSPY_ARGS if k in kwargs}
    return dspy_kwargs, kwargs


class vLLMOffline(dspy.LM):
    """A DSPy LM over one in-process vLLM engine.

    ``vLLMOffline(model=None, **engine_kwargs)``: ``model`` is a local folder or a
    hub id; None uses ``$VLLM_DSPY_MODEL`` or the embedded SmolLM2-135M-Instruct.
    Every other keyword is a vLLM engine argument (``gpu_memory_utilization``,
    ``max_model_len``, ``dtype``, ``enforce_eager``, ``max_num_seqs``, ``seed``,
    ``load_format``, ...), except DSPy's own ``temperature``, ``max_tokens``,
    ``top_p``, ``stop``, ``cache``, ``callbacks`` and ``num_retries``, and:

    - ``sampling_params``: vLLM-only sampling options fixed for every call
      (``repetition_penalty``, ``min_p``, ``ignore_eos``, ...), since DSPy refuses
      unknown per-call keywords;
    - ``chat_template_kwargs``: template switches such as Qwen3's
      ``{"enable_thinking": False}``;
    - ``start_timeout``: seconds the engine may take to start (default 1800, None:
      no limit); past it, or when the start fails, the engine processes are
      stopped and ``ReplicaStartError`` is raised.

    Use it as a context manager or call ``shutdown()``; engines also stop at exit.
    """

    def __init__(self, model: str | None = None, *, sampling_params: dict[str, Any] | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None, start_timeout: float | None = 1800.0,
                 **kwargs: Any):
        from .models import resolve_model

        dspy_kwargs, engine_kwargs = _split_kwargs(dict(kwargs))
        self._start_timeout = start_timeout
        self._init_args = {"model": model, "sampling_params": sampling_params,
                           "chat_template_kwargs": chat_template_kwargs, "start_timeout": start_timeout,
                           **engine_kwargs}
        path = resolve_model(model)
        check_engine_kwargs(engine_kwargs)
        check_sampling_kwargs(sampling_params or {})
        name = None if model is not None else _default_name(path)
        spec = EngineSpec(model=path, engine_kwargs=engine_kwargs, sampling=dict(sampling_params or {}),
                          chat_template_kwargs=dict(chat_template_kwargs or {}), model_name=name)
        runtime = self._start(spec)
        _LIVE.add(runtime)
        self._runtime = runtime
        dspy_kwargs.setdefault("num_retries", 0)  # a local engine has no transient network errors
        super().__init__(model=runtime.label, engine=vLLMEngine(runtime), async_engine=AsyncvLLMEngine(runtime),
                         **dspy_kwargs)

    # The single-engine runtime; vLLMOfflineMultiGPU overrides it.
    def _start(self, spec: EngineSpec) -> _Runtime:
        from .engine import LocalEngine
        from .replicas import ReplicaPool
        from .router import RoundRobinRouter

        engine = LocalEngine(spec, name="engine", start_timeout=self._start_timeout)
        engine.index, engine.device, engine.restarts = 0, "local", 0
        pool = ReplicaPool([engine], RoundRobinRouter(), restart=None, dead_error=EngineDeadError)
        return _Runtime(spec, pool, engine.tokenizer, engine.info(), [engine])

    # ------------------------------------------------------------ batch use

    def batch_generate(self, prompts: Sequence[Any], *, progress: bool = True, return_outputs: bool = False,
                       raise_on_error: bool = True, per_prompt: Sequence[dict[str, Any]] | None = None,
                       **sampling: Any) -> list[Any]:
        """Generate for every prompt at once; results come back in input order.

        ``prompts``: strings (sent as they are, like ``LLM.generate``), chat message
        lists (the chat template is applied), or ``{"prompt_token_ids": [...]}``.
        ``sampling``: any ``SamplingParams`` field (``max_tokens``, ``temperature``,
        ``ignore_eos``, ...), on top of the LM's ``sampling_params``. ``per_prompt``:
        one dict of such fields per prompt (for example each prompt's own
        ``max_tokens``), applied on top of ``sampling``. Every prompt is
        submitted at once and routed like a DSPy call, so no replica waits for a
        static share. Returns strings, or ``GenerationOutput`` objects with
        ``return_outputs=True``. A failed prompt raises after every other prompt
        has finished (with ``raise_on_error=False`` its slot holds the exception).
        """
        runtime = self._runtime
        if runtime.closed:
            raise EngineDeadError("This LM was shut down; create a new one.")
        prompts = list(prompts)
        check_sampling_kwargs(sampling)
        merged = {**runtime.spec.sampling, **sampling}
        if per_prompt is None:
            per_request = [merged] * len(prompts)
        else:
            per_request = _per_prompt_sampling(per_prompt, merged, len(prompts))
        # Refuse bad input before submitting any: nothing runs half-done.
        requests = [runtime.prompt_request(p, s) for p, s in zip(prompts, per_request)]
        futures = [runtime.pool.submit(r) for r in requests]
        results: list[Any] = [None] * len(futures)
        bar = _progress_bar(len(futures), progress)
        started, out_tokens = time.monotonic(), 0
        index_of = {id(f): i for i, f in enumerate(futures)}
        import concurrent.futures as cf

        try:
            for future in cf.as_completed(futures):
                i = index_of[id(future)]
                exc = future.exception()
                if exc is not None:
                    results[i] = exc
                else:
                    generation = future.result()
                    out_tokens += generation.num_output_tokens
                    results[i] = generation if return_outputs else generation.text
                if bar is not None:
                    elapsed = max(time.monotonic() - started, 1e-9)
                    bar.set_postfix_str(f"{bar.n / elapsed:.1f} req/s, {out_tokens / elapsed:.0f} tok/s", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failures and raise_on_error:
            i, first = failures[0]
            raise type(first)(f"{len(failures)} of {len(results)} prompts failed; first (prompt {i}): "
                              f"{str(first).rstrip('.')}. "
                              "Pass raise_on_error=False to keep the other results.") from first
        return results

    def stats(self) -> list[dict[str, Any]]:
        """Per-replica statistics: requests, tokens, in-flight, prefix-cache hit rate."""
        return self._runtime.pool.stats()

    @property
    def max_model_len(self) -> int:
        return int(self._runtime.info["max_model_len"])

    # ------------------------------------------------------------ lifetime

    def shutdown(self) -> None:
        """Stop every engine process. Copies of this LM share them and stop too."""
        self._runtime.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # ------------------------------------------------------------ DSPy state

    def dump_state(self) -> dict[str, Any]:
        from dspy.clients.base_lm import LM_CLASS_STATE_KEY

        state = {k: v for k, v in self._init_args.items() if v is not None}
        state.update({k: v for k, v in self.kwargs.items() if v is not None and k in _DSPY_ARGS})
        state.update({"cache": self.cache, "num_retries": self.num_retries})
        state[LM_CLASS_STATE_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        return state

    @classmethod
    def load_state(cls, state: dict[str, Any], *, allow_custom_lm_class: bool = False):
        from dspy.clients.base_lm import LM_CLASS_STATE_KEY

        state = {k: v for k, v in state.items() if k != LM_CLASS_STATE_KEY}
        return cls(**state)


def _default_name(path: str) -> str | None:
    from .models import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in path else None


def _per_prompt_sampling(per_prompt: Sequence[dict[str, Any]], base: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """One merged sampling dict per prompt; checks each distinct override once."""
    per_prompt = list(per_prompt)
    if len(per_prompt) != n:
        raise ConfigurationError(
            f"per_prompt has {len(per_prompt)} entries for {n} prompts; give one dict per prompt "
            "(an empty dict keeps the shared settings)."
        )
    checked: set[str] = set()
    out = []
    for i, extra in enumerate(per_prompt):
        if not isinstance(extra, dict):
            raise ConfigurationError(f"per_prompt[{i}] is {type(extra).__name__}; expected a dict of "
                                     "SamplingParams fields such as {'max_tokens': 64}.")
        key = repr(sorted(extra.items()))
        if key not in checked:
            try:
                check_sampling_kwargs(extra)
            except ConfigurationError as exc:
                raise ConfigurationError(f"per_prompt[{i}]: {exc}") from exc
            checked.add(key)
        out.append({**base, **extra} if extra else base)
    return out


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="batch_generate", unit="req", dynamic_ncols=True)


class vLLMOfflineMultiGPU(vLLMOffline):
    """The same LM over several engine replicas: one per GPU, or per
    ``tensor_parallel_size`` GPUs; on a machine without GPUs, ``num_replicas`` CPU
    replicas splitting the cores. Each request goes to the replica the routing
    policy picks (``"prefix"``, ``"least_loaded"``, ``"round_robin"``).

    A replica whose engine dies has its requests resubmitted to the others and is
    restarted in the background (``max_restarts`` times); if every replica is gone,
    calls fail at once with ``NoHealthyReplicaError``.
    """

    def __init__(self, model: str | None = None, num_gpus: int | None = None, gpus: Sequence[int] | None = None,
                 tensor_parallel_size: int = 1, num_replicas: int | None = None, routing: str = "prefix", *,
                 backend: str = "local", ray_address: str | None = None, max_restarts: int = 3,
                 start_timeout: float | None = 1800.0, **kwargs: Any):
        from .replicas import make_backend
        from .router import make_router

        # Placement is decided (and refused) here, before any engine starts.
        self._backend = make_backend(backend, num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
                                     num_replicas=num_replicas, ray_address=ray_address, start_timeout=start_timeout)
        self._router = make_router(routing)
        self._max_restarts = max_restarts
        if tensor_parallel_size > 1:
            kwargs["tensor_parallel_size"] = tensor_parallel_size
        super().__init__(model, start_timeout=start_timeout, **kwargs)
        self._init_args.update({"num_gpus": num_gpus, "gpus": list(gpus) if gpus else None, "routing": routing,
                                "num_replicas": num_replicas, "tensor_parallel_size": tensor_parallel_size,
                                "backend": backend, "ray_address": ray_address})

    def _start(self, spec: EngineSpec) -> _Runtime:
        from transformers import AutoTokenizer

        from .replicas import ReplicaPool

        pool_box: list = []

        def on_death(replica, cause):
            if pool_box:  # a death before the pool exists is handled by the start's error path
                pool_box[0].replica_died(replica, cause)

        replicas = self._backend.start(spec, on_death)  # all in parallel; raises with nothing left running
        try:
            logger.info("%d replica(s) ready: %s", len(replicas),
                        ", ".join(f"{r.name} in {r.info['start_seconds']:.0f} s" for r in replicas))
            pool = ReplicaPool(replicas, self._router, restart=self._backend.restart, max_restarts=self._max_restarts)
            pool_box.append(pool)
            kwargs = spec.engine_kwargs
            tokenizer = AutoTokenizer.from_pretrained(kwargs.get("tokenizer") or spec.model,
                                                      trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
                                                      revision=kwargs.get("tokenizer_revision"))
        except BaseException:  # Ctrl-C or a tokenizer error: no replica may outlive a failed constructor
            for replica in replicas:
                replica.shutdown()
            raise
        return _Runtime(spec, pool, tokenizer, replicas[0].info, replicas)

    @property
    def num_replicas(self) -> int:
        return len(self._runtime.replicas)
