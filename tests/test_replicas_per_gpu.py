"""Several replicas per GPU (replicas_per_gpu): placement, memory split, start order and
routing. Pure logic with fakes (no GPU on CI); the GPU behaviour is shown by benchmark W5."""

from __future__ import annotations

import concurrent.futures

import pytest

from fakes import SPEC
from vllm_dspy_adapter.backends.fake import FakeBackend
from vllm_dspy_adapter.backends.base import start_all
from vllm_dspy_adapter.errors import ConfigurationError
from vllm_dspy_adapter.backends.placement import (RayNode, number_shares, plan_placement, plan_ray_placement, replica_memory,
                                         split_device)
from vllm_dspy_adapter.serving.pool import ReplicaPool
from vllm_dspy_adapter.protocol import GenerationRequest
from vllm_dspy_adapter.serving.routing import LeastLoadedRouter, PrefixRouter, ReplicaLoad, open_replicas


def plan(**kw):
    base = dict(num_gpus=None, gpus=None, tensor_parallel_size=1, num_replicas=None, available_gpus=2, cpu_count=8)
    base.update(kw)
    return plan_placement(**base)


# ------------------------------------------------------------------ placement


def test_k_replicas_per_gpu_first_ones_on_distinct_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    plans = plan(replicas_per_gpu=2)
    assert [p.device for p in plans] == ["cuda:0#0", "cuda:1#0", "cuda:0#1", "cuda:1#1"]
    assert [p.index for p in plans] == [0, 1, 2, 3]
    assert [p.share for p in plans] == [0, 0, 1, 1]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1", "0", "1"]


def test_one_replica_per_gpu_keeps_plain_device_names():
    assert [p.device for p in plan()] == ["cuda:0", "cuda:1"]
    assert {p.share for p in plan()} == {0}


def test_num_replicas_counts_replicas_k_per_gpu():
    assert [p.device for p in plan(num_replicas=2, replicas_per_gpu=2)] == ["cuda:0#0", "cuda:0#1"]
    assert len(plan(gpus=[1], replicas_per_gpu=3)) == 3


@pytest.mark.parametrize("kw,match", [
    (dict(replicas_per_gpu=0), "replicas_per_gpu must be an int >= 1"),
    (dict(replicas_per_gpu=1.5), "replicas_per_gpu must be an int >= 1"),
    (dict(replicas_per_gpu=2, tensor_parallel_size=2), "cannot be combined with tensor_parallel_size=2"),
    (dict(replicas_per_gpu=2, available_gpus=0, num_replicas=2), "no GPU is visible"),
    (dict(replicas_per_gpu=2, num_replicas=3), "not a multiple of replicas_per_gpu=2"),
    (dict(replicas_per_gpu=2, num_gpus=1, num_replicas=4), "num_replicas=4"),
])
def test_bad_requests_fail_before_anything_starts(kw, match):
    with pytest.raises(ConfigurationError, match=match):
        plan(**kw)


def test_make_backend_places_on_the_visible_gpus(monkeypatch):
    from vllm_dspy_adapter import backends

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(backends, "visible_gpu_count", lambda: 1)
    backend = backends.make_backend("local", replicas_per_gpu=3)
    assert [p.device for p in backend.placements] == ["cuda:0#0", "cuda:0#1", "cuda:0#2"]


def test_ray_plan_asks_for_a_fraction_of_a_gpu():
    nodes = [RayNode("a" * 8, "10.0.0.1", cpus=16, gpus=2), RayNode("b" * 8, "10.0.0.2", cpus=16, gpus=1)]
    ray_plan = plan_ray_placement(num_gpus=None, gpus=None, tensor_parallel_size=1, num_replicas=None, nodes=nodes,
                                  replicas_per_gpu=2)
    assert (ray_plan.count, ray_plan.gpus_per_replica, ray_plan.replicas_per_gpu) == (6, 0.5, 2)
    assert ray_plan.bundle == {"GPU": 0.5}
    assert plan_ray_placement(num_gpus=None, gpus=None, tensor_parallel_size=1, num_replicas=4, nodes=nodes,
                              replicas_per_gpu=2).count == 4
    with pytest.raises(ConfigurationError, match="no GPU"):
        plan_ray_placement(num_gpus=None, gpus=None, tensor_parallel_size=1, num_replicas=2,
                           nodes=[RayNode("c" * 8, "10.0.0.3", cpus=8, gpus=0)], replicas_per_gpu=2)


