"""The systems under test, behind one small driver surface.

A driver is started with a model and engine arguments and offers some of:

- ``batch(requests)``: every request at once (W1, W2 via batch_generate, W3);
- ``dspy_lm``: a DSPy LM that DSPy threads call with the chat messages as an lm15
  Request (``dspy_calls.chat_call``; W2 via threads), and DSPy's adapters call (W4);
- ``concurrent(requests, threads)``: raw vLLM fed the same requests at the same
  concurrency as DSPy's threads (the W2 ceiling);
- ``output_tokens()``: cumulative output tokens as the engines counted them.

The HTTP peer (``vllm serve``) is in systems_http.py. Only vLLM APIs present in
both 0.26 and 0.32 are used: ``LLM.generate``,
``SamplingParams``, ``TokensPrompt``, ``AsyncEngineArgs``,
``AsyncLLM.from_engine_args(..., usage_context=)`` and ``AsyncLLM.generate``.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .dspy_calls import chat_call
from .workloads import Request

@dataclass
class BatchResult:
    output_tokens: int | None = None
    tail_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def render_chat(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _sampling(r: Request, ignore_eos: bool) -> dict[str, Any]:
    """The request's own settings; with ``temperature=None`` the model's generation config decides."""
    out = {"max_tokens": r.max_tokens, "ignore_eos": ignore_eos}
    if r.temperature is not None:
        out["temperature"] = r.temperature
    return out


def subset_router(base):
    """A routing policy (the public ``Router`` contract, passed in as ``routing=``) that
    sends requests only to replicas ``< k`` with ``base``'s policy, ``k`` settable while the
    LM runs (None: all): measures k replicas on engines started once for more (``--subsets``)."""
    from vllm_dspy_adapter.serving.routing import Router, make_router

    class SubsetRouter(Router):
        def __init__(self, base):
            self.use(base)
            self.k: int | None = None

        def use(self, base) -> None:
            """Route with ``base`` from now on (W6's one-LM mode compares policies on one start)."""
            self.base = make_router(base)
            self.name = self.base.name
            self.wants_token_ids = self.base.wants_token_ids
            self.wants_cache_events = self.base.wants_cache_events

        def choose(self, prompt, loads, adapter=None):
            if self.k is not None:
                loads = [load for load in loads if load.index < self.k]
            return self.base.choose(prompt, loads, adapter=adapter)

        def observe(self, replica: int, events: list) -> None:
            self.base.observe(replica, events)

        def fallback(self):
            fallback = self.base.fallback()
            return self if fallback is self.base else SubsetRouter(fallback)

        def forget(self, replica: int) -> None:
            self.base.forget(replica)

        def drop(self, adapter: str) -> None:
            self.base.drop(adapter)

    return SubsetRouter(base)


class Driver:
    """Defaults: nothing supported. See the module docstring."""

    dspy_lm = None

    def dspy_call(self, r: Request):
        """One DSPy call, as a DSPy thread makes it."""
        extra = {} if r.temperature is None else {"temperature": r.temperature}
        return chat_call(self.dspy_lm, r.messages, max_tokens=r.max_tokens, **extra)

    def set_active(self, k: int) -> None:
        """Serve the next runs with the first ``k`` replicas (engines) only (``--subsets``)."""
        if k != 1:
            raise NotImplementedError(f"{type(self).__name__} cannot be restricted to {k} replicas")

    def batch(self, requests: list[Request]) -> BatchResult:
        raise NotImplementedError

    def output_tokens(self) -> int | None:
        return None

    def close(self) -> None:
        pass


# --------------------------------------------------------------------- raw LLM

class RawLLM(Driver):
    """``vllm.LLM.generate`` with every prompt at once, on one GPU."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], *, ignore_eos: bool):
        from vllm import LLM

        self.llm = LLM(model=model, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.ignore_eos = ignore_eos

    def batch(self, requests: list[Request]) -> BatchResult:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.token_ids) if r.token_ids is not None
                   else render_chat(self.tokenizer, r.messages) for r in requests]
        params = [SamplingParams(**_sampling(r, self.ignore_eos)) for r in requests]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return BatchResult(output_tokens=sum(len(o.outputs[0].token_ids) for o in outs))

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del self.llm
        gc.collect()


# ------------------------------------------------------------------- raw AsyncLLM

class RawAsync(Driver):
    """``AsyncLLM`` with ``data_parallel_size=N`` and vLLM's own balancer: the ceiling.

    With ``engines_per_gpu=k > 1`` (W5, one GPU): k separate ``AsyncLLM`` engines sharing the
    GPU, each with ``gpu_memory_utilization`` = total / k, started one after another (each
    one's memory profiling sees the others); requests go round-robin (every request at once)
    or to the engine with the fewest in flight (bounded concurrency)."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], *, dp: int, ignore_eos: bool,
                 engines_per_gpu: int = 1):
        if engines_per_gpu > 1 and dp > 1:
            raise ValueError("raw-async with several engines per GPU runs on one GPU (N=1)")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="raw-async-loop", daemon=True)
        self.thread.start()
        self.ignore_eos = ignore_eos
        self.dp = dp
        self._ids = 0
        self._out_tokens = 0
        kwargs = dict(engine_kwargs)
        kwargs.setdefault("disable_log_stats", True)
        if dp > 1:
            kwargs["data_parallel_size"] = dp
        if engines_per_gpu > 1 and "kv_cache_memory_bytes" not in kwargs:
            kwargs["gpu_memory_utilization"] = kwargs.get("gpu_memory_utilization", 0.9) / engines_per_gpu

        async def create():
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.usage.usage_lib import UsageContext
            from vllm.v1.engine.async_llm import AsyncLLM

            # LLM_CLASS: the same batch-size defaults as LLM and the adapter's engines.
            return AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **kwargs),
                                             usage_context=UsageContext.LLM_CLASS)

        self.engines = []
        try:
            for _ in range(engines_per_gpu):  # one after another: each profiles memory beside the others
                self.engines.append(self._run(create()))
        except BaseException:
            self.close()
            raise
        self.engine = self.engines[0]
        self.active = len(self.engines) if dp == 1 else dp
        self._in_flight = [0] * len(self.engines)
        self._rr = 0
        try:  # the model's generation-config sampling defaults, as the adapter applies them
            self.defaults = dict(self.engine.model_config.get_diff_sampling_param() or {})
        except Exception:
            self.defaults = {}
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def set_active(self, k: int) -> None:
        limit = self.dp if self.dp > 1 else len(self.engines)
        if not 1 <= k <= limit:
            raise ValueError(f"raw-async has {limit} engines/ranks, cannot use {k}")
        self.active = k

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _pick(self, least_busy: bool) -> int:
        if least_busy:
            counts = self._in_flight[:self.active]
            low = min(counts)
            tied = [i for i, c in enumerate(counts) if c == low]
            self._rr += 1
            return tied[self._rr % len(tied)]
        self._rr += 1
        return self._rr % self.active

    async def _one(self, r: Request, least_busy: bool = False) -> int:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        prompt = (TokensPrompt(prompt_token_ids=r.token_ids) if r.token_ids is not None
                  else render_chat(self.tokenizer, r.messages))
        base = self.defaults if r.temperature is None else {}
        params = SamplingParams(**{**base, **_sampling(r, self.ignore_eos)}, output_kind=RequestOutputKind.FINAL_ONLY)
        self._ids += 1
        slot = self._pick(least_busy)
        if self.dp > 1:  # one engine of dp ranks: pin the rank only when measuring a subset
            engine, extra = self.engine, ({"data_parallel_rank": slot} if self.active < self.dp else {})
            slot = 0
        else:
            engine, extra = self.engines[slot], {}
        self._in_flight[slot] += 1
        final = None
        try:
            async for out in engine.generate(prompt, params, f"bench-{self._ids}", **extra):
                final = out
        finally:
            self._in_flight[slot] -= 1
        n = len(final.outputs[0].token_ids)
        self._out_tokens += n
        return n

    def batch(self, requests: list[Request]) -> BatchResult:
        async def all_at_once():
            return await asyncio.gather(*[self._one(r) for r in requests])

        return BatchResult(output_tokens=sum(self._run(all_at_once())))

    def concurrent(self, requests: list[Request], threads: int) -> int:
        """At most ``threads`` requests in flight, like DSPy's thread pool."""
        async def limited():
            gate = asyncio.Semaphore(threads)

            async def one(r):
                async with gate:
                    return await self._one(r, least_busy=True)

            return await asyncio.gather(*[one(r) for r in requests])

        return sum(self._run(limited()))

    def output_tokens(self) -> int:
        return self._out_tokens

    def close(self) -> None:
        async def stop():
            for engine in self.engines:
                engine.shutdown()
            # The engine's own output tasks: cancel them inside the loop, not at its death.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self._run(stop())
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.engines = []
        self.engine = None
        gc.collect()


