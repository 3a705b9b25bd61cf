"""batch_generate's cache-friendly order (serving/batching.py, ReplicaPool.submit_group):
pure grouping, the pool's pinning, and an LM over fake replicas that keeps input order."""

import threading

import pytest

from conftest import wait_for
from fakes import SPEC
from vllm_dspy_adapter.backends.fake import FakeBackend
from vllm_dspy_adapter import ConfigurationError, vLLMOfflineMultiGPU
from vllm_dspy_adapter.protocol import GenerationRequest
from vllm_dspy_adapter.serving.batching import group_by_prefix
from vllm_dspy_adapter.serving.pool import ReplicaPool
from vllm_dspy_adapter.serving.routing import RoundRobinRouter

A = "A" * 300
B = "B" * 300


def test_prompts_sharing_a_prefix_are_grouped_in_input_order():
    prompts = [A + "1", B + "1", "short", A + "2", B + "2", A + "3", "short too"]
    assert group_by_prefix(prompts) == [[0, 3, 5], [1, 4], [2], [6]]


def test_a_short_common_start_is_no_group_and_token_ids_group_too():
    assert group_by_prefix(["same start " + "x" * 300, "same start " + "y" * 300]) == [[0], [1]]
    ids = [list(range(100)) + [1], list(range(100)) + [2], [7] * 100]
    assert group_by_prefix(ids) == [[0, 1], [2]]
    assert group_by_prefix([A + "1", list(range(100)), A + "2"]) == [[0, 2], [1]]  # text and ids never mix


def test_a_group_is_cut_into_pieces_of_at_most_max_size():
    prompts = [A + str(i) for i in range(7)] + [B + "0"]
    assert group_by_prefix(prompts, max_size=3) == [[0, 1, 2], [3, 4, 5], [6], [7]]
    assert group_by_prefix(prompts, max_size=0) == [[i] for i in range(8)]  # at least one a piece


def test_submit_group_sends_the_whole_group_where_its_first_went():
    backend = FakeBackend(replicas=3)
    pool = ReplicaPool.start(backend, SPEC, RoundRobinRouter(), max_restarts=0, health_timeout=None)
    first = pool.submit_group([GenerationRequest(prompt=A + str(i)) for i in range(5)])
    second = pool.submit_group([GenerationRequest(prompt=B + str(i)) for i in range(4)])
    held = [len(r.requests) for r in backend.replicas]
    assert sorted(held) == [0, 4, 5], held  # round robin alone would spread 9 requests 3/3/3
    for replica in backend.replicas:
        replica.finish_all()
    assert len({f.result(timeout=5).replica for f in first}) == 1
    assert len({f.result(timeout=5).replica for f in second}) == 1
    pool.close()


def test_a_group_member_whose_replica_died_is_routed_elsewhere():
    backend = FakeBackend(replicas=2)
    pool = ReplicaPool.start(backend, SPEC, RoundRobinRouter(), max_restarts=0, health_timeout=None)
    futures = pool.submit_group([GenerationRequest(prompt=A + str(i)) for i in range(3)])
    home = next(r for r in backend.replicas if r.requests)
    home.crash()
    other = next(r for r in backend.replicas if r is not home)
    assert wait_for(lambda: len(other.requests) == 3, 5)
    other.finish_all()
    assert all(f.result(timeout=5).replica == other.index for f in futures)
    pool.close()


def FakeLM(backend):
    """The real LM class over fake replicas that hold requests until the test answers (echo)."""
    return vLLMOfflineMultiGPU(backend=backend, routing="round_robin", health_timeout=None, cache=False)


