"""Adapter-aware routing: a request for a LoRA adapter goes where that adapter is
resident, balanced against load. Pure logic, no I/O, no vLLM.

vLLM keeps at most ``max_loras`` adapters in a replica's GPU slots at once and
swaps others in from CPU memory (or disk) when a request needs them; a swap
costs time, and while a slot is taken by one adapter a request for another
waits. With more adapters than ``max_loras``, spreading every adapter over every
replica makes each replica swap all the time. ``AdapterRouter`` keeps, per
replica, a model of which adapters are resident (a least-recently-used list of
``max_loras`` entries, the policy vLLM uses for its slots) and:

1. a request without an adapter goes to the base policy unchanged;
2. a request for adapter A goes to a replica where A is resident, unless every
   such replica is well above the least-loaded replica's load (the same
   guard as prefix routing: ``outstanding > least * (1 + balance_ratio) +
   balance_slack``); among the resident replicas the base policy decides (so
   prefix affinity still works inside an adapter's replicas);
3. otherwise A goes to the least-loaded replica, preferring one with a free
   slot, and is recorded as resident there (evicting that replica's
   least-recently-used adapter from the model). A hot adapter thus spreads to
   more replicas as its load grows, and a cold one stays on one.

While there are no more adapters than ``max_loras`` every replica can hold all
of them, and there is nothing to gain: the base policy decides alone.

Prefix affinity is keyed per adapter: vLLM's prefix cache never shares blocks
between different adapters (the adapter is part of a block's hash), so the same
prompt under two adapters is two different prefixes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from .routing import ReplicaLoad, Router, make_router

__all__ = ["AdapterRouter"]


def _salted(prompt: str | Sequence[int], adapter: str | None) -> str | Sequence[int]:
    """The prompt as the prefix table sees it: distinct per adapter."""
    if adapter is None:
        return prompt
    if isinstance(prompt, str):
        return f"\x00lora:{adapter}\x00{prompt}"
    salt = hashlib.blake2b(adapter.encode(), digest_size=8).digest()
    return [int.from_bytes(salt[:4], "little"), int.from_bytes(salt[4:], "little"), *prompt]


class AdapterRouter(Router):
    """Adapter residency first, load second, the base policy among equals.

    ``choose(prompt, loads, adapter=None)``; ``forget(replica)`` when a replica
    dies (a restarted one starts with empty slots); ``drop(adapter)`` when an
    adapter is unloaded; ``resident(replica)`` for stats and tests.
    """

    name = "adapter"

    def __init__(self, base: str | Router = "prefix", *, max_loras: int = 1, balance_ratio: float = 0.5,
                 balance_slack: int = 2048) -> None:
        if max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        self.base = make_router(base)
        self.max_loras = max_loras
        self.balance_ratio = balance_ratio
        self.balance_slack = balance_slack
        self._slots: dict[int, OrderedDict[str, None]] = {}
        self._known: set[str] = set()
        # A base policy that keys the cache by adapter itself ("cache") gets the adapter, not a salted prompt.
        self.wants_token_ids = self.base.wants_token_ids
        self.wants_cache_events = self.base.wants_cache_events

    def observe(self, replica: int, events: list) -> None:
        self.base.observe(replica, events)

    def fallback(self) -> Router:
        base = self.base.fallback()
        if base is self.base:
            return self
        return AdapterRouter(base, max_loras=self.max_loras, balance_ratio=self.balance_ratio,
                             balance_slack=self.balance_slack)

    def _base_choose(self, prompt, loads, adapter: str) -> int:
        if self.base.wants_token_ids:
            return self.base.choose(prompt, loads, adapter=adapter)
        return self.base.choose(_salted(prompt, adapter), loads)

    def overloaded(self, load: ReplicaLoad, least: int) -> bool:
        return load.outstanding > least * (1 + self.balance_ratio) + self.balance_slack

    def resident(self, replica: int) -> list[str]:
        """Adapters the model believes are in ``replica``'s slots, least recently used first."""
        return list(self._slots.get(replica, ()))

    def choose(self, prompt, loads, adapter: str | None = None):
        if adapter is None:
            return self.base.choose(prompt, loads)
        self._known.add(adapter)
        alive = self._alive(loads)
        if len(self._known) <= self.max_loras:
            chosen = self._base_choose(prompt, alive, adapter)
        else:
            least = min(load.outstanding for load in alive)
            holders = [load for load in alive
                       if adapter in self._slots.get(load.index, ()) and not self.overloaded(load, least)]
            if holders:
                chosen = self._base_choose(prompt, holders, adapter)
            else:
                chosen = self._newcomer_replica(alive, least)
                # The base policy's prefix table must learn where this prompt went.
                self._teach_base(prompt, alive, chosen, adapter)
        self._touch(chosen, adapter)
        return chosen

    def _newcomer_replica(self, alive: list[ReplicaLoad], least: int) -> int:
        """Where an adapter that is resident nowhere usable goes: among the
        replicas not overloaded, one with a free slot if any, then the least loaded."""
        candidates = [load for load in alive if not self.overloaded(load, least)]
        free = [load for load in candidates if len(self._slots.get(load.index, ())) < self.max_loras]
        pool = free or candidates
        return min(pool, key=lambda load: (load.outstanding, len(self._slots.get(load.index, ())), load.index)).index

    def _teach_base(self, prompt, alive: list[ReplicaLoad], chosen: int, adapter: str) -> None:
        only = [load for load in alive if load.index == chosen]
        self._base_choose(prompt, only, adapter)

    def _touch(self, replica: int, adapter: str) -> None:
        slots = self._slots.setdefault(replica, OrderedDict())
        slots[adapter] = None
        slots.move_to_end(adapter)
        while len(slots) > self.max_loras:
            slots.popitem(last=False)

    def forget(self, replica: int) -> None:
        self._slots.pop(replica, None)
        self.base.forget(replica)

    def drop(self, adapter: str) -> None:
        self._known.discard(adapter)
        for slots in self._slots.values():
            slots.pop(adapter, None)
