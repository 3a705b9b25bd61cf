"""The "cache" routing policy (serving/cache_routing.py): pure, fed a KV-cache event
stream recorded from the real CPU engine (tests/data/record_kv_events.py) and
hand-made streams; then the pool's side (events drained, fallback, tokenising once)
with fake replicas."""

import json
import logging
from pathlib import Path

from vllm_dspy_adapter.backends.fake import FakeReplica
from vllm_dspy_adapter.protocol import (BlocksRemoved, BlocksStored, CacheCleared, CacheEventsLost,
                                        GenerationRequest)
from vllm_dspy_adapter.serving.adapter_routing import AdapterRouter
from vllm_dspy_adapter.serving.cache_routing import CacheRouter, ReplicaCache, block_keys
from vllm_dspy_adapter.serving.pool import ReplicaPool
from vllm_dspy_adapter.serving.routing import PrefixRouter, ReplicaLoad, make_router

RECORDED = json.loads((Path(__file__).parent / "data" / "kv_events_smollm.json").read_text())


def decode(event):
    def h(x):
        return x if x is None or isinstance(x, int) else bytes.fromhex(x)

    kind = event["kind"]
    if kind == "stored":
        return BlocksStored(tuple(map(h, event["hashes"])), h(event["parent"]), tuple(event["token_ids"]),
                            event["block_size"], event["adapter"])
    if kind == "removed":
        return BlocksRemoved(tuple(map(h, event["hashes"])))
    return CacheCleared() if kind == "cleared" else CacheEventsLost(event["reason"])


EVENTS = [decode(e) for e in RECORDED["events"]]


def loads(*outstanding):
    return [ReplicaLoad(i, True, o) for i, o in enumerate(outstanding)]


def stored(tokens, block_size=4, parent=None, first_hash=1000, adapter=None):
    """A BlocksStored of whole blocks with made-up vLLM hashes first_hash, first_hash+1, ..."""
    n = len(tokens) // block_size
    return BlocksStored(tuple(range(first_hash, first_hash + n)), parent, tuple(tokens[:n * block_size]), block_size,
                        adapter)


def router(**kwargs):
    return CacheRouter(fallback=PrefixRouter(), **kwargs)


# ------------------------------------------------------------- the recorded stream


def test_recorded_stream_predicts_every_prefix_hit_of_the_engine():
    """Replaying the real engine's events up to each request predicts how many of its
    tokens vLLM served from cache: the shared prefix's two blocks for the second
    question, nothing once the fillers evicted it (the approximate policy would still
    believe it cached)."""
    cache, seen = ReplicaCache(), 0
    hits = []
    for step in RECORDED["steps"]:
        size = cache.block_size or 128
        keys = block_keys(step["prompt_token_ids"], size)
        matched = next((i for i, key in enumerate(keys) if key not in cache), len(keys))
        hits.append((step["label"], matched * size, step["cached_tokens"]))
        for event in EVENTS[seen:step["events_after"]]:
            cache.apply(event)
        seen = step["events_after"]
    assert [predicted for _, predicted, _ in hits] == [actual for _, _, actual in hits], hits
    assert dict((label, actual) for label, _, actual in hits)["shared-b"] == 256
    assert any(isinstance(e, BlocksRemoved) for e in EVENTS)  # the stream does evict
    assert cache.block_size == 128 and cache.orphans == 0


def test_recorded_stream_routes_the_shared_prefix_to_its_replica_until_evicted():
    steps = {s["label"]: s for s in RECORDED["steps"]}
    policy = router()
    policy.observe(1, EVENTS[:steps["shared-a"]["events_after"]])  # replica 1 served shared-a
    assert policy.choose(steps["shared-b"]["prompt_token_ids"], loads(0, 0)) == 1
    evicted = steps["filler-7"]["events_after"]  # ... then the fillers evicted it (shared-c stores it again)
    fresh = router(expect_s=0.0)  # the same, with nothing remembered of its own routing
    fresh.observe(1, EVENTS[:evicted])
    assert fresh.choose(steps["shared-b"]["prompt_token_ids"], loads(0, 10)) == 0  # no hit left: load decides


# --------------------------------------------------------------- hand-made streams


def test_longest_cached_prefix_wins_and_load_guard_moves_it():
    policy = router(balance_ratio=0.5, balance_slack=100)
    prompt = list(range(40))
    policy.observe(0, [stored(prompt[:8])])
    policy.observe(1, [stored(prompt[:24], first_hash=2000)])
    assert policy.choose(prompt, loads(0, 0), ) == 1  # six blocks beat two
    assert policy.choose(prompt, loads(0, 50)) == 1  # a little busier still wins
    assert policy.choose(prompt, loads(0, 1000)) == 0  # well above the least loaded: load wins


def test_among_equal_holders_the_least_loaded_serves():
    policy = router(expect_s=0.0)
    prompt = list(range(16))
    for replica in (0, 1, 2):
        policy.observe(replica, [stored(prompt, first_hash=100 * replica)])
    assert policy.choose(prompt, loads(30, 10, 20)) == 1


