"""The base every routing policy shares: what a policy sees of a replica
(``ReplicaLoad``) and the ``Router`` contract, with its no-op hooks.

Pure: no I/O, no vLLM. The policies are ``routing.py`` (prefix, least_loaded,
round_robin, the factory ``make_router``) and ``cache_routing.py`` (cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ReplicaLoad", "Router"]


@dataclass(frozen=True)
class ReplicaLoad:
    index: int
    alive: bool
    outstanding: int  # estimated tokens of work still in flight
    in_flight: int = 0
    share: int = 0  # which of the replicas sharing its GPU (0: the first)


class Router:
    """A routing policy. Subclasses implement ``choose``; it must return the
    index of an alive replica and may assume at least one is alive. ``adapter``
    is the request's LoRA adapter (None: the base model); a policy that does not
    route by adapter ignores it (the pool has already kept only the replicas
    holding it).

    ``prompt`` is the request's token ids when the policy sets ``wants_token_ids``
    (the pool tokenises text prompts for it, with the engines' own rule), else its
    text or token ids as the caller gave them. A policy that sets
    ``wants_cache_events`` is given every replica's KV-cache events (``observe``)
    before each choice; the pool replaces it by ``fallback()`` when a replica
    cannot report them."""

    name = "base"
    wants_token_ids = False
    wants_cache_events = False

    def choose(self, prompt, loads: Sequence[ReplicaLoad], adapter: str | None = None) -> int:
        raise NotImplementedError

    def observe(self, replica: int, events: list) -> None:
        """KV-cache events (``protocol.CacheEvent``) of one replica, oldest first. No-op by default."""

    def fallback(self) -> Router:
        """The policy to use where cache events are unavailable. Itself by default."""
        return self

    def forget(self, replica: int) -> None:
        """A replica died (its cache with it): drop what the policy knows of it. No-op by default."""

    def drop(self, adapter: str) -> None:
        """An adapter was unloaded: drop what the policy knows of it. No-op by default."""

    @staticmethod
    def _alive(loads: Sequence[ReplicaLoad]) -> list[ReplicaLoad]:
        alive = [load for load in loads if load.alive]
        if not alive:
            raise ValueError("no alive replica to route to")
        return alive
