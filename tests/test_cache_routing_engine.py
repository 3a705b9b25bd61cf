"""routing="cache" on real vLLM (CPU build): two worker-process replicas of the default
model publish their KV-cache events, the heartbeat carries them, the router reads them."""

import time

import pytest

from conftest import ENGINE_KWARGS
from vllm_dspy_adapter import vLLMOfflineMultiGPU
from vllm_dspy_adapter.serving.cache_routing import CacheRouter
from vllm_dspy_adapter.serving.routing import PrefixRouter

pytestmark = pytest.mark.engine


def test_followups_go_where_the_events_say_the_prefix_is():
    # expect_s=0: what the router sent counts for nothing, so only the engines' events
    # can bring the follow-ups back to the first question's replica.
    router = CacheRouter(fallback=PrefixRouter(), expect_s=0.0)
    prefix = "You are a meticulous assistant who answers in one word. " * 30
    # batch_generate takes its sampling per call (the LM's DSPy defaults do not apply to it):
    # without max_tokens a request may run to the end of the context.
    sampling = dict(max_tokens=2, temperature=0.0)
    with vLLMOfflineMultiGPU(num_replicas=2, routing=router, cache=False, **ENGINE_KWARGS) as lm:
        assert {row["routing"] for row in lm.stats()} == {"cache"}
        first = lm.batch_generate([prefix + "Question 0?"], return_outputs=True, progress=False, **sampling)[0]
        home = first.replica
        time.sleep(3)  # a heartbeat or two: the events of the first prefill reach the driver
        followups = []
        for i in range(1, 5):  # one at a time: a load-only policy would alternate replicas
            followups += lm.batch_generate([prefix + f"Question {i}?"], return_outputs=True, progress=False,
                                           **sampling)
            time.sleep(1.5)
        assert [g.replica for g in followups] == [home] * 4, [g.replica for g in followups]
        assert all(g.num_cached_tokens >= 128 for g in followups), [g.num_cached_tokens for g in followups]
