"""The DSPy LM classes: ``vLLMOffline`` (one engine in this process) and
``vLLMOfflineMultiGPU`` (replicas in worker processes or Ray actors).

Both are ``dspy.LM`` subclasses on DSPy 3.4's engine contract
(``dspy_engine.py``) and share one start path: a backend starts the replicas,
a pool routes requests over them, and a ``Runtime`` holds both for the LM and
all its copies. ``vLLMOffline``'s engine is the one replica of the in-process
backend, so death and stall handling are the same for both classes.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dspy

from ..serving.adapter_routing import AdapterRouter
from ..config import ModelSpec, lora_defaults
from .dspy_engine import AsyncDSPyEngine, DSPyEngine, Runtime
from ..errors import ConfigurationError, LMClosedError
from .batch import run_batch
from .lora_methods import LoRAMixin
from ..serving.pool import DEFAULT_HEALTH_TIMEOUT, ReplicaPool
from ..protocol import Backend, Generation, ModelFacts
from ..serving.routing import SPILL_AT, Router
from .tools import AUTO, check_parser_name

__all__ = ["vLLMOffline", "vLLMOfflineMultiGPU", "GenerationOutput"]

logger = logging.getLogger(__name__)

# Constructor arguments that belong to dspy.LM; every other keyword is a vLLM engine argument.
_DSPY_ARGS = ("temperature", "max_tokens", "cache", "callbacks", "num_retries", "top_p", "stop", "rollout_id")

GenerationOutput = Generation  # the public name for a full batch_generate result

_LIVE: weakref.WeakSet = weakref.WeakSet()


@dataclass(frozen=True)
class _Layout:
    """Where an LM's replicas run and how requests are spread over them."""

    backend: Backend
    router: Router
    max_restarts: int  # 0: a dead replica stays dead
    adapter_routing: bool = True  # with enable_lora: AdapterRouter around the routing policy
    cache_events: bool = False  # the engines publish KV-cache events (the "cache" policy reads them)
    spill_at: int = SPILL_AT  # replicas_per_gpu > 1: in flight on a GPU's earlier replicas before the next opens

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


def _backend_object(backend: Any) -> Backend:
    """A backend given as an object (``backend=FakeBackend(handler)``), checked against the contract."""
    if not isinstance(backend, Backend):
        raise ConfigurationError(
            f"backend={backend!r} is neither a backend name nor an object with the Backend contract "
            "(model_facts, start, restart, shutdown; see vllm_dspy_adapter.protocol.Backend). "
            "For tests with no model use backend=FakeBackend(handler).")
    return backend


def _check_health_timeout(value: float | None) -> None:
    if value is not None and (not isinstance(value, (int, float)) or value <= 0):
        raise ConfigurationError(f"health_timeout must be a number of seconds > 0, or None to turn the stall "
                                 f"check off; got {value!r}")


