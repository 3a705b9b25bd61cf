"""Cancellation end to end on real vLLM (CPU build, the default model): a caller that
gives up leaves nothing running in the engine. ``stats()['unfinished']`` counts the
requests handed to vLLM and not finished (from the hand-off to vLLM's last output);
``cancelled`` the ones aborted because their caller gave up."""

import _thread
import asyncio
import signal
import threading
import time
import uuid

import dspy
import pytest

from conftest import wait_for

pytestmark = pytest.mark.engine

LONG = 1500  # output tokens no test waits for


def _engine(lm):
    """The engines' counters added up over the replicas (a request may run on either)."""
    rows = lm.stats()
    return {key: sum(row.get(key, 0) or 0 for row in rows) for key in ("cancelled", "unfinished", "in_flight")}


@pytest.fixture(params=["inprocess", "process"])
def lm(request):
    # The session's engines (conftest): in this process, and two worker-process replicas.
    shared = request.getfixturevalue("engine_lm" if request.param == "inprocess" else "pool_lm")
    return shared.copy(temperature=1.0, max_tokens=LONG, cache=False)


def _idle(lm, timeout=5.0):
    return wait_for(lambda: _engine(lm).get("unfinished") == 0 and _engine(lm).get("in_flight") == 0, timeout,
                    interval=0.1)


def test_an_acall_timed_out_is_aborted_in_vllm(lm):
    before = _engine(lm).get("cancelled", 0)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lm.acall(f"Write a very long story. {uuid.uuid4().hex}"), timeout=1.5)

    asyncio.run(main())
    started = time.monotonic()
    assert _idle(lm), _engine(lm)
    assert time.monotonic() - started < 3
    assert _engine(lm)["cancelled"] == before + 1


def test_a_stream_abandoned_is_aborted_in_vllm(lm):
    # dspy.streamify(async_streaming=True): closing it cancels the program's task, which
    # closes our stream. (The sync form runs the async one in a thread of DSPy's that
    # keeps reading after its consumer stops, so DSPy never tells the LM; see the guide.)
    before = _engine(lm).get("cancelled", 0)
    program = dspy.streamify(dspy.Predict("question -> answer"), async_streaming=True)

    async def main():
        with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
            stream = program(question=f"Tell me a very long story. {uuid.uuid4().hex}")
            seen = 0
            async for _chunk in stream:
                seen += 1
                if seen >= 3:
                    break
            await stream.aclose()  # the consumer stopped reading
        return seen

    assert asyncio.run(asyncio.wait_for(main(), 120)) == 3
    assert _idle(lm), _engine(lm)
    assert _engine(lm)["cancelled"] == before + 1


def test_ctrl_c_during_batch_generate_aborts_the_batch_and_the_lm_serves_right_after(lm):
    before = _engine(lm).get("cancelled", 0)
    prompts = [f"Count to a thousand, {i} {uuid.uuid4().hex}" for i in range(6)]
    # A job started in the background (nohup, `cmd &`) inherits SIGINT ignored, and then
    # interrupt_main does nothing: give SIGINT Python's own handler for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(2.0, _thread.interrupt_main)  # what Ctrl-C in a notebook does
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            lm.batch_generate(prompts, max_tokens=LONG, progress=False)  # batch_generate takes no LM default
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert _idle(lm, timeout=10), _engine(lm)
    assert _engine(lm)["cancelled"] >= before + 1  # those vLLM held; the rest never started
    fresh = lm.batch_generate([f"Say hi. {uuid.uuid4().hex}"], max_tokens=4, progress=False)
    assert len(fresh) == 1 and isinstance(fresh[0], str)
