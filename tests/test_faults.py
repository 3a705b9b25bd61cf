"""The replica layer's faults, in seconds: the real pool, the real ProcessReplica
and its reader thread, driven against fake workers (threads on real pipes) and
fake replicas. No vLLM here; the end-to-end versions are in test_stall.py and
test_multigpu.py."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from conftest import wait_for
from fakes import SPEC, FakeLauncher, placements
from vllm_dspy_adapter.backends.fake import FakeBackend
from vllm_dspy_adapter.backends.process import ProcessBackend
from vllm_dspy_adapter.errors import LMClosedError, NoHealthyReplicaError, ReplicaDeadError, ReplicaStartError
from vllm_dspy_adapter.serving.pool import ReplicaPool
from vllm_dspy_adapter.protocol import Backend, GenerationRequest, Replica
from vllm_dspy_adapter.serving.routing import RoundRobinRouter

HEARTBEAT = 0.05


def wait_until(predicate, timeout=5.0):
    return wait_for(predicate, timeout, interval=0.01)


def start(n=2, *, launcher=None, health_timeout=None, max_restarts=3, restart=True):
    """A real pool over real ProcessReplicas whose workers are FakeWorkers."""
    launcher = launcher or FakeLauncher()
    backend = ProcessBackend(placements(n), start_timeout=5, launch=launcher, heartbeat_s=HEARTBEAT)
    pool = _made(ReplicaPool.start(backend, SPEC, RoundRobinRouter(), max_restarts=max_restarts if restart else 0,
                                   health_timeout=health_timeout))
    return pool, launcher


def request(i: int) -> GenerationRequest:
    return GenerationRequest(prompt=f"prompt {i}", sampling={"max_tokens": 4})


def results(futures, timeout=5.0):
    return [f.result(timeout=timeout) for f in futures]


_MADE: list[ReplicaPool] = []


def _made(pool: ReplicaPool) -> ReplicaPool:
    _MADE.append(pool)
    return pool


@pytest.fixture(autouse=True)
def _shutdown_pools():
    yield
    while _MADE:
        pool = _MADE.pop()
        pool.close()
        for replica in pool.replicas:
            replica.shutdown(timeout=2)


def test_the_real_handles_and_backend_meet_the_contract():
    pool, _ = start(1)
    assert isinstance(pool.replicas[0], Replica)
    assert isinstance(ProcessBackend(placements(1), 5), Backend)


def test_requests_are_answered_in_order_over_both_replicas():
    pool, _ = start(2)
    outs = results([pool.submit(request(i)) for i in range(50)])
    assert [o.text for o in outs] == [f"echo:prompt {i}" for i in range(50)]
    assert {o.replica for o in outs} == {0, 1}


def test_concurrent_stats_from_32_threads_during_a_batch():
    pool, launcher = start(2)
    for i in (0, 1):
        launcher.current(i).stats_delay = 0.01  # replies cross each other on the pipe
    futures = [pool.submit(request(i)) for i in range(200)]
    errors, seen = [], []

    def poll():
        try:
            for _ in range(5):
                seen.append(pool.stats())
        except Exception as exc:  # any exception is the bug this test is about
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert len(seen) == 160 and all(len(s) == 2 and all("requests" in r for r in s) for s in seen)
    assert len(results(futures)) == 200
    assert all(r.alive for r in pool.replicas)
    assert len(results([pool.submit(request(i)) for i in range(10)])) == 10  # the readers still run


def test_a_stats_reply_after_its_timeout_is_dropped_and_the_replica_keeps_serving():
    pool, launcher = start(1)
    launcher.current(0).stats_delay = 0.5
    late = pool.replicas[0].stats(timeout=0.1)
    assert "no reply" in late["stats_error"]
    time.sleep(0.7)  # the late reply arrives and finds no waiter
    launcher.current(0).stats_delay = 0.0
    assert pool.replicas[0].stats(timeout=2)["requests"] == 0
    assert results([pool.submit(request(1))])[0].text == "echo:prompt 1"
    assert pool.replicas[0].alive


def test_a_duplicate_reply_is_dropped():
    pool, launcher = start(1)
    launcher.current(0).mode = "duplicate"
    outs = results([pool.submit(request(i)) for i in range(20)])
    assert [o.text for o in outs] == [f"echo:prompt {i}" for i in range(20)]
    assert pool.replicas[0].alive


def test_a_reader_that_raises_kills_its_replica_and_the_requests_move(caplog):
    pool, launcher = start(2, restart=False)
    launcher.current(0).mode = "hold"
    futures = [pool.submit(request(i)) for i in range(10)]
    assert wait_until(lambda: len(launcher.current(0).held) == 5)
    launcher.current(0).send(("nonsense", 1, 2))  # the reader cannot read it
    outs = results(futures)
    assert [o.text for o in outs] == [f"echo:prompt {i}" for i in range(10)]
    assert {o.replica for o in outs} == {1}
    assert "reader thread failed" in caplog.text
    assert pool.stats()[0]["resubmitted"] == 5


def test_death_mid_batch_resubmits_each_request_exactly_once():
    pool, launcher = start(2)
    launcher.current(1).mode = "hold"
    futures = [pool.submit(request(i)) for i in range(40)]
    assert wait_until(lambda: len(launcher.current(1).held) == 20)
    launcher.current(1).stop("crashed")
    outs = results(futures)
    assert [o.text for o in outs] == [f"echo:prompt {i}" for i in range(40)]
    assert pool.stats()[1]["resubmitted"] == 20
    sent = sum(len(w.received) for workers in launcher.workers.values() for w in workers)
    assert sent == 60  # 40, and the 20 the dead one held sent again once each
    assert wait_until(lambda: pool.replicas[1].alive and pool.replicas[1].restarts == 1)


def test_death_during_stats_returns_at_once():
    pool, launcher = start(1, restart=False)
    launcher.current(0).stats_delay = 30
    timer = threading.Timer(0.2, launcher.current(0).stop, args=("crashed",))
    timer.start()
    started = time.monotonic()
    stats = pool.replicas[0].stats(timeout=20)
    assert time.monotonic() - started < 5
    assert stats["alive"] is False


def test_a_frozen_worker_is_declared_stalled_its_requests_move_and_it_restarts():
    pool, launcher = start(2, health_timeout=0.5)
    frozen = launcher.current(0)
    frozen.freeze()
    futures = [pool.submit(request(i)) for i in range(20)]
    started = time.monotonic()
    outs = results(futures, timeout=10)
    assert time.monotonic() - started < 4
    assert [o.text for o in outs] == [f"echo:prompt {i}" for i in range(20)]
    assert frozen.killed
    stats = pool.stats()[0]
    assert stats["stalls"] == 1 and stats["last_stall"] and "stalled" in stats["last_death"]
    assert wait_until(lambda: pool.replicas[0].alive and pool.replicas[0].restarts == 1)
    assert {o.replica for o in results([pool.submit(request(i)) for i in range(10)])} == {0, 1}


def test_a_restart_survives_the_late_end_of_the_worker_it_replaces(monkeypatch):
    """The killed worker's pipe ends only after the pool launched its restart (seen in CI: the
    restart died with SIGKILL at start). That late end is the old incarnation's: its reader
    must wait on and reap the old process, never the new one."""
    reaped = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: reaped.append(pgid))
    launcher = FakeLauncher(pid_base=5_000_000)  # pids no real process has (Linux's largest: 4,194,304)
    launcher.next[0] = {"linger_s": 0.3}  # the first incarnation's pipe ends 0.3 s after its kill
    pool, launcher = start(2, launcher=launcher, health_timeout=0.5)
    old = launcher.current(0)
    old.freeze()
    outs = results([pool.submit(request(i)) for i in range(10)], timeout=10)
    assert [o.text for o in outs] == [f"echo:prompt {i}" for i in range(10)]
    assert old.killed
    assert wait_until(lambda: pool.replicas[0].alive and pool.replicas[0].restarts == 1)
    new = launcher.current(0)
    assert new is not old
    time.sleep(0.6)  # the old pipe's end has come and been handled
    assert not new.killed and new.process.joins == 0, "the old worker's end touched its restart"
    assert new.process.pid not in reaped and old.process.pid in reaped
    assert pool.replicas[0].alive
    assert {o.replica for o in results([pool.submit(request(i)) for i in range(10)])} == {0, 1}


def test_a_frozen_engine_behind_a_live_worker_is_declared_stalled():
    pool, launcher = start(2, health_timeout=0.5, restart=False)
    worker = launcher.current(1)
    worker.mode, worker.ticking = "hold", False  # beats keep coming, the tick count does not move
    outs = results([pool.submit(request(i)) for i in range(10)], timeout=10)
    assert {o.replica for o in outs} == {0}
    assert pool.stats()[1]["stalls"] == 1


def test_requests_stuck_before_an_idle_engine_are_a_stall():
    # The worker beats and its engine ticks (it answers probes), but the requests
    # never reached the engine: ticks of an engine holding nothing are no progress.
    pool, launcher = start(2, health_timeout=0.5, restart=False)
    launcher.current(1).mode = "lose"
    started = time.monotonic()
    outs = results([pool.submit(request(i)) for i in range(10)], timeout=10)
    assert time.monotonic() - started < 5
    assert [o.text for o in outs] == [f"echo:prompt {i}" for i in range(10)]
    assert {o.replica for o in outs} == {0}
    assert pool.stats()[1]["stalls"] == 1


class _RaisingRouter(RoundRobinRouter):
    """Routes normally until told to fail (a policy bug, say)."""

    def __init__(self):
        super().__init__()
        self.fail = False

    def choose(self, prompt, loads, adapter=None):
        if self.fail:
            raise RuntimeError("policy bug")
        return super().choose(prompt, loads)


def _fake_pool(n, router, **kwargs):
    backend = FakeBackend(replicas=n)
    kwargs.setdefault("max_restarts", 0)  # a dead fake stays dead unless the test says otherwise
    pool = _made(ReplicaPool.start(backend, SPEC, router, health_timeout=None, **kwargs))
    return pool, backend.replicas


def test_a_router_that_raises_fails_the_request_instead_of_losing_it():
    router = _RaisingRouter()
    pool, replicas = _fake_pool(2, router)
    router.fail = True
    future = pool.submit(request(0))
    with pytest.raises(RuntimeError, match="policy bug"):
        future.result(timeout=2)


def test_a_resubmission_that_cannot_be_routed_fails_the_request(caplog):
    # The resubmission runs in the thread that reported the death, inside a
    # future's callback: an error there would otherwise vanish and the caller wait forever.
    router = _RaisingRouter()
    pool, replicas = _fake_pool(2, router)
    futures = [pool.submit(request(i)) for i in range(4)]
    router.fail = True
    replicas[0].crash("gone")
    for future in futures[0::2]:
        with pytest.raises(RuntimeError, match="policy bug"):
            future.result(timeout=2)
    assert replicas[1].finish_all() == 2
    assert [f.result(timeout=2).text for f in futures[1::2]] == ["echo:prompt 1", "echo:prompt 3"]


def test_a_request_its_caller_cancelled_is_neither_resubmitted_nor_an_error(caplog):
    pool, replicas = _fake_pool(2, RoundRobinRouter())
    future = pool.submit(request(0))
    assert future.cancel()
    with caplog.at_level(logging.ERROR):
        replicas[0].crash("gone")
        assert replicas[1].finish_all() == 0  # not resubmitted
        replicas[0].come_back()
    assert "handling a replica's answer failed" not in caplog.text


def test_a_slow_generation_that_keeps_stepping_is_not_a_stall():
    pool, launcher = start(1, health_timeout=0.3)
    worker = launcher.current(0)
    worker.mode = "hold"  # nothing finishes for a while, but the engine ticks
    future = pool.submit(request(1))
    time.sleep(1.2)  # four health timeouts
    assert pool.replicas[0].alive and not future.done()
    worker.release()
    assert future.result(timeout=2).text == "echo:prompt 1"
    assert pool.stats()[0]["stalls"] == 0


def test_an_idle_replica_is_never_a_stall():
    pool, launcher = start(1, health_timeout=0.2)
    launcher.current(0).freeze()
    time.sleep(0.8)
    assert pool.replicas[0].alive


def test_a_restart_that_fails_leaves_the_pool_serving_on_the_others(caplog):
    pool, launcher = start(2)
    launcher.next[1] = {"fail_start": "CUDA out of memory"}
    launcher.current(1).stop("crashed")
    assert wait_until(lambda: "could not be restarted" in caplog.text)
    assert "CUDA out of memory" in caplog.text
    outs = results([pool.submit(request(i)) for i in range(10)])
    assert {o.replica for o in outs} == {0}


def test_every_replica_gone_fails_fast():
    pool, launcher = start(2, max_restarts=0)
    for i in (0, 1):
        launcher.current(i).stop("crashed")
    assert wait_until(lambda: not any(r.alive for r in pool.replicas))
    started = time.monotonic()
    with pytest.raises(NoHealthyReplicaError, match="every replica is dead"):
        pool.submit(request(1)).result(timeout=1)
    assert time.monotonic() - started < 0.5


def test_the_last_replica_dying_with_requests_fails_them_with_the_cause():
    pool, launcher = start(1, restart=False)
    launcher.current(0).mode = "hold"
    futures = [pool.submit(request(i)) for i in range(5)]
    assert wait_until(lambda: len(launcher.current(0).held) == 5)
    launcher.current(0).stop("crashed")
    for future in futures:
        with pytest.raises(NoHealthyReplicaError, match="engine is dead"):
            future.result(timeout=5)


def test_shutdown_with_requests_in_flight_fails_them_and_later_calls():
    pool, launcher = start(2)
    for i in (0, 1):
        launcher.current(i).mode = "hold"
    futures = [pool.submit(request(i)) for i in range(10)]
    assert wait_until(lambda: sum(len(launcher.current(i).held) for i in (0, 1)) == 10)
    pool.close()
    for replica in pool.replicas:
        replica.shutdown(timeout=2)
    for future in futures:
        with pytest.raises(LMClosedError):
            future.result(timeout=2)
    with pytest.raises(LMClosedError):
        pool.submit(request(99)).result(timeout=1)
    assert not any(launcher.current(i).thread.is_alive() for i in (0, 1))


def test_a_shutdown_during_a_restart_kills_the_starting_worker_at_once(caplog):
    # The CI flake of test_multigpu: the restarted worker outlived the shutdown until
    # its engine had started. Now the shutdown kills it (no 30 s wait for a worker
    # that reads no pipe yet) and the restart ends quietly.
    pool, launcher = start(2)
    gate = threading.Event()  # never set: this engine is still starting when the shutdown comes
    launcher.next[1] = {"start_gate": gate}
    launcher.current(1).stop("crashed")
    assert wait_until(lambda: len(launcher.workers[1]) == 2)
    starting = launcher.current(1)
    pool.close()
    started = time.monotonic()
    pool.replicas[1].shutdown(timeout=30)
    assert time.monotonic() - started < 2
    assert starting.killed and wait_until(lambda: not starting.thread.is_alive())
    time.sleep(0.2)
    assert "could not be restarted" not in caplog.text
    assert len(launcher.workers[1]) == 2 and not pool.replicas[1].alive


def test_a_restart_after_the_shutdown_launches_nothing():
    launcher = FakeLauncher()
    backend = ProcessBackend(placements(1), start_timeout=5, launch=launcher, heartbeat_s=HEARTBEAT)
    [replica] = backend.start(SPEC, on_death=lambda *args: None)
    replica.shutdown(timeout=2)
    with pytest.raises(ReplicaStartError, match="shut down"):
        backend.restart(replica)
    assert len(launcher.workers[0]) == 1


def test_no_backend_restarts_a_replica_after_its_shutdown():
    # The rule lives in ReplicaHandle (_launching); the public fake follows it too.
    backend = FakeBackend(replicas=1)
    [replica] = backend.start(SPEC, on_death=lambda *args: None)
    replica.shutdown()
    with pytest.raises(ReplicaStartError, match="shut down"):
        backend.restart(replica)
    assert not replica.alive


def test_start_is_all_or_none():
    launcher = FakeLauncher()
    launcher.next[1] = {"fail_start": "no such GPU"}
    with pytest.raises(ReplicaStartError, match="no such GPU"):
        start(2, launcher=launcher)
    assert launcher.current(0).killed  # the one that started was stopped again


# ------------------------------------------------------ the pool alone, on FakeReplicas


def fake_pool(n=2, **kwargs):
    backend = FakeBackend(replicas=n)
    kwargs.setdefault("max_restarts", 0)  # a dead fake stays dead unless the test says otherwise
    pool = _made(ReplicaPool.start(backend, SPEC, RoundRobinRouter(), **kwargs))
    return pool, backend.replicas


def test_a_reply_of_an_older_incarnation_is_dropped():
    pool, (replica, _) = fake_pool(2, health_timeout=None)
    future = pool.submit(request(0))  # to replica 0
    request_id, held = next(iter(replica.requests.items()))
    old = replica.incarnation
    replica.crash()  # resubmitted to replica 1
    replica.come_back()
    replica.reply_from(old, request_id, held)  # the dead engine's late answer
    assert not future.done()
    pool.replicas[1].finish_all()
    assert future.result(timeout=1).replica == 1


def test_a_request_is_resubmitted_at_most_max_attempts_times():
    pool, replicas = fake_pool(2, health_timeout=None, max_attempts=2)
    future = pool.submit(request(0))
    replicas[0].crash()
    replicas[0].come_back()
    replicas[1].crash()
    with pytest.raises(ReplicaDeadError):
        future.result(timeout=1)
    assert sum(s["resubmitted"] for s in pool.stats()) == 1


def test_the_stall_check_never_dies(caplog):
    pool, replicas = fake_pool(1, health_timeout=0.1)

    def broken():
        raise RuntimeError("boom")

    replicas[0].last_progress = broken
    pool.submit(request(0))
    with caplog.at_level(logging.ERROR):
        assert wait_until(lambda: caplog.text.count("stall check failed") >= 2, 3)
    replicas[0].last_progress = lambda: time.monotonic() - 10
    assert wait_until(lambda: not replicas[0].alive, 3)  # it still looks, and finds the stall


def test_check_stalls_alone():
    pool, (replica,) = fake_pool(1, health_timeout=5)
    replica.progressing = False
    future = pool.submit(request(0))
    now = time.monotonic()
    assert pool.check_stalls(now + 1) == []
    assert pool.check_stalls(now + 6) == [0]
    assert replica.killed == 1 and not replica.alive
    with pytest.raises(NoHealthyReplicaError, match="stalled"):
        future.result(timeout=1)