def test_batch_generate_groups_by_prefix_and_returns_results_in_input_order():
    backend = FakeBackend(replicas=3)
    lm = FakeLM(backend)
    prompts = [A + "1", B + "1", "short", A + "2", B + "2", A + "3", "short too", B + "3"]
    out: list = []
    worker = threading.Thread(target=lambda: out.append(lm.batch_generate(prompts, return_outputs=True,
                                                                          progress=False)))
    worker.start()
    assert wait_for(lambda: sum(len(r.requests) for r in backend.replicas) == len(prompts), 10)
    for replica in backend.replicas:
        replica.finish_all()
    worker.join(10)
    lm.shutdown()
    results = out[0]
    assert [g.text for g in results] == [f"echo:{p}" for p in prompts]
    assert len({results[i].replica for i in (0, 3, 5)}) == 1
    assert len({results[i].replica for i in (1, 4, 7)}) == 1


def test_a_batch_sharing_one_system_prompt_still_spreads_over_every_replica():
    # Every DSPy prompt of one signature shares its system message: one group of the whole
    # batch. Pinned whole it would run on one replica while the others idle.
    backend = FakeBackend(replicas=3)
    lm = FakeLM(backend)
    prompts = [A + str(i) for i in range(12)]
    out: list = []
    worker = threading.Thread(target=lambda: out.append(lm.batch_generate(prompts, return_outputs=True,
                                                                          progress=False)))
    worker.start()
    assert wait_for(lambda: sum(len(r.requests) for r in backend.replicas) == len(prompts), 10)
    held = sorted(len(r.requests) for r in backend.replicas)
    for replica in backend.replicas:
        replica.finish_all()
    worker.join(10)
    lm.shutdown()
    assert held == [4, 4, 4], held  # three pieces of the fair share, one on each replica
    results = out[0]
    assert [g.text for g in results] == [f"echo:{p}" for p in prompts]
    assert [len({results[j].replica for j in range(i, i + 4)}) for i in (0, 4, 8)] == [1, 1, 1]


def test_per_prompt_sampling_reaches_each_request_in_input_order_and_bad_entries_are_refused_first():
    seen: list = []

    def handler(request):
        seen.append(request)
        return f"{request.sampling.get('max_tokens')}|{request.sampling.get('ignore_eos')}"

    lm = vLLMOfflineMultiGPU(backend=FakeBackend(handler, replicas=2), health_timeout=None, cache=False)
    wanted = [1 + i % 5 for i in range(10)]
    texts = lm.batch_generate([f"q{i}" for i in range(10)], per_prompt=[{"max_tokens": n} for n in wanted],
                              ignore_eos=True, progress=False)
    assert texts == [f"{n}|True" for n in wanted]
    seen.clear()
    with pytest.raises(ConfigurationError, match="per_prompt has 1 entries for 2 prompts"):
        lm.batch_generate(["a", "b"], per_prompt=[{}], progress=False)
    with pytest.raises(ConfigurationError, match=r"per_prompt\[1\] is str"):
        lm.batch_generate(["a", "b"], per_prompt=[{}, "max_tokens=3"], progress=False)
    assert seen == []  # refused before any request ran
    lm.shutdown()


def interrupt_without_a_signal(call) -> None:
    """``call()`` in this (the main) thread, interrupted after 0.5 s by ``_thread.interrupt_main``,
    which sets Python's interrupt flag without a signal that would wake a blocked wait: the call
    must see it while its prompts are still held, and raise ``KeyboardInterrupt``."""
    import _thread
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)


def test_an_interrupt_without_a_real_signal_stops_the_batch_and_aborts_what_was_held():
    backend = FakeBackend(replicas=2)
    lm = FakeLM(backend)
    interrupt_without_a_signal(lambda: lm.batch_generate([f"q{i}" for i in range(6)], progress=False))
    assert wait_for(lambda: sum(len(r.aborted) for r in backend.replicas) == 6, 5), \
        [r.aborted for r in backend.replicas]
    lm.shutdown()


def test_an_interrupt_without_a_real_signal_stops_a_synchronous_call_and_aborts_it():
    backend = FakeBackend(replicas=1)
    lm = FakeLM(backend)
    interrupt_without_a_signal(lambda: lm("Tell me a long story."))
    assert wait_for(lambda: len(backend.replicas[0].aborted) == 1, 5), backend.replicas[0].aborted
    lm.shutdown()
