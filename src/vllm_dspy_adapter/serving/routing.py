"""Routing policies: which replica serves a request. Pure logic, no I/O, no vLLM.

A policy sees the request's prompt (text or token ids) and each replica's load,
and returns a replica index. Load is *outstanding work*: the tokens still to be
generated (and, lightly weighted, prefilled) by requests in flight, not a count
of requests, because one 2,000-token answer costs as much as many short ones.

Policies:

- ``"prefix"`` (default): requests whose prompts share a prefix go to the same
  replica so vLLM's prefix cache serves the shared part (DSPy prompts repeat the
  system message and demos of a predictor in every call; GEPA and MIPROv2 make one
  such group per candidate). The shared prefix is found at a granularity of
  ``block_chars`` characters, like an approximate radix tree: the replica that
  last served the longest matching prefix wins, unless its load is well above
  the least-loaded replica's, in which case load wins and the prefix moves.
- ``"least_loaded"``: the replica with the least outstanding work.
- ``"round_robin"``: each replica in turn, for comparison.
- ``"cache"`` (``cache_routing.py``): exact, from each engine's KV-cache events:
  the replica holding the longest run of the prompt's token blocks, balanced
  against load; the pool uses ``"prefix"`` instead where a replica cannot report
  events (Ray), and logs that once.

Several replicas on one GPU (``replicas_per_gpu``): before any policy chooses,
``open_replicas`` keeps the replicas that may take a new request. The first
replica of every GPU (share 0) always may; share ``s`` opens once every alive
replica of lower shares holds ``spill_at`` requests or more. So with few calls in
flight requests go to distinct GPUs, one engine each (one engine serves a small
batch faster than two sharing its GPU); with many, they spread over all (two
engines keep the GPU busier than one). Measured on one H200, 0.6B-shaped model,
raw AsyncLLM engines (docs/MULTI_GPU_GUIDE.md, "Small models"): 64 in flight, one
engine 1.19x two; 1,024 in flight, two engines 1.62x one; 256 in flight, even.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence

from .cache_routing import CacheRouter
from .policy import ReplicaLoad, Router

__all__ = ["ReplicaLoad", "Router", "PrefixRouter", "CacheRouter", "LeastLoadedRouter", "RoundRobinRouter", "make_router", "POLICIES",
           "open_replicas", "SPILL_AT"]

# Requests in flight on each lower-share replica before a GPU's next replica takes any.
SPILL_AT = 256


def open_replicas(loads: Sequence[ReplicaLoad], spill_at: int = SPILL_AT) -> list[ReplicaLoad]:
    """The alive replicas that may take a new request (see the module docstring):
    share 0 always; share s once every alive replica of a lower share has ``spill_at``
    requests in flight or more."""
    alive = [load for load in loads if load.alive]
    out = []
    for share in sorted({load.share for load in alive}):
        lower = [load for load in alive if load.share < share]
        if lower and any(load.in_flight < spill_at for load in lower):
            break
        out += [load for load in alive if load.share == share]
    return out


class RoundRobinRouter(Router):
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, prompt, loads, adapter=None):
        alive = self._alive(loads)
        return alive[next(self._counter) % len(alive)].index


class LeastLoadedRouter(Router):
    name = "least_loaded"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, prompt, loads, adapter=None):
        alive = self._alive(loads)
        least = min(load.outstanding for load in alive)
        tied = [load for load in alive if load.outstanding == least]
        # Rotate among ties so an idle pool fills evenly instead of piling on replica 0.
        return tied[next(self._counter) % len(tied)].index


def prefix_hashes(prompt: str | Sequence[int], block: int, limit: int) -> list[bytes]:
    """Digests of the prompt's first block, first two blocks, ... (at most ``limit``).

    Incremental, so a long prompt costs one pass. The final partial block is left
    out: the tail of a prompt is the part that differs between requests.
    """
    if isinstance(prompt, str):
        data = prompt.encode("utf-8", "surrogatepass")
    else:
        data = b"".join(int(t).to_bytes(4, "little", signed=False) for t in prompt)
        block *= 4  # token ids are four bytes each; a block is ``block`` tokens
    digest = hashlib.blake2b(digest_size=16)
    out: list[bytes] = []
    for start in range(0, min(len(data) // block, limit) * block, block):
        digest.update(data[start:start + block])
        out.append(digest.copy().digest())
    return out


class PrefixRouter(Router):
    """Prefix affinity with a load guard. See the module docstring."""

    name = "prefix"

    def __init__(self, *, block_chars: int = 256, max_blocks: int = 256, balance_ratio: float = 0.5,
                 balance_slack: int = 2048, table_size: int = 100_000) -> None:
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.balance_ratio = balance_ratio
        self.balance_slack = balance_slack
        self.table_size = table_size
        self._owner: OrderedDict[bytes, int] = OrderedDict()
        self._fallback = LeastLoadedRouter()

    def overloaded(self, load: ReplicaLoad, least: int) -> bool:
        """Whether ``load`` is "well above" the least-loaded replica's ``least``."""
        return load.outstanding > least * (1 + self.balance_ratio) + self.balance_slack

    def choose(self, prompt, loads, adapter=None):
        alive = {load.index: load for load in self._alive(loads)}
        least = min(load.outstanding for load in alive.values())
        hashes = prefix_hashes(prompt, self.block_chars, self.max_blocks)
        chosen = None
        for digest in reversed(hashes):  # longest shared prefix first
            owner = self._owner.get(digest)
            if owner is not None and owner in alive:
                if not self.overloaded(alive[owner], least):
                    chosen = owner
                break  # the longest match decides; a shorter one is a worse cache bet
        if chosen is None:
            chosen = self._fallback.choose(prompt, list(alive.values()))
        for digest in hashes:
            self._owner[digest] = chosen
            self._owner.move_to_end(digest)
        while len(self._owner) > self.table_size:
            self._owner.popitem(last=False)
        return chosen

    def forget(self, replica: int) -> None:
        """Drop a dead replica's prefixes (its cache is gone with it)."""
        for digest in [d for d, owner in self._owner.items() if owner == replica]:
            del self._owner[digest]


POLICIES = {"prefix": PrefixRouter, "least_loaded": LeastLoadedRouter, "round_robin": RoundRobinRouter,
            "cache": lambda: CacheRouter(fallback=PrefixRouter())}


def make_router(policy: str | Router) -> Router:
    if isinstance(policy, Router):
        return policy
    try:
        return POLICIES[policy]()
    except KeyError:
        from ..errors import ConfigurationError

        raise ConfigurationError(f"Unknown routing policy {policy!r}; choose one of {sorted(POLICIES)}") from None
