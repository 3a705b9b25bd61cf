"""Pure conversions (render.py, config.py): no engine."""

import io

import pytest
from dspy._vendor.lm15.types import image
from dspy.lm15 import Config, Message, Reasoning, Request, TextPart

from vllm_dspy_adapter.config import ModelSpec
from vllm_dspy_adapter.chat_template import render_chat
from vllm_dspy_adapter.errors import UnsupportedInputError
from vllm_dspy_adapter.lm.render import (
    config_to_sampling,
    generation_to_response,
    request_to_messages,
    split_reasoning,
)
from vllm_dspy_adapter.protocol import Generation, TokenLogprobData


def _request(**config):
    return Request(model="m", system="Be brief.",
                   messages=(Message.user("Hi"), Message.assistant("Hello"), Message.user("2+3?")),
                   config=Config(**config))


def test_messages_keep_roles_and_system():
    messages, images = request_to_messages(_request())
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+3?"},
    ]
    assert images == []


def test_image_parts_become_placeholders_and_pil_images():
    PIL = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    PIL.new("RGB", (4, 4), "red").save(buf, format="PNG")
    part = image(data=buf.getvalue(), media_type="image/png")
    request = Request(model="m", messages=(Message(role="user", parts=(TextPart("What colour?"), part)),))
    messages, images = request_to_messages(request)
    assert messages[0]["content"] == [{"type": "text", "text": "What colour?"}, {"type": "image"}]
    assert images[0].size == (4, 4)


def test_remote_image_url_is_refused_with_a_fix():
    request = Request(model="m", messages=(Message(role="user", parts=(image(url="https://x/y.png"),)),))
    with pytest.raises(UnsupportedInputError, match="offline"):
        request_to_messages(request)


def test_config_to_sampling_maps_every_field():
    config = Config(max_tokens=7, temperature=0.3, top_p=0.9, top_k=5, stop=("\n\n",), seed=3,
                    presence_penalty=0.1, frequency_penalty=0.2, logprobs=2)
    assert config_to_sampling(config) == {
        "max_tokens": 7, "temperature": 0.3, "top_p": 0.9, "top_k": 5, "seed": 3, "presence_penalty": 0.1,
        "frequency_penalty": 0.2, "stop": ["\n\n"], "logprobs": 2,
    }


def test_unset_fields_are_left_to_defaults():
    assert config_to_sampling(Config()) == {}


def test_response_format_becomes_structured_outputs():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    got = config_to_sampling(Config(response_format={"type": "json_schema", "schema": schema}))
    assert got == {"structured_outputs": {"json": schema}}
    got = config_to_sampling(Config(response_format={"type": "json_object"}))
    assert got == {"structured_outputs": {"json_object": True}}


def test_extensions_only_known_sampling_fields():
    config = Config(extensions={"repetition_penalty": 1.1})
    assert config_to_sampling(config, allowed={"repetition_penalty"}) == {"repetition_penalty": 1.1}
    with pytest.raises(UnsupportedInputError, match="sampling_params"):
        config_to_sampling(Config(extensions={"bogus": 1}), allowed={"repetition_penalty"})


@pytest.mark.parametrize("text,expected", [
    ("<think>plan</think>\n\nAnswer", ("plan", "Answer")),
    ("plan</think>Answer", ("plan", "Answer")),  # template opened the block in the prompt
    ("Just an answer", (None, "Just an answer")),
    ("<think>cut off while thinking", ("cut off while thinking", "")),
])
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_generation_to_response_has_text_thinking_usage_logprobs():
    generation = Generation(text="<think>hmm</think>5", finish_reason="length", num_prompt_tokens=10,
                            num_output_tokens=3, num_cached_tokens=4, request_id="r1", replica=1,
                            logprobs=[TokenLogprobData("5", -0.1, 20, [("5", -0.1, 20), ("6", -2.0, 21)])])
    response = generation_to_response(generation, model="vllm/x")
    assert response.text == "5"
    assert [p.type for p in response.message.parts] == ["thinking", "text"]
    assert response.finish_reason == "length"
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.cache_read_tokens) == (10, 3, 4)
    assert response.logprobs[0].token == "5" and response.logprobs[0].top[1].token == "6"


def test_render_chat_uses_the_template_and_its_switches():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kw):
            assert tokenize is False and add_generation_prompt is True
            return f"{messages[-1]['content']}|{kw.get('enable_thinking')}"

    assert render_chat(Tok(), [{"role": "user", "content": "q"}], {"enable_thinking": False}) == "q|False"


def test_render_chat_without_template_says_so():
    class Tok:
        chat_template = None

    with pytest.raises(UnsupportedInputError, match="chat template"):
        render_chat(Tok(), [{"role": "user", "content": "q"}])


def test_label_changes_with_output_settings_only():
    base = ModelSpec(model="/m", engine_kwargs={"max_model_len": 2048, "gpu_memory_utilization": 0.5})
    assert base.label().startswith("vllm/m@")
    faster = ModelSpec(model="/m", engine_kwargs={"max_model_len": 2048, "gpu_memory_utilization": 0.9})
    assert base.label() == faster.label()
    other_dtype = ModelSpec(model="/m", engine_kwargs={"max_model_len": 2048, "gpu_memory_utilization": 0.5,
                                                         "dtype": "float16"})
    assert base.label() != other_dtype.label()
    assert base.label() != ModelSpec(model="/m", engine_kwargs=base.engine_kwargs, sampling={"min_p": 0.1}).label()
    assert base.label() != ModelSpec(model="/m", engine_kwargs=base.engine_kwargs,
                                      chat_template_kwargs={"enable_thinking": False}).label()


def test_reasoning_off_is_a_config_field():
    # The LM turns Reasoning(effort="off") into Qwen3's enable_thinking=False.
    assert Config(reasoning=Reasoning(effort="off")).reasoning.is_off
