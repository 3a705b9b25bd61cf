"""The wire types and the two contracts of the replica layer.

- Wire types: the request and result that travel between the DSPy side, the
  router and the replicas (possibly in another process, so they are plain,
  picklable data with no vLLM objects in them).
- ``Replica`` and ``Backend``: what the pool needs of a replica and of whatever
  starts replicas, written as ``typing.Protocol`` classes (DSPy writes its engine
  contract the same way). ``backends/`` holds the implementations; the fast test
  suite drives the real pool with fakes of both.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .config import ModelSpec

__all__ = ["GenerationRequest", "Generation", "TokenLogprobData", "ReplicaInfo", "StreamPiece", "ModelFacts", "Replica",
           "Backend", "OnDeath", "BlocksStored", "BlocksRemoved", "CacheCleared", "CacheEventsLost", "CacheEvent"]


@dataclass
class GenerationRequest:
    """One prompt ready for an engine.

    ``prompt`` is the final text (chat template already applied when ``chat`` is
    true) or a list of token ids. ``sampling`` holds ``SamplingParams`` keyword
    arguments; ``max_tokens=None`` means "the rest of the context window", which
    only the engine can compute once it has tokenised the prompt.
    """

    prompt: str | list[int]
    sampling: dict[str, Any] = field(default_factory=dict)
    chat: bool = False
    images: list[Any] = field(default_factory=list)
    adapter: str | None = None  # the name of a LoRA adapter loaded with lm.load_adapter, or the base model
    # The text prompt's token ids when the driver already tokenised it (cache-aware routing
    # needs them; ``ModelSpec.tokenize`` is the one rule): the engine then uses them as they are.
    token_ids: list[int] | None = None

    def estimated_prompt_tokens(self) -> int:
        # Routing needs a load estimate before any tokeniser runs; four
        # characters a token is close enough for English and code.
        if self.token_ids is not None:
            return len(self.token_ids)
        if isinstance(self.prompt, str):
            return max(1, len(self.prompt) // 4)
        return len(self.prompt)

    def estimated_output_tokens(self) -> int:
        max_tokens = self.sampling.get("max_tokens")
        return int(max_tokens) if max_tokens else 256


@dataclass
class TokenLogprobData:
    token: str
    logprob: float
    token_id: int | None = None
    top: list[tuple[str, float, int | None]] = field(default_factory=list)


@dataclass
class Generation:
    """What one finished request produced, as plain data."""

    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobData] | None = None
    replica: int = 0
    request_id: str = ""
    adapter: str | None = None  # the LoRA adapter the engine ran it with (its name); None: the base model


# ------------------------------------------------------------------ the contracts


@dataclass
class StreamPiece:
    """New text of one streamed request since its previous piece."""

    text: str
    num_tokens: int = 0


@dataclass
class ReplicaInfo:
    """What a started replica tells the driver about its engine (crosses processes)."""

    max_model_len: int
    is_multimodal: bool = False
    model_defaults: dict[str, Any] = field(default_factory=dict)
    start_seconds: float = 0.0
    engine_pids: list[int] = field(default_factory=list)
    node: str | None = None  # where it runs, for replicas of a cluster
    modalities: tuple[str, ...] | None = None  # input modalities besides text ("image", ...); None: unknown


@dataclass(frozen=True)
class ModelFacts:
    """What the driver needs of the model before any replica starts, from the backend
    (``Backend.model_facts``): the model the replicas load, the tokenizer prompts are
    rendered and counted with, and the sampling fields a request may set.

    ``tokenizer``: an object with ``encode(text, add_special_tokens=...)``, ``decode(ids)``,
    ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)``
    and ``chat_template`` (a Hugging Face tokenizer is one). ``sampling_fields``: the
    ``SamplingParams`` field names (vLLM's own for an engine backend); None takes any."""

    model: str
    tokenizer: Any
    sampling_fields: frozenset[str] | None = None


# ------------------------------------------------------- KV-cache events (plain data)
# What an engine's prefix cache did, from vLLM's KV-cache events (``kv_events_config``),
# as plain data that crosses processes (a worker's heartbeat carries them). Block hashes
# are vLLM's own (opaque, per engine); ``cache_routing`` keys blocks by their tokens.


@dataclass(frozen=True)
class BlocksStored:
    """Full blocks entered the cache: ``hashes[i]`` holds ``token_ids[i*block_size:(i+1)*block_size]``,
    chained after the block ``parent`` (None: the prompt's first block)."""

    hashes: tuple[Any, ...]
    parent: Any
    token_ids: tuple[int, ...]
    block_size: int
    adapter: str | None = None  # the LoRA adapter the blocks were computed with (None: the base model)


@dataclass(frozen=True)
class BlocksRemoved:
    hashes: tuple[Any, ...]


@dataclass(frozen=True)
class CacheCleared:
    """The engine dropped every cached block (a reset of its prefix cache)."""


@dataclass(frozen=True)
class CacheEventsLost:
    """Some events never arrived (a gap in the stream, or its reader failed): what is known
    of this engine's cache is no longer exact."""

    reason: str


CacheEvent = BlocksStored | BlocksRemoved | CacheCleared | CacheEventsLost


OnDeath = Callable[["Replica", str], None]
"""``on_death(replica, cause)``: called once per death of a replica that was alive,
from a background thread, after every request it held has failed with
``ReplicaDeadError``. The pool resubmits those requests and restarts the replica."""


@runtime_checkable
class Replica(Protocol):
    """One model replica as the pool sees it, wherever it runs (this process, a
    worker process, a Ray actor). ``backends/base.py`` implements the shared part."""

    index: int  # its position in the pool, stable across restarts
    share: int  # which of the replicas sharing its GPU(s) it is (0: the first or only one)
    name: str  # for logs: "replica-0[cuda:0]"
    device: str  # "cuda:0", "cuda:0#1", "cpu:0-3", "cpu" (vLLMOffline on a CPU), "node:10.0.0.2/gpu:1"
    restarts: int  # how many times the pool restarted it
    info: ReplicaInfo | None  # set once it is ready

    @property
    def alive(self) -> bool:
        """True from ready to death or shutdown; a dead replica refuses requests."""

    def submit(self, request: GenerationRequest, request_id: str | None = None, *, sink: Any = None) -> Future:
        """Queue one request; never blocks on the engine. The future resolves to a
        ``Generation``, or fails: ``ReplicaDeadError`` (the pool resubmits),
        ``PromptTooLongError`` / ``UnsupportedInputError`` (the request's own fault).
        ``sink`` (an object with ``put(StreamPiece)``): the request is streamed, each
        new piece of text goes to it as it is decoded; None: the whole answer only."""

    def cancel(self, request_id: str) -> None:
        """The caller gave up on a request it submitted here: abort it in vLLM wherever
        the replica runs (within a second), and fail its future with ``CancelledError``
        unless it is already done. Returns at once; an id not held is ignored."""

    def last_progress(self) -> float:
        """``time.monotonic()`` of the last sign of progress, by one rule in every backend:
        a reply, streamed text, or a tick of its engine's pulse while that engine holds
        requests (an idle engine's ticks are not progress). The pool's stall check reads it."""

    def declare_dead(self, cause: str) -> None:
        """Kill whatever runs the replica now (a stalled replica cannot stop in
        order) and run the death path: fail its requests, then ``on_death``."""

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """Counters of its engine; never waits longer than ``timeout``."""

    @property
    def cache_events(self) -> bool:
        """Whether it reports its engine's KV-cache events (``take_cache_events``)."""

    def take_cache_events(self) -> list[CacheEvent]:
        """The KV-cache events its engine reported since the last call, oldest first (empty
        when ``cache_events`` is false); a restart starts with ``CacheCleared``."""

    @property
    def adapters(self) -> frozenset[str]:
        """Names of the LoRA adapters its current engine has loaded (none after a restart
        until the pool loads them again)."""

    def add_adapter(self, adapter: Any, timeout: float = 120.0) -> None:
        """Load a checked ``lora.AdapterSpec`` into its engine, or raise (``ConfigurationError``
        when vLLM refuses it, ``ReplicaDeadError`` when the replica is not running); never
        waits longer than ``timeout``."""

    def remove_adapter(self, name: str, timeout: float = 60.0) -> None:
        """Unload an adapter from its engine (nothing if it was not loaded)."""

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop in order; requests still held fail with ``ReplicaDeadError``. Idempotent."""


@runtime_checkable
class Backend(Protocol):
    """Starts and restarts replicas of one kind. Placement is checked when the
    backend is built, so a bad request fails before any start. The LM classes take
    one by name (``"local"``, ``"ray"``) or as an object (``backend=FakeBackend(handler)``)."""

    def model_facts(self, model: str | None, engine_kwargs: dict[str, Any],
                    sampling: dict[str, Any]) -> ModelFacts:
        """Before any start: check the LM's engine arguments and fixed sampling options
        against what this backend runs (``ConfigurationError`` naming the bad one), resolve
        ``model`` (None: the default model) and load the driver's tokenizer. A backend may
        spawn its worker processes first so they import while the driver checks (the local
        one does); a failed check stops them before it raises."""

    def start(self, spec: ModelSpec, on_death: OnDeath) -> list[Replica]:
        """Start every replica (in parallel where possible) and return them ready,
        or raise ``ReplicaStartError`` with nothing left running."""

    def restart(self, replica: Replica) -> None:
        """Bring a dead replica back in place (same index), or raise."""

    def shutdown(self) -> None:
        """Release what the backend itself holds (a Ray connection); replicas
        are shut down by the pool first."""