def test_removed_blocks_stop_matching_and_a_chain_breaks_at_the_first_missing_block():
    policy = router(expect_s=0.0)
    prompt = list(range(16))  # four blocks of four, hashes 1000..1003
    policy.observe(1, [stored(prompt)])
    assert policy.matched(1, block_keys(prompt, 4), now=0.0) == 4
    policy.observe(1, [BlocksRemoved((1001,))])
    assert policy.matched(1, block_keys(prompt, 4), now=0.0) == 1
    policy.observe(1, [CacheCleared()])
    assert policy.matched(1, block_keys(prompt, 4), now=0.0) == 0


def test_blocks_stored_after_a_parent_chain_on_it():
    policy = router(expect_s=0.0)
    prompt = list(range(16))
    policy.observe(0, [stored(prompt[:8]), stored(prompt[8:], parent=1001, first_hash=5000)])
    assert policy.matched(0, block_keys(prompt, 4), now=0.0) == 4


def test_lost_events_forget_what_was_known():
    policy = router(expect_s=0.0)
    prompt = list(range(16))
    policy.observe(0, [stored(prompt)])
    policy.observe(0, [CacheEventsLost("a gap")])
    assert policy.matched(0, block_keys(prompt, 4), now=0.0) == 0


def test_an_adapters_blocks_never_match_the_base_model():
    policy = router(expect_s=0.0)
    prompt = list(range(16))
    policy.observe(0, [stored(prompt, adapter="a")])
    assert policy.matched(0, block_keys(prompt, 4), now=0.0) == 0
    assert policy.matched(0, block_keys(prompt, 4, adapter="a"), now=0.0) == 4


def test_a_burst_before_any_event_keeps_each_prefix_on_one_replica():
    """All of a burst is routed before the first event: what was sent counts as held."""
    policy = router(block_size=4)
    prefixes = [[1000 * g + i for i in range(32)] for g in range(4)]
    chosen: dict[int, set[int]] = {}
    outstanding = [0, 0]
    for question in range(8):
        for g, prefix in enumerate(prefixes):
            replica = policy.choose(prefix + [question, question + 1], loads(*outstanding))
            outstanding[replica] += 10
            chosen.setdefault(g, set()).add(replica)
    assert all(len(replicas) == 1 for replicas in chosen.values()), chosen
    assert {next(iter(r)) for r in chosen.values()} == {0, 1}  # and the groups spread


def test_what_was_sent_expires_without_a_confirming_event():
    now = [0.0]
    policy = router(block_size=4, expect_s=5.0, clock=lambda: now[0])
    prompt = list(range(16))
    assert policy.choose(prompt, loads(0, 0)) == 0
    assert policy.matched(0, block_keys(prompt, 4), now=1.0) == 4
    assert policy.matched(0, block_keys(prompt, 4), now=6.0) == 0


def test_text_prompts_go_to_the_fallback_and_make_router_knows_cache():
    policy = make_router("cache")
    assert policy.name == "cache" and policy.fallback().name == "prefix"
    assert policy.choose("a text prompt with an image", loads(0, 0)) in (0, 1)


def test_adapter_router_passes_the_adapter_not_a_salted_prompt():
    policy = AdapterRouter(router(expect_s=0.0), max_loras=4)
    assert policy.wants_cache_events and policy.wants_token_ids
    prompt = list(range(16))
    policy.observe(1, [stored(prompt, adapter="a")])
    assert policy.choose(prompt, loads(0, 0), adapter="a") == 1
    assert policy.fallback().base.name == "prefix"


# --------------------------------------------------------------------- the pool


def fake_pool(router, replicas=2, tokenize=None):
    made = [FakeReplica(i, lambda r, c: None) for i in range(replicas)]
    return ReplicaPool(made, router, health_timeout=None, tokenize=tokenize), made


def test_pool_falls_back_to_prefix_where_replicas_report_no_events(caplog):
    with caplog.at_level(logging.WARNING, logger="vllm_dspy_adapter.serving.pool"):
        pool, _ = fake_pool(make_router("cache"), tokenize=lambda text, chat: [1, 2])
    assert pool.router.name == "prefix"
    assert [r.getMessage() for r in caplog.records if "cannot report KV-cache events" in r.getMessage()]


def test_pool_tokenises_once_and_routes_by_the_events_it_drains():
    calls = []

    def tokenize(text, chat):
        calls.append(text)
        return [ord(c) for c in text]

    replicas = [FakeReplica(i, lambda r, c: None) for i in range(2)]
    text = "abcdefghijklmnop"
    replicas[1].report_cache_events([stored([ord(c) for c in text])])
    replicas[0].report_cache_events([])
    pool = ReplicaPool(replicas, make_router("cache"), health_timeout=None, tokenize=tokenize)
    assert pool.router.name == "cache"
    request = GenerationRequest(prompt=text + "?", chat=True)
    future = pool.submit(request)
    assert replicas[1].requests and not replicas[0].requests  # the replica that holds its blocks
    assert calls == [text + "?"] and request.token_ids == [ord(c) for c in text + "?"]
    replicas[1].finish_all()
    assert future.result(timeout=5).replica == 1
    pool.close()


def test_a_restarted_replica_starts_with_an_empty_cache():
    replica = FakeReplica(0, lambda r, c: None)
    replica.report_cache_events([stored(list(range(8)))])
    replica.crash()
    replica.come_back()
    assert replica.take_cache_events() == [CacheCleared()]
