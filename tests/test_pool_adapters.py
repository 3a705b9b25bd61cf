"""The pool's adapter logic on fake replicas (no vLLM): all-or-none loading,
requests only to holders, fail fast for unknown adapters, reload after restart."""

from __future__ import annotations

import pytest

from conftest import wait_for
from fakes import FakeReplica
from vllm_dspy_adapter.serving.adapter_routing import AdapterRouter
from vllm_dspy_adapter.errors import ConfigurationError, NoHealthyReplicaError
from vllm_dspy_adapter.lora.registry import AdapterSpec
from vllm_dspy_adapter.serving.pool import ReplicaPool
from vllm_dspy_adapter.protocol import GenerationRequest

ADAPTER = AdapterSpec(name="tone", path="/adapters/tone", lora_id=1, rank=8, digest="ab" * 32)


class LoRAFakeReplica(FakeReplica):
    def __init__(self, index, on_death, refuse: bool = False):
        super().__init__(index, on_death)
        self.refuse = refuse
        self.calls: list[tuple[str, str]] = []

    def _adapter_call(self, op, payload, timeout):
        name = payload.name if op == "add" else payload
        self.calls.append((op, name))
        if op == "add":
            self.last_added = payload
        if op == "add" and self.refuse:
            raise ConfigurationError(f"vLLM refused adapter {name!r}")


def make_pool(n=3, refuse=(), restart=False):
    pools: list[ReplicaPool] = []
    replicas = [LoRAFakeReplica(i, lambda r, c: pools[0].replica_died(r, c), refuse=i in refuse) for i in range(n)]
    pool = ReplicaPool(replicas, AdapterRouter("least_loaded", max_loras=1),
                       restart=(lambda r: r.come_back()) if restart else None, health_timeout=None)
    pools.append(pool)
    return pool, replicas


def submit(pool, adapter=None, n=1):
    return [pool.submit(GenerationRequest(prompt=f"p{i}", adapter=adapter)) for i in range(n)]


def test_an_adapter_is_loaded_on_every_replica_or_on_none():
    pool, replicas = make_pool(refuse={1})
    with pytest.raises(ConfigurationError, match=r"'tone' was not loaded \(on no replica\).*fake:1"):
        pool.load_adapter(ADAPTER, timeout=5)
    assert all(not r.adapters for r in replicas)
    assert ("remove", "tone") in replicas[0].calls and ("remove", "tone") in replicas[2].calls  # rolled back
    assert "tone" not in pool.adapters
    [future] = submit(pool, "tone")
    with pytest.raises(ConfigurationError, match="No adapter named 'tone' is loaded"):
        future.result(timeout=1)


def test_adapter_requests_go_only_to_replicas_that_hold_it():
    pool, replicas = make_pool()
    pool.load_adapter(ADAPTER, timeout=5)
    assert all(r.adapters == {"tone"} for r in replicas)
    replicas[2].crash()
    replicas[2].come_back()  # a new engine, no adapters yet (no restart hook here)
    assert replicas[2].adapters == frozenset()
    submit(pool, "tone", n=8)
    assert not replicas[2].requests and len(replicas[0].requests) + len(replicas[1].requests) == 8
    submit(pool, None, n=6)  # the base model goes anywhere, replica 2 included
    assert replicas[2].requests
    for replica in replicas[:2]:
        replica.crash()
    [future] = submit(pool, "tone")
    with pytest.raises(NoHealthyReplicaError, match="No live replica holds adapter 'tone'"):
        future.result(timeout=1)


def test_a_restarted_replica_gets_every_adapter_again():
    pool, replicas = make_pool(n=2, restart=True)
    pool.load_adapter(ADAPTER, timeout=5)
    replicas[1].crash("engine died")
    assert wait_for(lambda: replicas[1].alive and replicas[1].adapters == {"tone"}, 5, interval=0.01)
    assert replicas[1].calls.count(("add", "tone")) == 2


def test_unload_removes_it_everywhere_and_later_requests_fail_fast():
    pool, replicas = make_pool()
    pool.load_adapter(ADAPTER, timeout=5)
    submit(pool, "tone", n=3)
    assert any(pool.router.resident(i) == ["tone"] for i in range(3))
    pool.unload_adapter("tone")
    assert all(not r.adapters and ("remove", "tone") in r.calls for r in replicas)
    assert all(pool.router.resident(i) == [] for i in range(3))
    with pytest.raises(ConfigurationError):
        pool.unload_adapter("tone")
    [future] = submit(pool, "tone")
    assert isinstance(future.exception(timeout=1), ConfigurationError)


def test_a_failed_replacement_leaves_the_old_version_everywhere():
    import dataclasses

    pool, replicas = make_pool()
    pool.load_adapter(ADAPTER, timeout=5)
    replicas[2].refuse = True
    newer = dataclasses.replace(ADAPTER, lora_id=2, digest="cd" * 32)
    with pytest.raises(ConfigurationError, match="fake:2"):
        pool.load_adapter(newer, timeout=5)
    assert pool.adapters.get("tone") is ADAPTER
    assert replicas[0].calls.count(("add", "tone")) == 3 and replicas[0].last_added is ADAPTER  # put back
    assert all(r.adapters == {"tone"} for r in replicas)


