"""Routing policies (router.py): pure, no engine."""

import pytest

from vllm_dspy_adapter.serving.routing import (
    LeastLoadedRouter,
    PrefixRouter,
    ReplicaLoad,
    RoundRobinRouter,
    make_router,
    prefix_hashes,
)


def loads(*outstanding, dead=()):
    return [ReplicaLoad(i, i not in dead, o) for i, o in enumerate(outstanding)]


def test_round_robin_cycles_over_alive_replicas():
    router = RoundRobinRouter()
    assert [router.choose("p", loads(0, 0, 0)) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert {router.choose("p", loads(0, 0, 0, dead={1})) for _ in range(4)} == {0, 2}


def test_least_loaded_counts_outstanding_tokens_not_requests():
    router = LeastLoadedRouter()
    busy_with_one_long = [ReplicaLoad(0, True, 2000, in_flight=1), ReplicaLoad(1, True, 300, in_flight=5)]
    assert router.choose("p", busy_with_one_long) == 1


def test_least_loaded_rotates_ties_and_skips_dead():
    router = LeastLoadedRouter()
    assert sorted(router.choose("p", loads(0, 0)) for _ in range(2)) == [0, 1]
    assert router.choose("p", loads(0, 0, dead={0})) == 1


def test_no_alive_replica_is_an_error():
    with pytest.raises(ValueError):
        LeastLoadedRouter().choose("p", loads(0, dead={0}))


SYSTEM_A = "You are a grader. " * 60  # about 1 kB of shared instructions
SYSTEM_B = "You are a poet. " * 60


def test_prefix_router_keeps_a_shared_prefix_on_one_replica():
    router = PrefixRouter()
    first = router.choose(SYSTEM_A + "question 0", loads(0, 0, 0, 0))
    for i in range(1, 20):
        assert router.choose(SYSTEM_A + f"question {i}", loads(100, 100, 100, 100)) == first


def test_prefix_router_spreads_different_prefixes():
    router = PrefixRouter()
    a = router.choose(SYSTEM_A + "q", loads(0, 0))
    b = router.choose(SYSTEM_B + "q", loads(300, 0) if a == 0 else loads(0, 300))
    assert a != b


def test_prefix_router_yields_to_load_when_the_owner_is_well_above_the_others():
    router = PrefixRouter(balance_ratio=0.5, balance_slack=1000)
    owner = router.choose(SYSTEM_A + "q0", loads(0, 0))
    heavy = [ReplicaLoad(owner, True, 50_000), ReplicaLoad(1 - owner, True, 100)]
    assert router.choose(SYSTEM_A + "q1", sorted(heavy, key=lambda l: l.index)) == 1 - owner
    # moderately above is still fine: the cache hit is worth more
    mild = [ReplicaLoad(owner, True, 1200), ReplicaLoad(1 - owner, True, 900)]
    assert router.choose(SYSTEM_A + "q2", sorted(mild, key=lambda l: l.index)) == 1 - owner  # prefix moved with q1


def test_prefix_router_forgets_a_dead_replica():
    router = PrefixRouter()
    owner = router.choose(SYSTEM_A + "q0", loads(0, 0))
    router.forget(owner)
    other = router.choose(SYSTEM_A + "q1", loads(0, 0, dead={owner}))
    assert other != owner


def test_prefix_hashes_share_leading_blocks_only():
    a = prefix_hashes("x" * 1000 + "tail-a", 256, 100)
    b = prefix_hashes("x" * 1000 + "tail-b", 256, 100)
    c = prefix_hashes("y" + "x" * 999, 256, 100)
    assert a == b and len(a) == 3
    assert not set(a) & set(c)
    tokens = prefix_hashes(list(range(600)), 256, 100)
    assert len(tokens) == 2


def test_make_router_names_the_choices():
    assert make_router("prefix").name == "prefix"
    with pytest.raises(ValueError, match="least_loaded"):
        make_router("random")
