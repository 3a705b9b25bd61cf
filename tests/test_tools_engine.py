"""Native tool calls end to end on real vLLM (CPU build) and real DSPy: the Qwen3 chat
template path (tools rendered by the template, answers read by vLLM's hermes parser).

The default model's weights with its own (ChatML) vocabulary, and Qwen3's tool-calling
chat template in place of its plain one: the same tokens frame both. A 135M model does
not decide to call tools on its own, so the calls here are requested with
``tool_choice="required"``: vLLM's structural tag then constrains decoding to the
parser's ``<tool_call>`` format, exactly as ``vllm serve`` does for that choice.
"""

import json
import shutil
import uuid

import dspy
import pytest

from conftest import ENGINE_KWARGS
from vllm_dspy_adapter import vLLMOffline

pytestmark = pytest.mark.engine


def _qwen3_template() -> str:
    from benchmarks.bench_models import QWEN3_CHAT_TEMPLATE

    return QWEN3_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tokenizer_with_tools(default_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2-qwen3-template")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(f"{default_model}/{name}", folder / name)
    (folder / "chat_template.jinja").write_text(_qwen3_template())
    return str(folder)


@pytest.fixture(scope="module")
def lm(tokenizer_with_tools):
    lm = vLLMOffline(tokenizer=tokenizer_with_tools, temperature=0.0, max_tokens=64, cache=False, **ENGINE_KWARGS)
    yield lm
    lm.shutdown()


def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"sunny in {city}"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Ask(dspy.Signature):
    question: str = dspy.InputField()
    tools: list[dspy.Tool] = dspy.InputField()
    answer: str = dspy.OutputField()
    tool_calls: dspy.ToolCalls = dspy.OutputField()


def test_auto_picks_hermes_from_the_template(lm):
    assert lm.engine.runtime.renderer.tool_parser == "hermes"
    assert lm.supports_function_calling is True


def test_a_required_call_comes_back_as_a_native_tool_call(lm):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    [out] = lm(f"Weather in Paris? ({uuid.uuid4().hex[:6]})", tools=tools, tool_choice="required")
    [call] = out["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_dspy_native_function_calling_with_two_tools(lm):
    adapter = dspy.ChatAdapter(use_native_function_calling=True)
    with dspy.context(lm=lm, adapter=adapter):
        prediction = dspy.Predict(Ask)(question=f"What is 2 + 3? ({uuid.uuid4().hex[:6]})",
                                       tools=[dspy.Tool(get_weather), dspy.Tool(add)],
                                       config={"tool_choice": "required"})
    calls = prediction.tool_calls.tool_calls
    assert calls and all(c.name in {"get_weather", "add"} for c in calls)
    # A forced call's arguments are held to its tool's schema, so every call runs.
    tools = [dspy.Tool(get_weather), dspy.Tool(add)]
    results = [call.execute(functions=tools) for call in calls]
    assert all(r is not None for r in results), results


def test_the_engine_prompt_holds_both_tools_through_the_template(lm):
    from dspy.lm15 import Config, FunctionTool, Message, Request, ToolChoice

    request = Request(model="m", messages=(Message.user("What is 2 + 3?"),), config=Config(
        tool_choice=ToolChoice(mode="required")), tools=(
        FunctionTool(name="get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}}),
        FunctionTool(name="add", parameters={"type": "object", "properties": {"a": {"type": "integer"}}})))
    prepared = lm.engine.runtime.renderer.build(request)
    prompt = prepared.request.prompt
    assert "# Tools" in prompt and '"name": "add"' in prompt and '"name": "get_weather"' in prompt
    assert "structural_tag" in prepared.request.sampling["structured_outputs"]
    assert prepared.request.sampling["skip_special_tokens"] is False


def test_a_streamed_request_with_tools_ends_with_its_tool_calls(lm):
    from dspy._vendor.lm15.result import StreamAccumulator
    from dspy.clients.engines.stream_guard import checked_stream
    from dspy.lm15 import Config, FunctionTool, Message, Request, ToolChoice

    request = Request(model="m", messages=(Message.user(f"Weather in Oslo? ({uuid.uuid4().hex[:6]})"),),
                      tools=(FunctionTool(name="get_weather", parameters={
                          "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),),
                      config=Config(tool_choice=ToolChoice(mode="required"), max_tokens=64, temperature=0.0))
    events = list(checked_stream(iter(lm.engine.stream(request)), provider="vllm"))
    calls = [e.delta for e in events if e.type == "delta" and e.delta.type == "tool_call"]
    assert [c.name for c in calls] == ["get_weather"] and "city" in json.loads(calls[0].input)
    assert events[-1].type == "end" and events[-1].finish_reason == "tool_call"
    accumulator = StreamAccumulator(request)
    for event in events:
        accumulator.push(event)
    [part] = [p for p in accumulator.response().message.parts if p.type == "tool_call"]
    assert part.name == "get_weather" and "city" in part.input
