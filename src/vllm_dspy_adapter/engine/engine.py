"""One vLLM engine (one ``AsyncLLM``), driven from a background event loop.

``Engine`` is the unit of serving: the in-process backend holds one in the
user's process (``vLLMOffline``), and each replica of the process and Ray
backends holds one inside its worker process or actor. Callers on any thread ``submit`` a request and get a
``concurrent.futures.Future``; every in-flight request is one request of the same
running ``AsyncLLM``, so calls from all DSPy threads share the GPU's batch.
``vllm.LLM.generate`` is never used: it is not thread-safe, and it batches only
the prompts of one call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..config import ModelSpec, engine_defaults
from .cache_events import CacheEventReader, endpoint
from .liveness import EngineLifetime
from .processes import EngineProcesses
from ..errors import (
    ConfigurationError,
    PromptTooLongError,
    ReplicaDeadError,
    ReplicaStartError,
    UnsupportedInputError,
    is_context_length_message,
)
from ..protocol import Generation, GenerationRequest, ReplicaInfo
from .. import vllm_api
from .vllm_io import DeltaCollector, to_generation, to_vllm_inputs

__all__ = ["Engine"]

logger = logging.getLogger(__name__)

_ids = itertools.count()
_told: set[str] = set()  # the default-choice lines already logged in this process


class Engine(EngineLifetime):
    """An ``AsyncLLM`` on a private event-loop thread, with a thread-safe ``submit``."""

    def __init__(self, spec: ModelSpec, *, name: str = "engine",
                 on_dead: Callable[[BaseException], None] | None = None, start_timeout: float | None = None):
        """``on_dead(error)`` is called (from the watchdog's thread) once the engine's
        processes are found dead, after every request in flight has failed; a
        replica uses it to report a death that no request would reveal.

        ``start_timeout`` (seconds, None: no limit) bounds the start. A start that
        fails or times out stops the engine processes it launched: a crashed
        tensor-parallel start was seen to hang with its workers holding the GPUs'
        memory, which would refuse the next start on them."""
        self.spec = spec
        self.name = name
        self._on_dead = on_dead
        self._abandoned = False
        self._lock = threading.Lock()
        self._in_flight = 0
        self._peak_unfinished = 0
        self._peak_in_flight = 0
        self._served: dict[str, int] = {}  # requests finished, by the model that ran them ("base" or an adapter)
        self._totals = {"requests": 0, "failed": 0, "prompt_tokens": 0, "output_tokens": 0, "cached_tokens": 0}
        self._dead: BaseException | None = None
        self._closing = False
        self._tasks: dict[str, asyncio.Task] = {}  # requests in flight by id; touched on the loop's thread only
        self._held: set[str] = set()  # ids submitted and not finished (under _lock)
        self._given_up: set[str] = set()  # held ids whose caller cancelled them (under _lock)
        self.cancelled = 0  # requests aborted because their caller gave up
        self.ticks = 0  # the engine's pulse (liveness.PROBE_S)
        self.on_cpu = False
        self.async_llm = None  # the vLLM AsyncLLM, once started
        self._unfinished = 0
        self._loras: dict[str, _Loaded] = {}  # adapter name -> its id and vLLM LoRARequest, loaded here
        self._cache_events: list = []  # KV-cache events not taken yet (under _lock); see cache_events.py
        self._event_reader: CacheEventReader | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"vllm-dspy-{name}", daemon=True)
        self._thread.start()
        started = time.monotonic()
        self.processes = EngineProcesses()  # what the start launches is this engine's
        start = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            start.result(timeout=start_timeout)
        except BaseException as exc:  # a failure, the timeout, or Ctrl-C during a long start
            timed_out = isinstance(exc, concurrent.futures.TimeoutError) and not start.done()
            self._abandon(start)
            if timed_out:
                raise ReplicaStartError(
                    f"{name}: the vLLM engine did not start within {start_timeout:g} s; its processes were "
                    "stopped. Raise start_timeout if the start needs longer (a first start downloads the "
                    "model and compiles), or see the log above for where it stalled."
                ) from None
            raise ReplicaStartError(f"{name}: the vLLM engine failed to start: {type(exc).__name__}: {exc}") from exc
        self.start_seconds = time.monotonic() - started
        threading.Thread(target=self._watch, args=(self.processes.settle(),), daemon=True,
                         name=f"{name}-watchdog").start()
        asyncio.run_coroutine_threadsafe(self._probe(), self._loop)
        logger.info("%s: engine ready in %.1f s (max_model_len=%d)", name, self.start_seconds, self.max_model_len)

    async def _start(self) -> None:
        # Built inside the loop so AsyncLLM attaches its output handler to it.
        kwargs, chosen = engine_defaults(self.spec.engine_kwargs, vllm_max_num_seqs=vllm_api.default_max_num_seqs(),
                                         slow_cpu_bf16=vllm_api.cpu_without_native_bf16())
        if chosen is not None and chosen not in _told:
            _told.add(chosen)
            logger.info("%s: %s", self.name, chosen)
        address = endpoint() if self.spec.cache_events else None
        if address is not None:
            kwargs["kv_events_config"] = vllm_api.kv_events_config(address)
        self.async_llm, facts = vllm_api.start_async_llm(self.spec.model, kwargs)
        if address is not None:
            self._event_reader = CacheEventReader(address, self._add_cache_events, self.name)
        self.facts = facts
        self.on_cpu = facts.on_cpu
        self.max_model_len = facts.max_model_len
        self.is_multimodal = facts.is_multimodal
        self.model_defaults = facts.model_defaults
        if self._abandoned:  # the caller gave up while vLLM was starting: stop what it started
            vllm_api.shutdown(self.async_llm)
            raise ReplicaStartError(f"{self.name}: start abandoned")
        self.tokenizer = self.spec.load_tokenizer()

    # ------------------------------------------------------------------ serving

    def info(self) -> ReplicaInfo:
        """What the driver needs to know about this engine (crosses processes)."""
        return ReplicaInfo(max_model_len=self.max_model_len, is_multimodal=self.is_multimodal,
                           model_defaults=self.model_defaults, start_seconds=self.start_seconds,
                           engine_pids=[p.pid for p in self.processes.tree()],
                           modalities=self.facts.modalities)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished yet."""
        return self._in_flight

    @property
    def death(self) -> BaseException | None:
        """Why the engine is dead, or None while it serves."""
        return self._dead

    @property
    def alive(self) -> bool:
        llm = self.async_llm
        return self._dead is None and llm is not None and not vllm_api.errored(llm)

    def tokenize(self, request: GenerationRequest) -> list[int]:
        if request.token_ids is not None:  # the driver tokenised it already (cache routing), by the same rule
            return list(request.token_ids)
        if isinstance(request.prompt, str):
            return self.spec.tokenize(request.prompt, chat=request.chat)
        return list(request.prompt)

    def submit(self, request: GenerationRequest, request_id: str | None = None, *,
               sink=None) -> concurrent.futures.Future:
        """Queue one request; thread-safe. Tokenising happens here, in the caller's
        thread, so the event loop only moves requests and results. The future
        fails with ``ReplicaDeadError`` if the engine dies or stops first.

        ``sink``: an object with ``put(StreamPiece)`` (``lm.stream_channel.StreamChannel``,
        or a worker's pipe batcher); the request then runs with vLLM's DELTA
        outputs and each new piece of text goes to it as it is decoded. Requests
        without one keep FINAL_ONLY: no per-token traffic on the hot path."""
        request_id = request_id or f"{self.name}-{next(_ids)}"
        try:
            if self.async_llm is None or not self.alive:
                raise ReplicaDeadError(f"{self.name}: engine is dead: {self._dead or 'EngineCore died'}")
            prompt, params = to_vllm_inputs(request, self.tokenize, model=self.spec.model,
                                            max_model_len=self.max_model_len, model_defaults=self.model_defaults,
                                            is_multimodal=self.is_multimodal, streamed=sink is not None)
            lora = self._lora_for(request)
            adapter = request.adapter if lora is not None else None
        except BaseException as exc:
            failed: concurrent.futures.Future = concurrent.futures.Future()
            failed.set_exception(exc)
            return failed
        with self._lock:
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            self._held.add(request_id)
        return asyncio.run_coroutine_threadsafe(self._generate(prompt, params, request_id, sink, lora, adapter),
                                                self._loop)

    def cancel(self, request_id: str) -> None:
        """The caller gave up on ``request_id``: stop it (thread-safe, returns at once).
        Its task is cancelled on the loop, which closes vLLM's output generator, and
        vLLM aborts the request in its engine core (``AsyncLLM.generate`` does that on
        cancellation in every supported release). An id not held (finished, unknown)
        is ignored."""

        with self._lock:
            if request_id not in self._held:
                return
            self._given_up.add(request_id)  # a task not started yet sees it when it starts

        def cancel() -> None:
            task = self._tasks.get(request_id)
            if task is not None and not task.done():
                task.cancel()

        if self._loop.is_running():
            self._loop.call_soon_threadsafe(cancel)

    async def _generate(self, prompt, params, request_id: str, stream=None, lora=None,
                        adapter: str | None = None) -> Generation:
        """One request on the loop. ``lora`` is vLLM's request for ``adapter`` (its name), the
        adapter the engine runs it with, which the ``Generation`` records."""
        task = asyncio.current_task()
        self._tasks[request_id] = task
        final = None
        llm = self.async_llm
        deltas = DeltaCollector(stream) if stream is not None else None
        inside = False  # handed to vLLM and not finished: what peak_unfinished counts
        try:
            if self._dead is not None or llm is None:
                raise ReplicaDeadError(f"{self.name}: engine is dead: {self._dead or 'shut down'}")
            with self._lock:
                if request_id in self._given_up:
                    raise asyncio.CancelledError
                inside = True
                self._unfinished += 1
                # The most requests vLLM held at once: the proof that calls from many
                # threads share one batch (counted here: vLLM's own count is not in every release).
                self._peak_unfinished = max(self._peak_unfinished, self._unfinished)
            async for output in vllm_api.generate(llm, prompt, params, request_id, lora):
                final = output
                if deltas is not None:
                    deltas.add(output)
        except asyncio.CancelledError:
            with self._lock:
                given_up = request_id in self._given_up
                if given_up:
                    self.cancelled += 1
            if given_up:  # the caller gave up (cancel): vLLM aborts it as its generator closes;
                if inside:  # say it once more in every release (an id vLLM no longer holds is ignored)
                    try:
                        await vllm_api.abort(llm, [request_id])
                    except Exception:  # the engine is stopping: nothing left to abort
                        logger.debug("%s: abort of %s failed", self.name, request_id, exc_info=True)
                raise
            # Cancelled by a death or a shutdown (_cancel_tasks): the caller gets
            # the reason, never a bare cancellation.
            why = "the engine was shut down" if self._closing else f"the engine died: {self._dead}"
            raise ReplicaDeadError(f"{self.name}: request {request_id} did not finish: {why}") from None
        except ValueError as exc:  # vLLM's input validation
            self._count(failed=True)
            if is_context_length_message(str(exc)):
                raise PromptTooLongError(str(exc)) from None
            raise UnsupportedInputError(str(exc)) from None
        except Exception as exc:
            if not vllm_api.is_engine_dead(exc):
                raise
            self._dead = self._dead or exc
            raise ReplicaDeadError(f"{self.name}: the vLLM engine process died: {exc}") from None
        finally:
            self._tasks.pop(request_id, None)
            with self._lock:
                self._in_flight -= 1
                self._held.discard(request_id)
                self._given_up.discard(request_id)
                if inside:
                    self._unfinished -= 1
        aborted = deltas.aborted if deltas is not None and deltas.count else (
            final is None or any(o.finish_reason == "abort" for o in final.outputs))
        if aborted:
            # vLLM ends the requests it holds when it stops, with what they had so far
            # and finish_reason "abort": never hand that back as a finished answer.
            self._count(failed=True)
            why = "the engine was shut down" if self._closing else "vLLM aborted it"
            raise ReplicaDeadError(f"{self.name}: request {request_id} did not finish: {why}")
        generation = deltas.generation(request_id) if deltas is not None and deltas.count else (
            to_generation(final, request_id, params=params, tokenizer=self.tokenizer))
        generation.adapter = adapter  # what vLLM ran it with (the pool refuses an answer of another model)
        self._count(generation=generation)
        return generation

    def _count(self, generation: Generation | None = None, failed: bool = False) -> None:
        with self._lock:
            if failed:
                self._totals["failed"] += 1
                return
            self._totals["requests"] += 1
            self._totals["prompt_tokens"] += generation.num_prompt_tokens
            self._totals["output_tokens"] += generation.num_output_tokens
            self._totals["cached_tokens"] += generation.num_cached_tokens
            served = generation.adapter or "base"
            self._served[served] = self._served.get(served, 0) + 1

    # ------------------------------------------------------------ LoRA adapters

    def _lora_for(self, request: GenerationRequest):
        if request.adapter is None:
            return None
        lora = self._loras.get(request.adapter)
        if lora is None:  # never send vLLM an adapter it did not accept: a bad one kills its engine core
            raise UnsupportedInputError(f"{self.name}: adapter {request.adapter!r} is not loaded here "
                                        f"(loaded: {sorted(self._loras) or 'none'}); use lm.load_adapter first.")
        return lora.request

    async def _add_lora(self, adapter) -> None:
        lora = vllm_api.make_lora_request(adapter.name, adapter.lora_id, adapter.path)
        try:
            await vllm_api.add_lora(self.async_llm, lora)
        except Exception as exc:  # vLLM refuses cleanly here (bad rank, bad modules, bad files)
            raise ConfigurationError(f"{self.name}: vLLM refused adapter {adapter.name!r} ({adapter.path}): "
                                     f"{exc}") from None
        old = self._loras.get(adapter.name)
        self._loras[adapter.name] = _Loaded(adapter.lora_id, lora)
        if old is not None and old.lora_id != adapter.lora_id:
            await vllm_api.remove_lora(self.async_llm, old.lora_id)

    def add_adapter(self, adapter, timeout: float = 120.0) -> None:
        """Load a checked ``lora.AdapterSpec`` into this engine (replacing one of the
        same name); raises ``ConfigurationError`` if vLLM refuses it."""
        asyncio.run_coroutine_threadsafe(self._add_lora(adapter), self._loop).result(timeout=timeout)

    def remove_adapter(self, name: str, timeout: float = 60.0) -> None:
        loaded = self._loras.pop(name, None)
        if loaded is not None:
            asyncio.run_coroutine_threadsafe(vllm_api.remove_lora(self.async_llm, loaded.lora_id),
                                             self._loop).result(timeout)

    def _add_cache_events(self, events: list) -> None:
        if events:
            with self._lock:
                self._cache_events.extend(events)

    def take_cache_events(self) -> list:
        """The KV-cache events since the last call (always empty without ``ModelSpec.cache_events``)."""
        with self._lock:
            events, self._cache_events = self._cache_events, []
        return events

    def adapter_names(self) -> list[str]:
        return sorted(self._loras)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            totals = dict(self._totals)
            served = dict(self._served)
            in_flight = self._in_flight
        hit_rate = totals["cached_tokens"] / totals["prompt_tokens"] if totals["prompt_tokens"] else None
        return {**totals, "in_flight": in_flight, "peak_in_flight": self._peak_in_flight,
                "peak_unfinished": self._peak_unfinished, "unfinished": self._unfinished,
                "cancelled": self.cancelled, "engine_ticks": self.ticks,
                "prefix_cache_hit_rate": hit_rate, "alive": self.alive, "adapters": self.adapter_names(),
                "served_by": served}


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """An adapter loaded in this engine: our id for it and the vLLM request that names it."""

    lora_id: int
    request: Any
