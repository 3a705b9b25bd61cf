"""vLLMOffline on real vLLM (CPU build) with the embedded default model and real DSPy programs."""

import asyncio
import os
import signal
import threading
import time
import uuid

import dspy
import psutil
import pydantic
import pytest

from conftest import ENGINE_KWARGS, engine_children, wait_for
from vllm_dspy_adapter import ConfigurationError, LMClosedError, ReplicaStartError, vLLMOffline

pytestmark = pytest.mark.engine


@pytest.fixture
def lm(engine_lm):
    return engine_lm.copy(max_tokens=96)  # the session's engine (conftest); its last user below kills it


def requests_served(lm):
    return lm.stats()[0]["requests"]


def test_direct_call_answers(lm):
    out = lm(f"What is 2+3? ({uuid.uuid4().hex[:4]})", cache=False)
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    assert lm.history[-1]["response"].finish_reason in ("stop", "length")


def test_predict_and_chain_of_thought_answer(lm):
    with dspy.context(lm=lm):
        prediction = dspy.Predict("question -> answer")(question="What is the capital of France?")
        assert isinstance(prediction.answer, str)  # parsed: the adapter found the field (its text is the model's)
        cot = dspy.ChainOfThought("question -> answer")(question="What is 2 + 3?")
        assert isinstance(cot.reasoning, str) and isinstance(cot.answer, str)


class Capital(pydantic.BaseModel):
    country: str
    city: str
    population_millions: float


class CapitalSignature(dspy.Signature):
    """Give the capital city of the country."""

    country: str = dspy.InputField()
    result: Capital = dspy.OutputField()
    confident: bool = dspy.OutputField()


def test_json_adapter_typed_outputs_always_parse(lm):
    assert lm.supports_response_schema and "response_format" in lm.supported_params
    predict = dspy.Predict(CapitalSignature)
    parsed = 0
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        for country in ["France", "Japan", "Peru", "Kenya", "Norway", "Chile"]:
            try:
                prediction = predict(country=country)
            except dspy.utils.exceptions.AdapterParseError:
                # The schema holds every token, but the 135M model can write digits of a
                # number until max_tokens: only an answer cut off that way may fail to parse.
                assert lm.history[-1]["response"].finish_reason == "length", "a finished answer did not parse"
                continue
            assert isinstance(prediction.result, Capital)
            assert isinstance(prediction.confident, bool)
            parsed += 1
    assert parsed >= 4


def test_evaluate_with_32_threads_batches_calls_together(lm):
    from vllm_dspy_adapter.cli import arithmetic_devset

    before = lm.stats()[0]
    devset = arithmetic_devset(32, seed=int(time.time()))
    program = dspy.Predict("question -> answer")
    with dspy.context(lm=lm.copy(cache=False)):
        result = dspy.Evaluate(devset=devset, metric=lambda e, p, t=None: e.answer in str(p.answer),
                               num_threads=32, display_progress=False)(program)
    after = lm.stats()[0]
    assert after["requests"] - before["requests"] >= 32
    assert len(result.results) == 32
    # vLLM's own count of requests it held at once: calls from threads shared the batch.
    assert after["peak_unfinished"] > 8
    assert after["peak_in_flight"] > 8


def test_repeated_call_is_served_from_dspy_cache(lm):
    question = f"Name a colour. ({uuid.uuid4().hex})"
    first = lm(question)
    served = requests_served(lm)
    second = lm(question)
    assert second == first
    assert requests_served(lm) == served


def test_usage_is_tracked(lm):
    with dspy.context(lm=lm, track_usage=True):
        prediction = dspy.Predict("question -> answer")(question=f"What is 1+1? {uuid.uuid4().hex[:6]}")
    usage = prediction.get_lm_usage()[lm.model]
    assert usage["prompt_tokens"] > 10 and usage["completion_tokens"] > 0


def test_acall_works(lm):
    out = asyncio.run(lm.acall(f"Say hello. {uuid.uuid4().hex[:6]}"))
    assert len(out) == 1 and isinstance(out[0], str)

    async def many():
        return await asyncio.gather(*[lm.acall(f"Count to {i}.", cache=False) for i in range(8)])

    assert len(asyncio.run(many())) == 8


def test_history_copy_and_dump_state(lm):
    copy = lm.copy(temperature=0.7)
    assert copy.kwargs["temperature"] == 0.7 and lm.kwargs["temperature"] == 0.0
    copy(f"Hi {uuid.uuid4().hex[:4]}")
    assert copy.history and copy.history[-1]["usage"]["completion_tokens"] > 0
    state = lm.dump_state()
    assert state["max_model_len"] == 2048 and state["temperature"] == 0.0
    assert state["_dspy_lm_class"] == "vllm_dspy_adapter.lm.offline.vLLMOffline"


