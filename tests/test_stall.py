"""Stalls end to end on real vLLM (CPU build): an engine process or a worker
frozen with SIGSTOP mid-batch is declared stalled after health_timeout, its
requests finish elsewhere, it is restarted; a frozen vLLMOffline engine fails
its callers instead of hanging them; nothing is left running after shutdown,
stopped processes included. The logic itself is tested on fakes in test_faults.py."""

import os
import signal
import threading
import time

import pytest

from conftest import ENGINE_KWARGS, engine_children, prompts, wait_for
from vllm_dspy_adapter import NoHealthyReplicaError, vLLMOffline, vLLMOfflineMultiGPU

pytestmark = pytest.mark.engine

HEALTH_TIMEOUT = 30  # seconds: well above one engine step of the default model on a busy 2-core machine


@pytest.fixture(scope="module")
def lm(default_model):
    lm = vLLMOfflineMultiGPU(num_replicas=2, health_timeout=HEALTH_TIMEOUT, temperature=0.0, max_tokens=16,
                             cache=False, **ENGINE_KWARGS)
    yield lm
    lm.shutdown()


def freeze_mid_batch(lm, index, pick):
    """Run a batch; SIGSTOP ``pick(stats)`` of replica ``index`` once it holds requests."""
    frozen = {}

    def freeze():
        wait_for(lambda: lm.stats()[index].get("in_flight", 0) > 0, 120)
        frozen["pid"] = pick(lm.stats()[index])
        frozen["at"] = time.monotonic()
        os.kill(frozen["pid"], signal.SIGSTOP)
        wait_for(lambda: not lm.stats()[index]["alive"], 10 * HEALTH_TIMEOUT, interval=0.2)
        frozen["declared_after"] = time.monotonic() - frozen["at"]

    threading.Thread(target=freeze, daemon=True).start()
    outs = lm.batch_generate(prompts(80, f"stall{index}"), max_tokens=16, progress=False, return_outputs=True)
    return outs, frozen


def check_batch(outs, n=80):
    lengths = [o.num_prompt_tokens for o in outs]
    assert len(outs) == n and lengths == sorted(lengths) and len(set(lengths)) == n  # each once, in order


def test_a_frozen_engine_process_is_declared_stalled_and_the_batch_completes(lm):
    outs, frozen = freeze_mid_batch(lm, 1, lambda s: s["engine_pids"][0])
    assert frozen, "the engine was never busy"
    check_batch(outs)
    assert HEALTH_TIMEOUT - 2 <= frozen["declared_after"] < HEALTH_TIMEOUT + 15  # last beat up to 1 s before
    assert time.monotonic() - frozen["at"] < 15 * HEALTH_TIMEOUT  # the rest ran on the other replica
    stats = lm.stats()[1]
    assert stats["stalls"] == 1 and "stalled" in stats["last_death"] and stats["resubmitted"] > 0
    assert wait_for(lambda: lm.stats()[1]["alive"], 300), "replica 1 was not restarted"


def test_a_frozen_worker_process_is_declared_stalled_and_the_batch_completes(lm):
    outs, frozen = freeze_mid_batch(lm, 0, lambda s: s["pid"])
    assert frozen, "the worker was never busy"
    check_batch(outs)
    assert HEALTH_TIMEOUT - 2 <= frozen["declared_after"] < HEALTH_TIMEOUT + 15  # last beat up to 1 s before
    assert time.monotonic() - frozen["at"] < 15 * HEALTH_TIMEOUT
    assert lm.stats()[0]["stalls"] == 1
    assert wait_for(lambda: lm.stats()[0]["alive"], 300), "replica 0 was not restarted"
    again = lm.batch_generate(prompts(20, "after"), max_tokens=4, progress=False, return_outputs=True)
    assert {o.replica for o in again} == {0, 1}


def test_shutdown_leaves_no_process_stopped_ones_included(lm):
    stats = lm.stats()
    os.kill(stats[0]["pid"], signal.SIGSTOP)
    os.kill(stats[1]["engine_pids"][0], signal.SIGSTOP)
    lm.shutdown()
    assert wait_for(lambda: not engine_children(), 60), [p.cmdline() for p in engine_children()]


def test_a_frozen_single_engine_fails_its_callers_within_the_deadline(default_model):
    lm = vLLMOffline(health_timeout=HEALTH_TIMEOUT, max_tokens=8, cache=False, **ENGINE_KWARGS)
    try:
        result = {}

        def long_batch():
            try:
                result["out"] = lm.batch_generate(["Count to one thousand: 1, 2, 3,"] * 4, max_tokens=1500,
                                                  ignore_eos=True, progress=False)
            except Exception as exc:
                result["error"] = exc

        thread = threading.Thread(target=long_batch)
        thread.start()
        assert wait_for(lambda: lm.stats()[0].get("in_flight", 0) > 0, 60)
        os.kill(lm.stats()[0]["engine_pids"][0], signal.SIGSTOP)
        frozen_at = time.monotonic()
        thread.join(4 * HEALTH_TIMEOUT)
        assert not thread.is_alive(), "the caller still waits on a frozen engine"
        assert time.monotonic() - frozen_at < 4 * HEALTH_TIMEOUT
        assert isinstance(result.get("error"), NoHealthyReplicaError) and "stalled" in str(result["error"])
        with pytest.raises(NoHealthyReplicaError):  # and later calls fail at once
            lm.batch_generate(["again"], progress=False)
    finally:
        lm.shutdown()
    assert wait_for(lambda: not engine_children(), 60), [p.cmdline() for p in engine_children()]
