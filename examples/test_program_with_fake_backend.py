"""Testing a DSPy program's plumbing with no model and no vLLM: copy this file next to your
program and run ``pytest test_program_with_fake_backend.py`` (about a second).

``FakeBackend(handler)`` stands where the engines would: the real LM class, DSPy's
adapters, cache, threads and ``batch_generate`` all run; ``handler`` answers each
request (a ``GenerationRequest``: the prompt as the chat template rendered it, the
sampling options, the adapter). docs/VLLM_OFFLINE_GUIDE.md, "Testing without a model".
"""

import dspy
import pytest

from vllm_dspy_adapter import FakeBackend, GenerationRequest, vLLMOffline, vLLMOfflineMultiGPU


class QA(dspy.Module):
    """The program under test: a question goes through a ChainOfThought and a check."""

    def __init__(self):
        super().__init__()
        self.answer = dspy.ChainOfThought("question -> answer: int")

    def forward(self, question):
        prediction = self.answer(question=question)
        return dspy.Prediction(answer=prediction.answer, ok=prediction.answer >= 0)


def chat_adapter_reply(**fields) -> str:
    """An answer in DSPy's ChatAdapter format, field by field."""
    return "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in fields.items()) + "[[ ## completed ## ]]"


def arithmetic(request: GenerationRequest) -> str:
    """The fake model: reads the question out of the rendered prompt and answers it."""
    question = request.prompt.rsplit("[[ ## question ## ]]", 1)[1].split("\n")[1]
    a, b = (int(x) for x in question.rstrip("?").split(" + "))
    return chat_adapter_reply(reasoning="Add them.", answer=a + b)


@pytest.fixture
def lm():
    with vLLMOffline(backend=FakeBackend(arithmetic), cache=False) as lm:
        yield lm


def test_the_program_parses_the_models_answer(lm):
    with dspy.context(lm=lm):
        result = QA()(question="2 + 3?")
    assert result.answer == 5 and result.ok
    assert lm.history[-1]["response"].provider_data["adapter"] is None  # the base model answered


def test_evaluate_from_threads_scores_every_example(lm):
    devset = [dspy.Example(question=f"{i} + {i}?", answer=2 * i).with_inputs("question") for i in range(20)]
    evaluate = dspy.Evaluate(devset=devset, metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
                             num_threads=8, display_progress=False)
    with dspy.context(lm=lm):
        assert evaluate(QA()).score == 100.0


def test_a_model_error_reaches_the_program_as_dspys_own():
    def too_long(request):
        from vllm_dspy_adapter import PromptTooLongError

        return PromptTooLongError("the prompt has 5000 tokens; this model's context is 2048")

    with vLLMOffline(backend=FakeBackend(too_long), cache=False) as lm, dspy.context(lm=lm):
        with pytest.raises(dspy.ContextWindowExceededError):
            QA()(question="1 + 1?")


def test_batch_generate_keeps_input_order_over_several_replicas():
    with vLLMOfflineMultiGPU(backend=FakeBackend(lambda r: r.prompt.upper(), replicas=3)) as lm:
        prompts = [f"prompt {i}" for i in range(30)]
        assert lm.batch_generate(prompts, progress=False) == [p.upper() for p in prompts]
        assert all(row["routed"] > 0 for row in lm.stats())  # every replica served some