def test_device_names():
    assert split_device("cuda:0#1") == ("cuda:0", 1)
    assert split_device("cuda:0,1") == ("cuda:0,1", 0)
    assert split_device("node:10.0.0.1/gpu:3#2") == ("node:10.0.0.1/gpu:3", 2)
    assert number_shares(["g:0", "g:1", "g:0", "g:2", "g:0"]) == ["g:0#0", "g:1", "g:0#1", "g:2", "g:0#2"]


# --------------------------------------------------------------------- memory


def test_each_replica_gets_its_share_of_the_total():
    assert replica_memory(None, 3) == 0.3  # vLLM's default 0.9 in all
    assert replica_memory(0.8, 2) == 0.4
    assert replica_memory(0.9, 1) == 0.9


def test_a_share_too_small_for_the_model_is_refused_naming_the_fix():
    gib = 2**30
    # 141 GiB GPU, an 8B model (15.3 GiB) at 8 replicas: 0.1125 x 141 = 15.9 GiB < 15.3 + 1.5 + KV.
    with pytest.raises(ConfigurationError) as info:
        replica_memory(0.9, 8, gpu_bytes=141 * gib, model_bytes=int(15.3 * gib), min_kv_bytes=int(0.6 * gib))
    text = str(info.value)
    assert "replicas_per_gpu=8" in text and "fewer replicas per GPU" in text and "gpu_memory_utilization" in text
    # The same model fits at 2 per GPU; a 0.6B model (1.1 GiB) fits at 8.
    assert replica_memory(0.9, 2, gpu_bytes=141 * gib, model_bytes=int(15.3 * gib)) == 0.45
    assert replica_memory(0.9, 8, gpu_bytes=141 * gib, model_bytes=int(1.1 * gib)) == 0.1125
    with pytest.raises(ConfigurationError, match="too little for any model"):
        replica_memory(0.9, 64)
    with pytest.raises(ConfigurationError, match=r"must be in \(0, 1\]"):
        replica_memory(1.5, 2)


def test_a_gpu_replica_count_on_a_cpu_machine_is_refused_before_any_start(monkeypatch):
    from vllm_dspy_adapter import backends, vLLMOfflineMultiGPU

    monkeypatch.setattr(backends, "visible_gpu_count", lambda: 0)
    with pytest.raises(ConfigurationError, match="no GPU is visible"):
        vLLMOfflineMultiGPU(model="/nonexistent", replicas_per_gpu=2)


# ------------------------------------------------------------------ start order


def test_replicas_sharing_a_gpu_start_share_by_share():
    class R:
        def __init__(self, index, share):
            self.index, self.share, self.name = index, share, f"r{index}"

        def _kill(self):
            pass

    events = []
    replicas = [R(0, 0), R(1, 0), R(2, 1), R(3, 1)]
    start_all(replicas, lambda r: events.append(("launch", r.index)), lambda r: events.append(("ready", r.index)),
              wave=lambda r: r.share)
    # Both GPUs' first replicas load in parallel; the second ones launch only once those are ready.
    assert events == [("launch", 0), ("launch", 1), ("ready", 0), ("ready", 1),
                      ("launch", 2), ("launch", 3), ("ready", 2), ("ready", 3)]


# --------------------------------------------------------------------- routing


def loads(*rows):
    """rows of (share, in_flight[, alive])"""
    return [ReplicaLoad(i, row[2] if len(row) > 2 else True, row[1] * 100, row[1], row[0])
            for i, row in enumerate(rows)]


def test_open_replicas_fills_one_engine_per_gpu_first():
    # Two GPUs x two replicas (shares 0, 0, 1, 1): few in flight -> only the first of each GPU.
    assert [l.index for l in open_replicas(loads((0, 3), (0, 10), (1, 0), (1, 0)), spill_at=256)] == [0, 1]
    # One first replica below the mark keeps the second ones closed: an idle GPU is served first.
    assert [l.index for l in open_replicas(loads((0, 300), (0, 10), (1, 0), (1, 0)), spill_at=256)] == [0, 1]
    # Every first replica at the mark: all open, the policy spreads over all.
    assert [l.index for l in open_replicas(loads((0, 256), (0, 300), (1, 0), (1, 5)), spill_at=256)] == [0, 1, 2, 3]


