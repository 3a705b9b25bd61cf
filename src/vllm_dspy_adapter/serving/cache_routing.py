"""The ``"cache"`` routing policy: exact, from what each engine reports it holds.

Each engine publishes its KV-cache events (vLLM's ``kv_events_config``): blocks
stored, blocks removed, all cleared. ``ReplicaCache`` replays one replica's stream
into the set of blocks it holds. vLLM names a block by a chained hash that may be
seeded per process, so blocks are keyed here by their *content*: a block's key
chains its parent's key with its token ids (``block_keys``), and the same key is
computed for a new prompt's blocks. A LoRA adapter's blocks chain from a root of
their own, as in vLLM, so they never match the base model's.

``CacheRouter.choose``: among the replicas whose load is not well above the least
loaded (``outstanding > least * (1 + balance_ratio) + balance_slack``), the one
holding the longest run of the prompt's leading blocks; ties go to the least
loaded. What was routed but not yet reported (events arrive after the prefill,
and all of a burst is routed before any) counts as held for ``expect_s`` seconds,
so a burst of one prefix's questions still lands on one replica; an eviction
reported later removes it at once, which the approximate ``"prefix"`` policy
never learns.

Pure: no I/O, no vLLM; tests feed it recorded event streams.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..protocol import BlocksRemoved, BlocksStored, CacheCleared, CacheEventsLost
from .policy import ReplicaLoad, Router

__all__ = ["CacheRouter", "ReplicaCache", "block_keys", "DEFAULT_BLOCK_SIZE"]

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16  # vLLM's on GPUs; the first event of an engine tells the real one


def _root(adapter: str | None) -> bytes:
    return b"" if adapter is None else hashlib.blake2b(b"lora:" + adapter.encode(), digest_size=16).digest()


def _chain(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("I", tokens).tobytes(), digest_size=16).digest()


def block_keys(token_ids: Sequence[int], block_size: int, adapter: str | None = None,
               limit: int | None = None) -> list[bytes]:
    """The content keys of the prompt's full blocks, each chained on the previous
    (at most ``limit``); the last partial block is never cached by vLLM, so it has none."""
    count = len(token_ids) // block_size
    if limit is not None:
        count = min(count, limit)
    key, out = _root(adapter), []
    for start in range(0, count * block_size, block_size):
        key = _chain(key, token_ids[start:start + block_size])
        out.append(key)
    return out


class ReplicaCache:
    """One replica's cached blocks, replayed from its event stream."""

    def __init__(self) -> None:
        self._key_of: dict[object, bytes] = {}  # vLLM's block hash -> our content key
        self._holders: dict[bytes, int] = {}  # content key -> how many of vLLM's hashes hold it
        self.block_size: int | None = None
        self.orphans = 0  # stored blocks whose parent was never reported (not tracked)
        self.lost = 0  # CacheEventsLost seen

    def __contains__(self, key: bytes) -> bool:
        return key in self._holders

    def __len__(self) -> int:
        return len(self._holders)

    def apply(self, event) -> list[bytes]:
        """Replay one event; returns the content keys it removed."""
        match event:
            case BlocksStored():
                self._store(event)
            case BlocksRemoved(hashes):
                return [key for key in map(self._remove, hashes) if key is not None]
            case CacheCleared():
                self.clear()
            case CacheEventsLost():
                self.lost += 1
                self.clear()  # what is known may be stale: knowing less is safe, a stale block is not
            case _:
                raise TypeError(f"not a cache event: {event!r}")
        return []

    def _store(self, event: BlocksStored) -> None:
        tokens, count = event.token_ids, len(event.hashes)
        if not count:
            return
        size = len(tokens) // count
        if size * count != len(tokens):
            return  # not whole blocks: nothing a prompt's full blocks can match
        if event.parent is None:
            parent = _root(event.adapter)
        else:
            parent = self._key_of.get(event.parent)
            if parent is None:
                self.orphans += 1
                return
        if size == event.block_size:
            self.block_size = max(self.block_size or 0, size)
        for i, block_hash in enumerate(event.hashes):
            parent = _chain(parent, tokens[i * size:(i + 1) * size])
            if block_hash not in self._key_of:
                self._key_of[block_hash] = parent
                self._holders[parent] = self._holders.get(parent, 0) + 1

    def _remove(self, block_hash) -> bytes | None:
        key = self._key_of.pop(block_hash, None)
        if key is None:
            return None
        left = self._holders[key] - 1
        if left:
            self._holders[key] = left
            return None
        del self._holders[key]
        return key

    def clear(self) -> None:
        self._key_of.clear()
        self._holders.clear()


