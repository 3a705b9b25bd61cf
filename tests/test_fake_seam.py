"""The public test seam: ``backend=FakeBackend(handler)`` on both LM classes, through public
API only. The handler's contract (str, Generation, pieces, exceptions), what the LM asks of a
backend before a start (``Backend.model_facts``), and that none of it needs vLLM."""

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading

import dspy
import pytest
from dspy.lm15 import Config, Message, Request

from vllm_dspy_adapter import (ConfigurationError, FakeBackend, FakeTokenizer, Generation, PromptTooLongError,
                               StreamPiece, UnsupportedInputError, vLLMOffline, vLLMOfflineMultiGPU)
from vllm_dspy_adapter.lm.dspy_engine import AsyncDSPyEngine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _request(text="hi", **config):
    return Request(model="m", messages=(Message.user(text),), config=Config(**{"max_tokens": 8, **config}))


def test_a_string_answers_and_the_prompt_is_the_templates_rendering():
    seen = []
    with vLLMOffline(backend=FakeBackend(lambda r: seen.append(r) or "four"), cache=False) as lm:
        assert lm("What is 2 + 2?") == ["four"]
    (request,) = seen
    assert request.chat and request.prompt == FakeTokenizer().apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}])
    assert request.prompt.endswith("<|im_start|>assistant\n")


def test_a_generation_is_taken_as_it_is_with_its_id_and_replica_filled_in():
    answer = Generation(text="ok", finish_reason="length", num_prompt_tokens=7, num_output_tokens=3)
    with vLLMOffline(backend=FakeBackend(lambda r: answer), cache=False) as lm:
        response = lm.engine.complete(_request())
    assert response.text == "ok" and response.finish_reason == "length"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 3)


def test_pieces_stream_one_by_one_sync_and_async_and_add_up_to_the_answer():
    handler = lambda r: ["Hel", "lo ", StreamPiece("world", 2)]  # noqa: E731
    with vLLMOffline(backend=FakeBackend(handler), cache=False) as lm:
        events = list(lm.engine.stream(_request()))
        deltas = [e.delta.text for e in events if e.type == "delta"]
        assert [events[0].type, events[-1].type] == ["start", "end"] and deltas == ["Hel", "lo ", "world"]
        assert events[-1].usage.output_tokens == 3
        assert lm.engine.complete(_request()).text == "Hello world"

        async def collect():
            return [e.delta.text async for e in AsyncDSPyEngine(lm.engine.runtime).stream(_request())
                    if e.type == "delta"]

        assert asyncio.run(collect()) == deltas


def test_streamify_reads_a_field_in_pieces():
    pieces = ["[[ ## answer ## ]]\n", "forty", " two", "\n\n[[ ## completed ## ]]"]
    listener = dspy.streaming.StreamListener(signature_field_name="answer")
    program = dspy.streamify(dspy.Predict("question -> answer"), stream_listeners=[listener], async_streaming=False)
    with vLLMOffline(backend=FakeBackend(lambda r: pieces), cache=False) as lm, dspy.context(lm=lm):
        items = list(program(question="q"))
    chunks = [i.chunk for i in items if isinstance(i, dspy.streaming.StreamResponse)]
    assert "".join(chunks).strip() == "forty two" and len(chunks) >= 2
    assert items[-1].answer == "forty two"


@pytest.mark.parametrize("error, dspy_error", [
    (PromptTooLongError("too long"), dspy.ContextWindowExceededError),
    (UnsupportedInputError("no such input"), Exception),
])
def test_an_exception_fails_the_call_through_the_error_table(error, dspy_error):
    def raising(request):
        raise error

    for handler in (raising, lambda r: error):  # raised or returned: the same
        with vLLMOffline(backend=FakeBackend(handler), cache=False) as lm, dspy.context(lm=lm):
            with pytest.raises(dspy_error, match=str(error)):
                dspy.Predict("question -> answer")(question="q")


def test_every_answer_names_the_adapter_its_request_carried():
    with vLLMOffline(backend=FakeBackend(lambda r: f"from {r.adapter}"), cache=False) as lm:
        response = lm.engine.complete(_request())
    assert response.text == "from None" and response.provider_data["adapter"] is None