def test_logprobs_when_asked(lm):
    out = lm(f"Say yes. {uuid.uuid4().hex[:4]}", logprobs=True, top_logprobs=2, max_tokens=5, cache=False)
    assert out[0]["logprobs"] is not None


def test_detokenize_false_decodes_the_finished_answer_once_as_vllm_would(lm):
    """detokenize=False: vLLM skips its per-step detokenisation; the adapter decodes the
    finished ids once. Same text as vLLM's own at temperature 0, EOS left out, logprobs named."""
    tag = uuid.uuid4().hex[:6]
    prompts = [[{"role": "user", "content": f"Name three colours. ({tag})"}],
               [{"role": "user", "content": f"Say hello to Ada in French. ({tag})"}],
               f"The capital of France is ({tag})"]
    # The last prompt ignores EOS: 40 tokens whatever the model would say, so one text is long by construction.
    per_prompt = [{}, {}, {"ignore_eos": True}]
    theirs = lm.batch_generate(prompts, max_tokens=40, temperature=0.0, return_outputs=True, progress=False,
                               per_prompt=per_prompt)
    ours = lm.batch_generate(prompts, max_tokens=40, temperature=0.0, return_outputs=True, progress=False,
                             per_prompt=per_prompt, detokenize=False)
    assert [o.text for o in ours] == [o.text for o in theirs]
    assert ours[2].num_output_tokens == 40 and ours[2].text, ours[2]
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
    named = lm.batch_generate(prompts[:1], max_tokens=5, logprobs=2, return_outputs=True, progress=False,
                              detokenize=False)[0]
    assert named.logprobs and all(entry.token for entry in named.logprobs), named.logprobs


def test_over_long_prompt_raises_context_window_error_and_engine_keeps_serving(lm):
    with pytest.raises(dspy.ContextWindowExceededError):
        lm("word " * 5000, cache=False)
    assert lm(f"What is 2+3? ({uuid.uuid4().hex[:4]})", cache=False)[0]


def test_bad_engine_argument_fails_before_any_engine_starts():
    before = {p.pid for p in engine_children()}
    with pytest.raises(ConfigurationError, match="gpu_memory_utilisation"):
        vLLMOffline(gpu_memory_utilisation=0.5)
    with pytest.raises(ConfigurationError, match="min_p"):
        vLLMOffline(sampling_params={"min_p": 5.0})
    with pytest.raises(ConfigurationError, match="repetition_penalty"):
        vLLMOffline(sampling_params={"repetition_penalti": 1.1})
    with pytest.raises(ConfigurationError, match="'n'"):
        vLLMOffline(sampling_params={"n": 2})
    assert {p.pid for p in engine_children()} == before


def test_missing_model_path_is_named():
    with pytest.raises(FileNotFoundError, match="/no/such/model"):
        vLLMOffline(model="/no/such/model")


def test_start_past_start_timeout_stops_its_engine_processes(default_model):
    # A start that hangs (seen with a crashed tensor-parallel start on GPUs) must not
    # keep the caller, or engine processes holding the device, past start_timeout.
    before = {p.pid for p in engine_children()}
    started = time.monotonic()
    with pytest.raises(ReplicaStartError, match="did not start within 8 s"):
        vLLMOffline(start_timeout=8, **ENGINE_KWARGS)
    assert time.monotonic() - started < 8 + 75
    assert wait_for(lambda: {p.pid for p in engine_children()} <= before, 15), \
        [p.cmdline() for p in engine_children() if p.pid not in before]


def test_shutdown_with_a_request_in_flight_fails_it_instead_of_answering_half(default_model):
    # vLLM ends what it holds at shutdown with the text so far (finish_reason "abort"):
    # that must surface as an error, never as a finished answer.
    lm = vLLMOffline(max_tokens=8, cache=False, **ENGINE_KWARGS)
    result = {}

    def long_batch():
        try:
            result["out"] = lm.batch_generate(["Count to one thousand: 1, 2, 3,"], max_tokens=1500,
                                              ignore_eos=True, progress=False, return_outputs=True)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=long_batch)
    thread.start()
    assert wait_for(lambda: lm.stats()[0].get("in_flight", 0) > 0, 30)
    time.sleep(0.5)
    lm.shutdown()
    thread.join(30)
    assert not thread.is_alive(), "the caller still waits after shutdown"
    assert "out" not in result, result
    assert isinstance(result["error"], LMClosedError) and "shut down" in str(result["error"])


def test_dead_engine_raises_instead_of_hanging(lm):
    # Last in this module: it kills the shared engine.
    # The shared engine's processes (conftest leaves them out of engine_children on purpose).
    killed = [pid for pid in lm.stats()[0]["engine_pids"] if psutil.pid_exists(pid)]
    assert killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(dspy.utils.exceptions.LMError, match="died|dead"):
        for _ in range(3):
            lm(f"Still there? {uuid.uuid4().hex}", cache=False)
            time.sleep(1)
    assert time.monotonic() - started < 30