# ------------------------------------------------------------------- reference

class Reference(Driver):
    """The original guide's design: N LLM instances (see reference.py)."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], *, n: int, on_gpu: bool, ignore_eos: bool,
                 lm_kwargs: dict[str, Any] | None = None):
        from .reference import ReferenceMultiGPU

        self.ignore_eos = ignore_eos
        sampling = {"ignore_eos": True} if ignore_eos else {}
        sampling.update(lm_kwargs or {})
        self.ref = ReferenceMultiGPU(model, n, engine_kwargs, on_gpu=on_gpu, sampling=sampling)
        self.dspy_lm = self.ref

    def batch(self, requests: list[Request]) -> BatchResult:
        prompts = [r.token_ids if r.token_ids is not None else render_chat(self.ref.tokenizer, r.messages)
                   for r in requests]
        results, finished = self.ref.batch_generate(prompts, [_sampling(r, self.ignore_eos) for r in requests])
        n_out = sum(r[2] for r in results)
        self.ref.output_tokens += n_out
        tail = max(finished) - min(finished) if len(finished) > 1 else 0.0
        return BatchResult(output_tokens=n_out, tail_s=tail)

    def output_tokens(self) -> int:
        return self.ref.output_tokens

    def close(self) -> None:
        self.ref.shutdown()


# ------------------------------------------------------------------------ ours

class Ours(Driver):
    """vllm-dspy-adapter: ``vLLMOffline`` (one engine, optionally tensor parallel)
    or ``vLLMOfflineMultiGPU`` (N replicas, ``replicas_per_gpu`` each, under a routing policy)."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], *, n: int, routing: str | None, tp: bool,
                 on_gpu: bool, ignore_eos: bool, lm_kwargs: dict[str, Any] | None = None, backend: str = "local",
                 replicas_per_gpu: int = 1):
        from vllm_dspy_adapter import vLLMOffline, vLLMOfflineMultiGPU

        lm_kwargs = dict(lm_kwargs or {})
        sampling = {**({"ignore_eos": True} if ignore_eos else {}), **(lm_kwargs.pop("sampling_params", None) or {})}
        common = dict(cache=False, sampling_params=sampling or None, **lm_kwargs, **engine_kwargs)
        self._router = None  # the subset policy of a multi-replica LM (set_active)
        if tp:
            self.lm = vLLMOffline(model=model, tensor_parallel_size=n, **common)
        elif routing is None:
            self.lm = vLLMOffline(model=model, **common)
        else:
            if not on_gpu:
                place = {"num_replicas": n * replicas_per_gpu}
            elif replicas_per_gpu > 1:
                place = {"num_gpus": n, "replicas_per_gpu": replicas_per_gpu}
            else:
                place = {"num_gpus": n}
            self._router = subset_router(routing)
            self.lm = vLLMOfflineMultiGPU(model=model, **place, routing=self._router, backend=backend, **common)
        self.dspy_lm = self.lm
        self.replicas = len(self.lm.stats())

    def set_active(self, k: int) -> None:
        if not 1 <= k <= self.replicas:
            raise ValueError(f"ours has {self.replicas} replicas, cannot use {k}")
        if self._router is not None:
            self._router.k = None if k == self.replicas else k

    def _prompt(self, r: Request):
        return {"prompt_token_ids": r.token_ids} if r.token_ids is not None else r.messages

    def batch(self, requests: list[Request]) -> BatchResult:
        poller = _IdlePoller(self.lm) if self.replicas > 1 else None
        temperature = {"temperature": requests[0].temperature} if requests and requests[0].temperature is not None else {}
        # Each request's own max_tokens (W2's long-tailed lengths), through the public API.
        outs = self.lm.batch_generate([self._prompt(r) for r in requests], progress=False, return_outputs=True,
                                      per_prompt=[{"max_tokens": r.max_tokens} for r in requests], **temperature)
        end = time.monotonic()
        result = BatchResult(output_tokens=sum(o.num_output_tokens for o in outs))
        if poller is not None:
            first_idle = poller.stop()
            result.tail_s = max(0.0, end - first_idle) if first_idle is not None else 0.0
        return result

    def output_tokens(self) -> int:
        return sum(int(s.get("output_tokens") or 0) for s in self.lm.stats())

    def close(self) -> None:
        self.lm.shutdown()


class _IdlePoller:
    """Finds when the first replica ran out of work during a batch, from stats():
    a replica is idle once every request routed to it since the start has finished."""

    def __init__(self, lm, interval: float = 0.1):
        self.lm = lm
        self.interval = interval
        self.base = {s["replica"]: (s.get("routed", 0), s.get("requests", 0) + s.get("failed", 0)) for s in lm.stats()}
        self.first_idle: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.first_idle is None:
            now = time.monotonic()
            for s in self.lm.stats():
                routed0, done0 = self.base.get(s["replica"], (0, 0))
                routed = s.get("routed", 0) - routed0
                done = s.get("requests", 0) + s.get("failed", 0) - done0
                if routed > 0 and done >= routed:
                    self.first_idle = now
                    break
            self._stop.wait(self.interval)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.first_idle
