"""Issue 14's features on real vLLM (CPU build) with the default text-only model and real
DSPy programs: clear multimodal errors (and, as they land, token streaming and tools).
One engine for the whole module."""

import io
import uuid

import dspy
import pytest

from conftest import ENGINE_KWARGS
from vllm_dspy_adapter import vLLMOffline

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def lm(default_model):
    lm = vLLMOffline(temperature=0.0, max_tokens=64, **ENGINE_KWARGS)
    yield lm
    lm.shutdown()


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_to_text_only_model_is_a_clear_error_and_the_lm_keeps_serving(lm):
    before = lm.stats()[0]
    describe = dspy.Predict("picture: dspy.Image -> description")
    with dspy.context(lm=lm), pytest.raises(dspy.LMUnsupportedFeatureError) as info:
        describe(picture=dspy.Image(_png()))
    message = str(info.value)
    assert "SmolLM2-135M-Instruct takes no image input" in message, message
    assert "concatenate" not in message
    after = lm.stats()[0]
    # Refused before anything was submitted: the engine saw no request, not even a failed one.
    assert (after["requests"], after["failed"]) == (before["requests"], before["failed"])
    with dspy.context(lm=lm):
        answer = dspy.Predict("question -> answer")(question=f"What is 2 + 3? ({uuid.uuid4().hex[:6]})").answer
    assert isinstance(answer, str) and answer.strip()
    assert lm.stats()[0]["requests"] > after["requests"]