class CacheRouter(Router):
    """Longest cached prefix among the replicas not overloaded. See the module docstring.

    ``fallback``: the policy for a prompt without token ids (one with images) and,
    through ``fallback()``, for pools whose replicas cannot report events."""

    name = "cache"
    wants_token_ids = True
    wants_cache_events = True

    def __init__(self, *, fallback: Router, balance_ratio: float = 0.5, balance_slack: int = 2048,
                 expect_s: float = 30.0, max_blocks: int = 1024, table_size: int = 200_000,
                 block_size: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.balance_ratio = balance_ratio
        self.balance_slack = balance_slack
        self.expect_s = expect_s
        self.max_blocks = max_blocks
        self.table_size = table_size
        self._fixed_block_size = block_size
        self._fallback = fallback
        self._clock = clock
        self._caches: dict[int, ReplicaCache] = {}
        self._expected: dict[int, OrderedDict[bytes, float]] = {}  # routed, not yet reported: key -> until
        self._expected_size = block_size or DEFAULT_BLOCK_SIZE  # the block size the expectations were keyed with
        self._counter = itertools.count()

    def fallback(self) -> Router:
        return self._fallback

    @property
    def block_size(self) -> int:
        if self._fixed_block_size:
            return self._fixed_block_size
        sizes = [c.block_size for c in self._caches.values() if c.block_size]
        return max(sizes) if sizes else DEFAULT_BLOCK_SIZE

    def observe(self, replica: int, events: list) -> None:
        cache = self._caches.setdefault(replica, ReplicaCache())
        expected = self._expected.setdefault(replica, OrderedDict())
        for event in events:
            for key in cache.apply(event):
                expected.pop(key, None)  # evicted: no longer there, whatever was routed
            if isinstance(event, (CacheCleared, CacheEventsLost)):
                expected.clear()
            if isinstance(event, CacheEventsLost):
                logger.warning("replica %d: KV-cache events lost (%s); routing to it learns its cache again",
                               replica, event.reason)

    def matched(self, replica: int, keys: list[bytes], now: float) -> int:
        """How many of the prompt's leading blocks ``replica`` holds or was sent."""
        cache = self._caches.get(replica)
        expected = self._expected.get(replica, {})
        n = 0
        for key in keys:
            if (cache is not None and key in cache) or expected.get(key, 0.0) > now:
                n += 1
            else:
                break
        return n

    def overloaded(self, load: ReplicaLoad, least: int) -> bool:
        return load.outstanding > least * (1 + self.balance_ratio) + self.balance_slack

    def choose(self, prompt, loads, adapter=None):
        alive = self._alive(loads)
        if isinstance(prompt, str):  # no token ids (a prompt with images): the fallback decides
            return self.fallback().choose(prompt, alive, adapter=adapter)
        size = self.block_size
        if size != self._expected_size:  # learned from the first events: old expectations are keyed otherwise
            self._expected_size = size
            for expected in self._expected.values():
                expected.clear()
        keys = block_keys(prompt, size, adapter, self.max_blocks)
        now = self._clock()
        least = min(load.outstanding for load in alive)
        candidates = [load for load in alive if not self.overloaded(load, least)]
        turn = next(self._counter)
        scored = [(self.matched(load.index, keys, now), -load.outstanding, -((i - turn) % len(candidates)), load.index)
                  for i, load in enumerate(candidates)]
        chosen = max(scored)[3]
        expected = self._expected.setdefault(chosen, OrderedDict())
        until = now + self.expect_s
        for key in keys:
            expected[key] = until
            expected.move_to_end(key)
        while len(expected) > self.table_size:
            expected.popitem(last=False)
        return chosen

    def forget(self, replica: int) -> None:
        self._caches.pop(replica, None)
        self._expected.pop(replica, None)