def test_calls_run_at_once_on_the_replicas_threads_and_a_timed_out_one_is_aborted():
    release = threading.Event()
    arrived = threading.Barrier(8, timeout=10)

    def blocking(request):
        if "wait" in request.prompt:
            release.wait(10)
            return "late"
        arrived.wait()  # eight requests in the handler at once, or the barrier breaks
        return "ok"

    backend = FakeBackend(blocking)
    with vLLMOffline(backend=backend, cache=False) as lm:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # eight DSPy threads, each one call
            answers = list(pool.map(lambda i: lm(f"x{i}"), range(8)))
        assert answers == [["ok"]] * 8  # all eight were in the handler together (else the barrier broke)

        async def gives_up():
            await asyncio.wait_for(lm.acall("please wait"), timeout=0.5)

        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(gives_up())
        assert len(backend.replicas[0].aborted) == 1
        release.set()


def test_several_fake_replicas_under_the_real_pool_and_a_crashed_one_comes_back():
    backend = FakeBackend(lambda r: r.prompt[::-1], replicas=3)
    with vLLMOfflineMultiGPU(backend=backend, routing="round_robin", max_restarts=1) as lm:
        prompts = [f"p{i}" for i in range(9)]
        assert lm.batch_generate(prompts, progress=False) == [p[::-1] for p in prompts]
        assert [row["routed"] for row in lm.stats()] == [3, 3, 3]
        backend.replicas[1].crash("a test crash")
        assert lm.batch_generate(prompts, progress=False) == [p[::-1] for p in prompts]
        assert backend.restarts == 1 and lm.num_replicas == 3


def test_the_models_own_folder_gives_its_tokenizer_and_template(default_model):
    seen = []
    with vLLMOffline(default_model, backend=FakeBackend(lambda r: seen.append(r) or "ok"), cache=False) as lm:
        lm("hello")
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(default_model).apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert seen[0].prompt == expected


def test_an_injected_tokenizer_renders_and_the_reported_length_is_the_lms():
    class Shouting(FakeTokenizer):
        def apply_chat_template(self, messages, **kwargs):
            return super().apply_chat_template(messages, **kwargs).upper()

    seen = []
    backend = FakeBackend(lambda r: seen.append(r.prompt) or "ok", tokenizer=Shouting(), max_model_len=512)
    with vLLMOffline(backend=backend, cache=False) as lm:
        lm("quiet")
        assert lm.max_model_len == 512
    assert "QUIET" in seen[0]


def test_an_image_is_refused_before_any_request_unless_the_fake_takes_images():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    png = dspy.Image(buffer.getvalue())
    describe = dspy.Predict("picture: dspy.Image -> description")
    backend = FakeBackend(lambda r: "[[ ## description ## ]]\nred\n\n[[ ## completed ## ]]")
    with vLLMOffline(backend=backend, cache=False) as lm, dspy.context(lm=lm):
        with pytest.raises(dspy.LMUnsupportedFeatureError, match="takes no image input"):
            describe(picture=png)
    assert backend.replicas[0].served == []  # refused before it was submitted
    seeing = FakeBackend(lambda r: "[[ ## description ## ]]\nred\n\n[[ ## completed ## ]]", modalities=("image",))
    with vLLMOffline(backend=seeing, cache=False) as lm, dspy.context(lm=lm):
        assert describe(picture=png).description == "red"
    assert len(seeing.replicas[0].served[0].images) == 1


def test_bad_backends_and_placement_beside_a_backend_object_are_refused_before_anything_runs():
    with pytest.raises(ConfigurationError, match="Backend contract"):
        vLLMOffline(backend=object())
    with pytest.raises(ConfigurationError, match="placement belongs to the backend"):
        vLLMOfflineMultiGPU(backend=FakeBackend(lambda r: "x"), num_replicas=2)
    with pytest.raises(TypeError, match="replicas=N"):
        FakeBackend(3)


def test_a_program_on_the_fake_needs_no_vllm_torch_or_transformers():
    """The example test a user copies, in a fresh interpreter where vLLM cannot be imported."""
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import pytest\n"
            f"rc = pytest.main(['-q', '-p', 'no:cacheprovider', {os.path.join(ROOT, 'examples', 'test_program_with_fake_backend.py')!r}])\n"
            "heavy = sorted(m for m in ('vllm', 'torch', 'transformers') if sys.modules.get(m) is not None)\n"
            "print('heavy modules:', heavy)\n"
            "sys.exit(rc or (1 if heavy else 0))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "4 passed" in run.stdout and "heavy modules: []" in run.stdout