# ------------------------------------- the process backend's adapter call, on FakeWorkers


def process_pool(n=2):
    from fakes import SPEC, FakeLauncher, placements
    from vllm_dspy_adapter.backends.process import ProcessBackend

    launcher = FakeLauncher()
    backend = ProcessBackend(placements(n), start_timeout=5, launch=launcher, heartbeat_s=0.05)
    return ReplicaPool.start(backend, SPEC, AdapterRouter("least_loaded", max_loras=1), health_timeout=None), launcher


def test_process_replicas_load_over_the_pipe_and_a_refusal_comes_back_as_the_error():
    pool, launcher = process_pool()
    try:
        pool.load_adapter(ADAPTER, timeout=5)
        assert all(r.adapters == {"tone"} for r in pool.replicas)
        assert launcher.current(1).adapter_calls == [("add", ADAPTER)]  # the spec crossed the pipe intact
        launcher.current(1).adapter_error = ConfigurationError("vLLM refused adapter 'b'")
        with pytest.raises(ConfigurationError, match="replica-1.*vLLM refused adapter 'b'"):
            pool.load_adapter(AdapterSpec("b", "/b", 2, 8, "00"), timeout=5)
        assert launcher.current(0).adapter_calls[-1] == ("remove", "b")  # rolled back on replica 0
        stats = [r.stats(timeout=2) for r in pool.replicas]  # stats still matched by id after adapter calls
        assert all("requests" in s for s in stats)
    finally:
        for replica in pool.replicas:
            replica.shutdown(timeout=2)


def test_a_worker_that_does_not_answer_an_adapter_call_fails_it_within_the_timeout():
    import time

    from vllm_dspy_adapter.errors import ReplicaDeadError

    pool, launcher = process_pool(n=1)
    try:
        launcher.current(0).mode = "hold"
        started = time.monotonic()
        with pytest.raises(ReplicaDeadError, match="no reply to the adapter add within 0.5 s"):
            pool.replicas[0].add_adapter(ADAPTER, timeout=0.5)
        assert time.monotonic() - started < 3
        assert pool.replicas[0].adapters == frozenset()
    finally:
        pool.replicas[0].shutdown(timeout=2)


def test_a_restarted_process_replica_gets_the_adapter_again():
    pool, launcher = process_pool(n=2)
    try:
        pool.load_adapter(ADAPTER, timeout=5)
        first = launcher.current(1)
        first.stop("killed")  # the worker exits: death path, background restart
        assert wait_for(lambda: launcher.current(1) is not first and pool.replicas[1].alive, 10, interval=0.01)
        assert wait_for(lambda: pool.replicas[1].adapters == {"tone"}, 5, interval=0.01)
        assert launcher.current(1).adapter_calls == [("add", ADAPTER)]
    finally:
        for replica in pool.replicas:
            replica.shutdown(timeout=2)


def test_an_answer_of_another_model_is_never_handed_back():
    # Defence in depth for issue 22: a replica whose engine ran a request with another
    # adapter than the one asked (or the base) has its answer dropped, with a clear error.
    pool, replicas = make_pool(1)
    pool.load_adapter(ADAPTER)
    [future] = submit(pool, adapter="tone")
    replica = replicas[0]
    (request_id, request), = replica.requests.items()
    replica.requests.clear()
    replica.reply_from(replica.incarnation, request_id, GenerationRequest(prompt=request.prompt))  # the base ran it
    with pytest.raises(ConfigurationError, match="ran a request for adapter 'tone' with None"):
        future.result(timeout=5)


def test_a_retired_adapter_is_unloaded_only_once_no_request_holds_it():
    import concurrent.futures

    pool, replicas = make_pool(n=2)
    pool.load_adapter(ADAPTER, timeout=5)
    held = submit(pool, "tone", n=2)
    assert pool.adapter_users("tone") == 2
    assert pool.retire_adapter("tone", timeout=0.2) is False  # still held at the deadline: left loaded
    assert "tone" in pool.adapters and not any(("remove", "tone") in r.calls for r in replicas)
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        retiring = executor.submit(pool.retire_adapter, "tone", 10.0)
        assert not retiring.done()
        for replica in replicas:
            replica.finish_all()
        assert retiring.result(timeout=10) is True
    assert all(f.result(timeout=1).adapter == "tone" for f in held)  # the held requests finished with it
    assert pool.adapter_users("tone") == 0 and "tone" not in pool.adapters
    assert all(("remove", "tone") in r.calls for r in replicas)
    [late] = submit(pool, "tone")
    with pytest.raises(ConfigurationError, match="No adapter named 'tone'"):
        late.result(timeout=1)