def test_open_replicas_skips_dead_ones_and_plain_pools_are_unchanged():
    assert [l.index for l in open_replicas(loads((0, 0, False), (1, 0), (1, 0)))] == [1, 2]
    assert [l.index for l in open_replicas(loads((0, 0), (0, 999), (0, 5)))] == [0, 1, 2]
    assert open_replicas(loads((0, 0, False), (1, 0, False))) == []


def request(text: str) -> GenerationRequest:
    return GenerationRequest(prompt=text, sampling={"max_tokens": 4})


def pool_of(devices, router, spill_at):
    backend = FakeBackend(replicas=len(devices))
    pool = ReplicaPool.start(backend, SPEC, router, max_restarts=0, health_timeout=None, spill_at=spill_at)
    for replica, device in zip(backend.replicas, devices):
        replica.device, replica.share = device, split_device(device)[1]
    return pool, backend.replicas


def test_pool_spills_to_a_gpus_second_replica_only_past_the_mark():
    pool, (first, second) = pool_of(["cuda:0#0", "cuda:0#1"], LeastLoadedRouter(), spill_at=3)
    try:
        futures = [pool.submit(request(f"q{i}")) for i in range(3)]
        assert (len(first.requests), len(second.requests)) == (3, 0)  # below the mark: one engine
        futures += [pool.submit(request(f"q{i}")) for i in range(3, 7)]
        # Past it, both are open and the policy balances them.
        assert (len(first.requests), len(second.requests)) in ((4, 3), (3, 4))
        first.finish_all()
        second.finish_all()
        concurrent.futures.wait(futures, timeout=5)
        assert all(f.result().text.startswith("echo:") for f in futures)
        futures = [pool.submit(request(f"r{i}")) for i in range(2)]
        assert (len(first.requests), len(second.requests)) == (2, 0)  # quiet again: back to one
    finally:
        pool.close()


def test_prefix_affinity_holds_with_replicas_sharing_gpus():
    pool, replicas = pool_of(["cuda:0#0", "cuda:1#0", "cuda:0#1", "cuda:1#1"], PrefixRouter(block_chars=16),
                             spill_at=256)
    try:
        shared_a = "Alpha: the instructions and demos of one candidate. " * 2
        shared_b = "Bravo: another candidate's own instructions, demos. " * 2
        for i in range(6):
            pool.submit(request(shared_a + f"question {i}"))
            pool.submit(request(shared_b + f"question {i}"))
        held = [len(r.requests) for r in replicas]
        # Each prefix stays on one replica; the two go to distinct GPUs; no second replica is used.
        assert sorted(held) == [0, 0, 6, 6] and held[2:] == [0, 0]
    finally:
        pool.close()


def test_stats_has_one_row_per_replica_with_its_share_in_the_device():
    pool, _ = pool_of(["cuda:0#0", "cuda:1#0", "cuda:0#1", "cuda:1#1"], LeastLoadedRouter(), spill_at=256)
    try:
        assert [(row["replica"], row["device"]) for row in pool.stats()] == [
            (0, "cuda:0#0"), (1, "cuda:1#0"), (2, "cuda:0#1"), (3, "cuda:1#1")]
    finally:
        pool.close()


def test_the_lm_splits_the_users_total_and_checks_the_model_from_its_config(tmp_path, monkeypatch):
    import json

    from vllm_dspy_adapter.backends import placement
    from vllm_dspy_adapter.models import estimate_memory

    qwen3_8b = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(qwen3_8b))
    weights, kv_per_token = estimate_memory(str(tmp_path))
    assert round(weights / 2 / 1e9, 2) == 8.19 and kv_per_token == 2 * 36 * 8 * 128 * 2  # Qwen3-8B: 8.19B params
    monkeypatch.setattr(placement, "gpu_memory_bytes", lambda: 141 * 2**30)
    assert placement.replica_share(str(tmp_path), 0.8, 2, {"max_model_len": 4096}) == 0.4
    with pytest.raises(ConfigurationError, match="replicas_per_gpu=8"):
        placement.replica_share(str(tmp_path), None, 8, {"max_model_len": 4096})
