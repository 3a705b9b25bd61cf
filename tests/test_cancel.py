"""Cancellation on fakes, in seconds: a caller that gives up aborts its request where it
runs (the real pool, the real ProcessReplica and its pipe, a FakeWorker that records the
Cancel message; the public FakeReplica), and nothing of it is delivered later. The
real-engine checks are in test_cancel_engine.py."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from conftest import wait_for
from fakes import SPEC, FakeLauncher, placements
from vllm_dspy_adapter.backends.fake import FakeBackend, FakeReplica
from vllm_dspy_adapter.backends.process import ProcessBackend
from vllm_dspy_adapter.backends.wire import ProtocolError
from vllm_dspy_adapter.errors import ReplicaDeadError
from vllm_dspy_adapter.lm.dspy_stream import submit_off_loop
from vllm_dspy_adapter.protocol import GenerationRequest
from vllm_dspy_adapter.serving.pool import ReplicaPool
from vllm_dspy_adapter.serving.routing import RoundRobinRouter


def request(i: int) -> GenerationRequest:
    return GenerationRequest(prompt=f"prompt {i}", sampling={"max_tokens": 4})


def fake_pool(n=2):
    backend = FakeBackend(replicas=n)
    pool = ReplicaPool.start(backend, SPEC, RoundRobinRouter(), max_restarts=0, health_timeout=None)
    return pool, backend.replicas


def process_pool(n=1, mode="hold"):
    launcher = FakeLauncher(mode=mode)
    backend = ProcessBackend(placements(n), start_timeout=5, launch=launcher, heartbeat_s=0.05)
    return ReplicaPool.start(backend, SPEC, RoundRobinRouter(), health_timeout=None), launcher


def test_a_cancelled_future_aborts_its_request_on_the_replica_that_holds_it():
    pool, replicas = fake_pool(2)
    try:
        futures = [pool.submit(request(i)) for i in range(4)]
        assert futures[1].cancel() and futures[2].cancel()
        aborted = [a for r in replicas for a in r.aborted]
        assert len(aborted) == 2
        assert sum(len(r.requests) for r in replicas) == 2  # the other two still run
        assert sum(r.finish_all() for r in replicas) == 2
        assert [f.result(timeout=5).text for f in (futures[0], futures[3])] == ["echo:prompt 0", "echo:prompt 3"]
    finally:
        pool.close()


def test_a_reply_after_the_cancel_is_dropped():
    pool, replicas = fake_pool(1)
    try:
        future = pool.submit(request(0))
        (request_id,) = replicas[0].requests
        held = replicas[0].requests[request_id]
        future.cancel()
        replicas[0].reply_from(replicas[0].incarnation, request_id, held)  # the engine answered anyway
        assert future.cancelled()
        later = pool.submit(request(1))  # the next call gets its own answer, not the dropped one
        replicas[0].finish_all()
        assert later.result(timeout=5).text == "echo:prompt 1"
    finally:
        pool.close()


def test_a_death_after_the_cancel_resubmits_nothing():
    pool, replicas = fake_pool(2)
    try:
        future = pool.submit(request(0))
        holder = next(r for r in replicas if r.requests)
        future.cancel()
        holder.crash()
        other = next(r for r in replicas if r is not holder)
        assert not other.requests  # nothing was resubmitted for a caller that left
    finally:
        pool.close()


def test_the_worker_receives_the_cancel_over_the_pipe():
    pool, launcher = process_pool(1, mode="hold")
    try:
        futures = [pool.submit(request(i)) for i in range(3)]
        worker = launcher.current(0)
        assert wait_for(lambda: len(worker.held) == 3, 5, interval=0.01)
        futures[1].cancel()
        assert wait_for(lambda: len(worker.cancelled) == 1, 5, interval=0.01)
        assert [rid for rid, _ in worker.held] == [worker.received[0], worker.received[2]]
        worker.release()
        assert [f.result(timeout=5).text for f in (futures[0], futures[2])] == ["echo:prompt 0", "echo:prompt 2"]
    finally:
        pool.close()


def test_an_unknown_message_on_the_pipe_is_a_protocol_error_and_a_death():
    pool, launcher = process_pool(2, mode="hold")
    try:
        future = pool.submit(request(0))
        holder = next(i for i in (0, 1) if wait_for(lambda i=i: launcher.current(i).held, 1, interval=0.01))
        worker = launcher.current(holder)
        worker.send(("done", worker.received[0], None))  # the old positional tuple: not a message any more
        assert wait_for(lambda: "ProtocolError" in (pool.replicas[holder].stats(timeout=0.5)["last_death"] or ""), 15,
                        interval=0.01)
        # Resubmitted: to the other replica, or to the holder's new incarnation if it is back first.
        def new_holder():
            return next((w for w in map(launcher.current, (0, 1)) if w is not worker and len(w.held) == 1), None)

        assert wait_for(lambda: new_holder() is not None, 5, interval=0.01)
        new_holder().release()
        assert future.result(timeout=5).text == "echo:prompt 0"
    finally:
        pool.close()


def test_protocol_error_names_the_message():
    from vllm_dspy_adapter.backends.wire import TO_DRIVER, checked

    with pytest.raises(ProtocolError, match="unknown message on the worker pipe: \\('garbage'"):
        checked(("garbage",), TO_DRIVER)


def test_asyncio_cancellation_of_an_awaited_call_aborts_it():
    pool, replicas = fake_pool(1)

    def submit(req):
        return pool.submit(req), None

    async def caller():
        future, _ = await submit_off_loop(submit, request(0))
        await asyncio.wrap_future(future)

    async def main():
        task = asyncio.ensure_future(caller())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
        assert wait_for(lambda: len(replicas[0].aborted) == 1, 5, interval=0.01)
        assert not replicas[0].requests
    finally:
        pool.close()


def test_a_caller_cancelled_while_its_request_is_still_being_rendered_aborts_it_on_arrival():
    pool, replicas = fake_pool(1)
    gate = concurrent.futures.Future()

    def slow_submit(req):  # rendering that takes a while
        gate.result(timeout=10)
        return pool.submit(req), None

    async def main():
        task = asyncio.ensure_future(submit_off_loop(slow_submit, request(0)))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set_result(None)  # the thread submits now, after its caller left

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
        assert wait_for(lambda: len(replicas[0].aborted) == 1, 5, interval=0.01)
    finally:
        pool.close()


def test_cancel_of_an_id_not_held_is_ignored():
    replica = FakeReplica(0, lambda r, c: None)
    replica.cancel("never-submitted")
    assert replica.aborted == []
    future = replica.submit(request(0), "r1")
    replica.crash()
    with pytest.raises(ReplicaDeadError):
        future.result(timeout=1)
    replica.cancel("r1")  # already failed by the death: nothing to abort
    assert replica.aborted == []
