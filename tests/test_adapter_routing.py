"""Adapter-aware routing (adapter_routing.py): pure, fake loads, no engine."""

import random
from collections import OrderedDict

import pytest

from vllm_dspy_adapter.serving.adapter_routing import AdapterRouter
from vllm_dspy_adapter.serving.routing import LeastLoadedRouter, ReplicaLoad


def loads(*outstanding, dead=()):
    return [ReplicaLoad(i, i not in dead, o) for i, o in enumerate(outstanding)]


def test_requests_without_adapter_follow_the_base_policy():
    router = AdapterRouter("round_robin", max_loras=1)
    assert [router.choose("p", loads(0, 0, 0)) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert all(router.resident(i) == [] for i in range(3))


def test_an_adapter_sticks_to_the_replica_where_it_is_resident():
    router = AdapterRouter("least_loaded", max_loras=1)
    placed = {name: router.choose(f"{name} q0", loads(0, 0, 0, 0), adapter=name) for name in "abcd"}
    # Four adapters, four replicas with one slot each: one adapter per replica.
    assert sorted(placed.values()) == [0, 1, 2, 3]
    for i in range(1, 30):
        name = "abcd"[i % 4]
        # Equal moderate load everywhere: residency decides.
        assert router.choose(f"{name} q{i}", loads(500, 500, 500, 500), adapter=name) == placed[name]
    assert {i: router.resident(i) for i in range(4)} == {placed[n]: [n] for n in "abcd"}


def test_more_adapters_than_slots_pack_per_replica():
    router = AdapterRouter("least_loaded", max_loras=2)
    for name in "abcd":  # 4 adapters, 2 replicas x 2 slots
        router.choose("x", loads(0, 0), adapter=name)
    assert sorted(router.resident(0) + router.resident(1)) == list("abcd")
    assert len(router.resident(0)) == len(router.resident(1)) == 2


def test_an_overloaded_holder_spills_to_the_least_loaded_replica_and_the_adapter_spreads():
    router = AdapterRouter("least_loaded", max_loras=1, balance_ratio=0.5, balance_slack=100)
    for name in "abc":
        router.choose("x", loads(0, 0, 0), adapter=name)
    home = next(i for i in range(3) if router.resident(i) == ["a"])
    # Slightly above the least but within the guard: residency wins.
    near = [ReplicaLoad(i, True, 120 if i == home else 50) for i in range(3)]
    assert router.choose("x", near, adapter="a") == home
    busy = [ReplicaLoad(i, True, 10_000 if i == home else 50) for i in range(3)]
    moved = router.choose("x", busy, adapter="a")
    assert moved != home
    assert "a" in router.resident(moved) and "a" in router.resident(home)
    # Now resident on two replicas: the lighter of the two serves it.
    both = [ReplicaLoad(i, True, {home: 300, moved: 200}.get(i, 250)) for i in range(3)]
    assert router.choose("x", both, adapter="a") == moved


def test_a_dead_replica_is_forgotten_and_its_adapters_move():
    router = AdapterRouter("least_loaded", max_loras=1)
    for name in "ab":
        router.choose("x", loads(0, 0), adapter=name)
    home = 0 if router.resident(0) == ["a"] else 1
    router.forget(home)
    assert router.resident(home) == []
    other = 1 - home
    assert router.choose("x", loads(0, 0, dead={home}), adapter="a") == other
    assert router.resident(other)[-1] == "a"


def test_dropped_adapter_leaves_every_replica():
    router = AdapterRouter("least_loaded", max_loras=2)
    for name in "abc":
        router.choose("x", loads(0, 0), adapter=name)
    router.drop("a")
    assert all("a" not in router.resident(i) for i in range(2))


def test_within_max_loras_the_base_policy_decides_alone():
    router = AdapterRouter("round_robin", max_loras=4)
    chosen = [router.choose("x", loads(0, 0), adapter="a") for _ in range(4)]
    assert chosen == [0, 1, 0, 1]  # no residency pinning: every replica can hold every adapter


def test_prefix_affinity_is_per_adapter():
    # The same long prompt under two adapters is two prefixes (vLLM hashes the adapter into blocks):
    # with slots for both everywhere, the prefix table must not glue the second adapter to the first's replica.
    router = AdapterRouter("prefix", max_loras=2)
    system = "You are a grader. " * 60
    first_a = router.choose(system + "q", loads(0, 0), adapter="a")
    first_b = router.choose(system + "q", loads(5000, 0) if first_a == 0 else loads(0, 5000), adapter="b")
    assert first_b != first_a
    # Each keeps its own replica for later calls of the same prompt.
    assert router.choose(system + "q2", loads(100, 100), adapter="a") == first_a
    assert router.choose(system + "q2", loads(100, 100), adapter="b") == first_b


def test_no_alive_replica_is_an_error():
    with pytest.raises(ValueError):
        AdapterRouter(max_loras=1).choose("p", loads(0, dead={0}), adapter="a")
    with pytest.raises(ValueError):
        AdapterRouter(max_loras=0)


def _simulate(router, replicas, max_loras, adapters, requests, seed=0):
    """Replay a request stream against vLLM's LRU slot behaviour; count the swaps
    (a request whose adapter is not in its replica's slots) and the per-replica load."""
    rng = random.Random(seed)
    slots = [OrderedDict() for _ in range(replicas)]
    outstanding = [0] * replicas
    swaps = 0
    for _ in range(requests):
        adapter = rng.choice(adapters)
        state = [ReplicaLoad(i, True, outstanding[i]) for i in range(replicas)]
        if isinstance(router, AdapterRouter):
            index = router.choose("q", state, adapter=adapter)
        else:
            index = router.choose("q", state)
        if adapter not in slots[index]:
            swaps += 1
            slots[index][adapter] = None
            while len(slots[index]) > max_loras:
                slots[index].popitem(last=False)
        slots[index].move_to_end(adapter)
        outstanding[index] += 256
        outstanding = [max(0, o - 200) for o in outstanding]  # work drains as it is served
    return swaps, outstanding


def test_adapter_routing_swaps_far_less_than_load_only_routing():
    adapters = [f"lora{i}" for i in range(16)]
    aware_swaps, aware_load = _simulate(AdapterRouter("least_loaded", max_loras=4), 4, 4, adapters, 2000)
    blind_swaps, _ = _simulate(LeastLoadedRouter(), 4, 4, adapters, 2000)
    assert blind_swaps > 1000  # load-only routing swaps on most requests
    assert aware_swaps < blind_swaps / 5
    # ... and the load stays balanced: no replica holds much more work than the drain allows.
    assert max(aware_load) < 4000