class vLLMOffline(LoRAMixin, dspy.LM):
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
      stopped and ``ReplicaStartError`` is raised;
    - ``health_timeout``: seconds a busy engine may go without progress (no tick
      of its engine core, no finished request) before it is declared stalled
      (default 120, None: never). A stalled engine is killed and every waiting
      call fails with ``NoHealthyReplicaError`` naming the stall;
    - ``tool_call_parser``: native tool calls, as ``vllm serve --enable-auto-tool-choice
      --tool-call-parser NAME``: ``"auto"`` (default) picks vLLM's parser from the
      model's chat template (``hermes`` for Qwen2.5/Qwen3, ``mistral``, ``llama3_json``,
      ...) and leaves them off for a template without tools; a name chooses one of
      vLLM's parsers; ``None`` turns them off. With a parser, DSPy's adapters send
      tools natively (``supports_function_calling`` is true).
    - ``enable_lora=True`` (with vLLM's ``max_loras``, ``max_lora_rank``): serve LoRA
      adapters, loaded at run time with ``load_adapter`` and used through
      ``with_adapter``; ``lm.finetune`` / ``dspy.BootstrapFinetune`` train one
      (docs/LORA_GUIDE.md).
    - ``backend``: None (one vLLM engine in this process), or a backend object, such as
      ``FakeBackend(handler)`` to test a DSPy program with no model and no vLLM
      (docs/VLLM_OFFLINE_GUIDE.md, "Testing without a model"); engine arguments are
      then the backend's to check.

    Use it as a context manager or call ``shutdown()``; engines also stop at exit.
    After a shutdown every call fails with ``LMClosedError``.
    """

    def __init__(self, model: str | None = None, *, backend: Backend | None = None,
                 sampling_params: dict[str, Any] | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None, start_timeout: float | None = 1800.0,
                 health_timeout: float | None = DEFAULT_HEALTH_TIMEOUT, tool_call_parser: str | None = AUTO,
                 **kwargs: Any):
        from ..backends import make_backend
        from ..serving.routing import RoundRobinRouter

        backend = make_backend("inprocess", start_timeout=start_timeout) if backend is None else _backend_object(backend)
        # One engine here, never restarted (a dead in-process engine means a new LM).
        layout = _Layout(backend, RoundRobinRouter(), max_restarts=0)
        self._open(model, layout, sampling_params=sampling_params, chat_template_kwargs=chat_template_kwargs,
                   start_timeout=start_timeout, health_timeout=health_timeout, tool_call_parser=tool_call_parser,
                   **kwargs)

    def _open(self, model: str | None, layout: _Layout, *, sampling_params: dict[str, Any] | None = None,
              chat_template_kwargs: dict[str, Any] | None = None, start_timeout: float | None = 1800.0,
              health_timeout: float | None = DEFAULT_HEALTH_TIMEOUT, tool_call_parser: str | None = AUTO,
              **kwargs: Any) -> None:
        """The one construction path of both classes: check every argument, start the
        layout's replicas, then become a ``dspy.LM`` over them."""
        dspy_kwargs, engine_kwargs = _split_kwargs(dict(kwargs))
        self._init_args = {"model": model, "sampling_params": sampling_params,
                           "chat_template_kwargs": chat_template_kwargs, "start_timeout": start_timeout,
                           "health_timeout": health_timeout,
                           # False, not None: dump_state drops None values, and None (off) is not the default
                           "tool_call_parser": False if tool_call_parser is None else tool_call_parser,
                           **engine_kwargs}
        _check_health_timeout(health_timeout)
        self._tool_call_parser = check_parser_name(tool_call_parser)  # an unknown name fails before any start
        # The backend checks the arguments, resolves the model, loads the tokenizer: all before any start.
        facts = layout.backend.model_facts(model, engine_kwargs, dict(sampling_params or {}))
        path = facts.model
        engine_kwargs, chosen = lora_defaults(engine_kwargs)  # not in _init_args: a saved LM chooses again
        if chosen is not None:
            logger.info("%s", chosen)
        name = None if model is not None else _default_name(path)
        spec = ModelSpec(model=path, engine_kwargs=engine_kwargs, sampling=dict(sampling_params or {}),
                         chat_template_kwargs=dict(chat_template_kwargs or {}), model_name=name,
                         cache_events=layout.cache_events)
        runtime = self._start(spec, facts, layout, health_timeout=health_timeout)
        _LIVE.add(runtime)
        self._runtime = runtime
        dspy_kwargs.setdefault("num_retries", 0)  # a local engine has no transient network errors
        from ..lora.provider import LoRAProvider

        engine = DSPyEngine(runtime)  # the async engine shares its adapter binding (switch_adapter)
        super().__init__(model=runtime.label, engine=engine, provider=LoRAProvider(runtime),
                         async_engine=AsyncDSPyEngine(runtime, binding=engine.binding), **dspy_kwargs)

    def _start(self, spec: ModelSpec, facts: ModelFacts, layout: _Layout, *, health_timeout: float | None) -> Runtime:
        """The backend starts every replica (all ready, or none left running), the pool takes them."""
        backend, router, max_restarts = layout.backend, layout.router, layout.max_restarts
        if spec.max_lora_rank is not None and layout.adapter_routing and not isinstance(router, AdapterRouter):
            router = AdapterRouter(router, max_loras=spec.max_loras)
        try:
            pool = ReplicaPool.start(backend, spec, router, max_restarts=max_restarts, health_timeout=health_timeout,
                                     spill_at=layout.spill_at, tokenizer=facts.tokenizer)
        except BaseException:
            backend.shutdown()
            raise
        try:
            return Runtime(spec, facts, pool, backend, pool.replicas, tool_call_parser=self._tool_call_parser)
        except BaseException:  # Ctrl-C or a tokenizer error: no replica may outlive a failed constructor
            pool.close()
            for replica in pool.replicas:
                replica.shutdown()
            backend.shutdown()
            raise

    # ------------------------------------------------------------ batch use

    def batch_generate(self, prompts: Sequence[Any], *, progress: bool = True, return_outputs: bool = False,
                       raise_on_error: bool = True, per_prompt: Sequence[dict[str, Any]] | None = None,
                       adapter: str | None = None, **sampling: Any) -> list[Any]:
        """Generate for every prompt at once; results come back in input order.

        ``prompts``: strings (sent as they are, like ``LLM.generate``), chat message
        lists (the chat template is applied), or ``{"prompt_token_ids": [...]}``.
        ``sampling``: any ``SamplingParams`` field (``max_tokens``, ``temperature``,
        ``ignore_eos``, ...), on top of the LM's ``sampling_params``. ``per_prompt``:
        one dict of such fields per prompt (for example each prompt's own
        ``max_tokens``), applied on top of ``sampling``. Every prompt is
        submitted at once and routed like a DSPy call, so no replica waits for a
        static share; prompts that share a prefix are submitted together, the
        first one first, to one replica, so vLLM computes the shared part once. Returns strings, or ``GenerationOutput`` objects with
        ``return_outputs=True``. A failed prompt raises after every other prompt
        has finished (with ``raise_on_error=False`` its slot holds the exception).
        ``adapter``: a loaded LoRA adapter for every prompt (default: this LM's own,
        see ``with_adapter``).
        """
        runtime = self._runtime
        if runtime.closed:
            raise LMClosedError("This LM was shut down; create a new one.")
        # The adapter is read and held in one step (a GRPO swap may retire this LM's version meanwhile),
        # and held until the batch is done; each request holds it too from its submission on.
        (chosen,), hold = runtime.pool.hold_chosen(lambda: (adapter if adapter is not None else self.adapter,))
        try:
            return run_batch(runtime, prompts, adapter=chosen, progress=progress, return_outputs=return_outputs,
                             raise_on_error=raise_on_error, per_prompt=per_prompt, sampling=sampling)
        finally:
            if hold is not None:
                hold.release()

    def stats(self) -> list[dict[str, Any]]:
        """One dict per replica: device, alive, restarts, stalls and the time of the
        last one, the last death's cause, requests routed and served, tokens,
        requests in flight, prefix-cache hit rate, the engine's process ids."""
        return self._runtime.pool.stats()

    @property
    def max_model_len(self) -> int:
        return int(self._runtime.info.max_model_len)

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
    from ..models import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME if DEFAULT_MODEL_NAME in path else None


class vLLMOfflineMultiGPU(vLLMOffline):
    """The same LM over several engine replicas: one per GPU, or per
    ``tensor_parallel_size`` GPUs; on a machine without GPUs, ``num_replicas`` CPU
    replicas splitting the cores. Each request goes to the replica the routing
    policy picks (``"prefix"``, ``"least_loaded"``, ``"round_robin"``).

    A replica whose engine dies, or that stalls (``health_timeout``, as for
    ``vLLMOffline``), has its requests resubmitted to the others and is restarted
    in the background (``max_restarts`` times); if every replica is gone, calls
    fail at once with ``NoHealthyReplicaError``. ``backend="ray"`` runs the
    replicas as Ray actors over a cluster (``ray_address``); a Ray replica waits
    at most ``placement_timeout`` seconds for a node with room.

    ``replicas_per_gpu=k`` runs k replicas on each GPU, for small models whose one
    engine cannot keep a GPU busy (docs/MULTI_GPU_GUIDE.md, "Small models"): each
    gets ``gpu_memory_utilization`` / k (the argument stays the total per GPU,
    default 0.9), they start one after another on each GPU, show as devices
    ``cuda:0#0``, ``cuda:0#1``, ..., and a GPU's second replica takes requests
    only while its first holds ``spill_at`` (256) or more (few calls in flight: one
    engine per GPU; many: all of them); ``spill_at=0`` opens every replica at once.

    With ``enable_lora=True``, an adapter's requests prefer the replicas where it
    is resident (``AdapterRouter``); ``adapter_routing=False`` turns that off.

    ``backend`` may also be a backend object: ``FakeBackend(handler, replicas=3)`` runs
    the real pool, routing, restarts and LoRA bookkeeping over replicas with no engine
    (placement is then the backend's own: leave the GPU and replica arguments unset).
    """

    def __init__(self, model: str | None = None, num_gpus: int | None = None, gpus: Sequence[int] | None = None,
                 tensor_parallel_size: int = 1, num_replicas: int | None = None, routing: str | Router = "prefix", *,
                 backend: str | Backend = "local", ray_address: str | None = None, max_restarts: int = 3,
                 start_timeout: float | None = 1800.0, placement_timeout: float = 60.0, replicas_per_gpu: int = 1,
                 adapter_routing: bool = True, spill_at: int = SPILL_AT,
                 **kwargs: Any):
        from ..backends import BACKENDS, make_backend
        from ..backends.placement import replica_share
        from ..serving.routing import make_router

        named = isinstance(backend, str)
        if named and backend not in BACKENDS:
            raise ConfigurationError(f"Unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
        if not named:
            placement = {"num_gpus": num_gpus, "gpus": gpus, "num_replicas": num_replicas, "ray_address": ray_address}
            given = [k for k, v in placement.items() if v is not None]
            given += [k for k, v in (("tensor_parallel_size", tensor_parallel_size), ("replicas_per_gpu", replicas_per_gpu))
                      if v != 1]
            if given:
                raise ConfigurationError(
                    f"{', '.join(given)}: placement belongs to the backend object passed as backend= "
                    "(FakeBackend(handler, replicas=N) for N fake replicas); leave these unset.")
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise ConfigurationError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        if isinstance(spill_at, bool) or not isinstance(spill_at, int) or spill_at < 0:
            raise ConfigurationError(f"spill_at must be an int >= 0 (requests in flight on a GPU's first replica before "
                                     f"its next one takes any; 0 opens all at once), got {spill_at!r}")
        total_memory = kwargs.get("gpu_memory_utilization")
        # Placement is decided (and refused) here, before any engine starts.
        router = make_router(routing)
        chosen = make_backend(backend, num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
                              num_replicas=num_replicas, ray_address=ray_address, start_timeout=start_timeout,
                              placement_timeout=placement_timeout,
                              replicas_per_gpu=replicas_per_gpu) if named else _backend_object(backend)
        layout = _Layout(chosen, router, max_restarts=max_restarts, adapter_routing=bool(adapter_routing),
                         # Ray actors cannot hand the events over: the pool falls back (and says so)
                         cache_events=router.wants_cache_events and backend != "ray", spill_at=spill_at)
        if tensor_parallel_size > 1:
            kwargs["tensor_parallel_size"] = tensor_parallel_size
        try:
            if replicas_per_gpu > 1:
                kwargs["gpu_memory_utilization"] = replica_share(model, total_memory, replicas_per_gpu, kwargs)
            self._open(model, layout, start_timeout=start_timeout, **kwargs)
        except BaseException:
            layout.backend.shutdown()  # a Ray connection made for us
            raise
        self._init_args.update({"num_gpus": num_gpus, "gpus": list(gpus) if gpus else None, "routing": routing,
                                "num_replicas": num_replicas, "tensor_parallel_size": tensor_parallel_size,
                                "backend": backend if named else None, "ray_address": ray_address, "max_restarts": max_restarts,
                                "replicas_per_gpu": replicas_per_gpu, "gpu_memory_utilization": total_memory,
                                "spill_at": spill_at})

    @property
    def num_replicas(self) -> int:
        return len(self._runtime.replicas)
