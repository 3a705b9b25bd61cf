"""Native tool calls, as ``vllm serve --enable-auto-tool-choice --tool-call-parser NAME`` does them.

- ``template_tools``: a DSPy request's tools as the ``tools=`` a chat template takes
  (the OpenAI function format ``vllm serve`` hands to ``apply_chat_template``);
- ``assistant_tool_calls`` / ``tool_result_message``: earlier tool calls and their
  results in a conversation, as chat-template messages;
- ``choose_parser``: the vLLM tool parser for a model: the user's
  ``tool_call_parser=`` name (checked against vLLM's registry), or one picked from
  the model's chat template when ``"auto"``;
- ``ToolCalling``: one parser bound to a tokenizer; it adjusts a request's sampling
  the way the parser adjusts a server request (special tokens kept, structured
  outputs for ``tool_choice="required"`` or a named tool) and turns a finished
  answer into text plus lm15 ``ToolCallPart``s with vLLM's own parser.

No engine here: everything runs in the driver process, on the text an engine
returned, and vLLM is imported only when a parser is used.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .. import vllm_api
from ..errors import ConfigurationError, UnsupportedInputError

__all__ = [
    "AUTO",
    "ToolCalling",
    "assistant_tool_calls",
    "check_parser_name",
    "choose_parser",
    "known_parsers",
    "template_renders_tools",
    "template_tools",
    "tool_result_message",
    "with_tool_calls",
]

logger = logging.getLogger(__name__)

AUTO = "auto"

# Markers a chat template writes around tool calls, and the vLLM parser that reads
# that format back. Checked in order: the first marker found in the template wins.
_TEMPLATE_MARKERS: tuple[tuple[str, str], ...] = (
    ("<function=", "qwen3_xml"),          # Qwen3-Coder: <tool_call><function=name><parameter=...>
    ("<tool_call>", "hermes"),            # Qwen2.5 / Qwen3 / QwQ / Hermes: <tool_call>{json}</tool_call>
    ("[TOOL_CALLS]", "mistral"),          # Mistral / Mixtral / Ministral
    ("<|python_tag|>", "llama3_json"),    # Llama 3.1 / 3.2 / 3.3 JSON tool calls
    ("<|tool_call_start|>", "lfm2"),      # Liquid LFM2
    ("<|tool▁calls▁begin|>", "deepseek_v3"),
)


def known_parsers() -> list[str]:
    """Every tool parser name vLLM has registered (what ``--tool-call-parser`` takes)."""
    return vllm_api.tool_parser_names()


def check_parser_name(name: Any) -> str | None:
    """The ``tool_call_parser=`` argument, checked before any engine starts:
    ``"auto"``, ``None``/``False`` (off) or a registered vLLM parser name."""
    if name is None or name is False:
        return None
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"tool_call_parser must be a vLLM tool parser name, 'auto' or None; got {name!r}.")
    if name == AUTO:
        return AUTO
    names = known_parsers()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigurationError(
            f"Unknown tool_call_parser {name!r}.{hint} vLLM's tool parsers are: {', '.join(names)} "
            "(the names `vllm serve --tool-call-parser` takes); 'auto' picks one from the model's chat template."
        )
    return name


def template_renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads a ``tools`` variable at all."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one, or any that uses tools
        template = template.get("tool_use") or template.get("default") or ""
    return isinstance(template, str) and "tools" in template


def choose_parser(name: str | None, tokenizer, *, model: str) -> str | None:
    """The vLLM tool parser for this model, or None when native tool calls are off.

    ``name`` is the checked ``tool_call_parser=`` value. With ``"auto"``, a template
    that never reads ``tools`` means no native tool calls (DSPy then formats tools
    as text, as it does for any model without function calling); otherwise the
    tokenizer's ``response_template`` metadata (vLLM's ``hf`` parser) or the
    tool-call markers the template writes decide. A name given explicitly for a
    template that cannot show the model its tools is refused.
    """
    if name is None:
        return None
    renders = template_renders_tools(tokenizer)
    if name != AUTO:
        if not renders:
            raise ConfigurationError(
                f"tool_call_parser={name!r} was given, but the chat template of {model} never reads `tools`, "
                "so the model would not see the tools it is asked to call. Use a model whose chat template "
                "supports tools, or leave tool_call_parser unset (DSPy then describes tools in text)."
            )
        return name
    if not renders:
        return None
    if vllm_api.response_template_has_tools(tokenizer):
        return "hf"
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    for marker, parser in _TEMPLATE_MARKERS:
        if marker in template:
            return parser
    logger.info("%s: its chat template renders tools in a format no known vLLM tool parser reads; "
                "native tool calls are off (pass tool_call_parser=NAME to choose one)", model)
    return None


# --------------------------------------------------------------------------- request side


def template_tools(tools) -> list[dict[str, Any]]:
    """lm15 ``FunctionTool``s as the OpenAI function dicts chat templates take."""
    out = []
    for tool in tools:
        if getattr(tool, "type", None) != "function":
            raise UnsupportedInputError(
                f"Tool {getattr(tool, 'name', tool)!r} is a provider built-in tool ({getattr(tool, 'type', '?')}); "
                "a local model only takes function tools (dspy.Tool)."
            )
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        function["parameters"] = dict(tool.parameters or {"type": "object", "properties": {}})
        out.append({"type": "function", "function": function})
    return out


def assistant_tool_calls(parts) -> list[dict[str, Any]]:
    """An assistant message's ``ToolCallPart``s as template ``tool_calls`` (arguments
    as a dict: the convention of transformers' chat templates, which vLLM follows)."""
    return [{"id": p.id, "type": "function", "function": {"name": p.name, "arguments": dict(p.input)}}
            for p in parts if p.type == "tool_call"]


def tool_result_message(part) -> dict[str, Any]:
    """One ``ToolResultPart`` as a ``{"role": "tool"}`` template message."""
    texts = []
    for item in part.content:
        if item.type != "text":
            raise UnsupportedInputError(
                f"A tool result holds a {item.type!r} part; a local model's chat template takes text tool results."
            )
        texts.append(item.text)
    message: dict[str, Any] = {"role": "tool", "tool_call_id": part.id, "content": "".join(texts)}
    if part.name:
        message["name"] = part.name
    return message


def _openai_tool_choice(choice, tools: list[dict[str, Any]]):
    """lm15 ``ToolChoice`` to (OpenAI tool_choice, the tools it may pick from)."""
    if choice is None:
        return "auto", tools
    if choice.mode == "none":
        return "none", tools
    allowed = set(choice.allowed)
    offered = [t for t in tools if not allowed or t["function"]["name"] in allowed]
    if choice.mode == "required" and len(allowed) == 1:
        return {"type": "function", "function": {"name": next(iter(allowed))}}, offered
    return ("required" if choice.mode == "required" else "auto"), offered


# --------------------------------------------------------------------------- parsing


@dataclass
class ToolPlan:
    """One request with tools: the template's tools, vLLM's view of the request
    (what its parser reads), the sampling options the parser asks for, and the
    request's own parser (vLLM's serving layer holds one per request)."""

    tools: list[dict[str, Any]]
    server_request: Any
    parser: Any
    sampling: dict[str, Any] = field(default_factory=dict)


class ToolCalling:
    """A vLLM tool parser, chosen once per LM and bound to the model's tokenizer.

    vLLM's unified ``Parser`` (what ``vllm serve`` builds from ``--tool-call-parser``
    with ``--enable-auto-tool-choice``) does the work: ``plan`` adjusts a request
    as the server does (special tokens kept where the markers are special tokens,
    a structural tag for ``tool_choice="required"`` or a named tool), ``parse``
    reads a finished answer with the parser's non-streaming path.
    """

    def __init__(self, parser_name: str, tokenizer):
        self.name = parser_name
        self._tokenizer = tokenizer
        self._parser_cls = vllm_api.parser_class(parser_name, tokenizer)

    def plan(self, request_tools, tool_choice) -> ToolPlan:
        tools = template_tools(request_tools)
        choice, offered = _openai_tool_choice(tool_choice, tools)
        parallel = tool_choice.parallel if tool_choice is not None else None
        server_tools = offered
        if choice not in ("auto", "none"):
            # A forced call is only useful if its arguments fit the tool: its schema
            # constrains them too (the per-tool `strict` of the OpenAI format).
            server_tools = [{**t, "function": {**t["function"], "strict": True}} for t in offered]
        server = vllm_api.chat_completion_request(
            messages=[{"role": "user", "content": ""}], model=self.name, tools=server_tools, tool_choice=choice,
            **({} if parallel is None else {"parallel_tool_calls": parallel}),
        )
        parser = self._parser_cls(self._tokenizer, server.tools)
        server = parser.adjust_request(server)
        sampling: dict[str, Any] = {}
        if not server.skip_special_tokens:
            sampling["skip_special_tokens"] = False  # tool-call markers are special tokens in some models
        structured = server.structured_outputs
        if structured is not None:
            sampling["structured_outputs"] = {k: v for k, v in _structured_fields(structured).items()
                                              if v is not None}
        return ToolPlan(tools=offered, server_request=server, parser=parser, sampling=sampling)

    def parse(self, text: str, plan: ToolPlan) -> tuple[str, list[Any]]:
        """A finished answer (its reasoning already split off) to (text content,
        lm15 ``ToolCallPart``s), as ``vllm serve`` returns them for the request."""
        from dspy.lm15 import ToolCallPart

        _, content, calls = plan.parser.parse(text, plan.server_request, enable_auto_tools=True)
        parts = []
        for index, call in enumerate(calls or ()):
            try:
                args = json.loads(call.arguments) if call.arguments else {}
            except ValueError:
                args = None
            if not isinstance(args, dict):
                logger.warning("tool call %r: its arguments are not a JSON object (%.200r); the answer is kept as text",
                               call.name, call.arguments)
                return text, []
            parts.append(ToolCallPart(id=call.id or f"call_{index}", name=call.name, input=args))
        return (content or "").strip() if parts else (content if content is not None else text), parts


def _structured_fields(params) -> dict[str, Any]:
    """A ``StructuredOutputsParams`` as plain keyword arguments (it crosses processes)."""
    names = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
    return {name: getattr(params, name, None) for name in names}


def with_tool_calls(response, calling: ToolCalling, plan: ToolPlan):
    """A ``Response`` whose answer holds tool calls, rewritten as ``vllm serve``
    returns it: the text before the calls, then one ``ToolCallPart`` per call,
    and ``finish_reason="tool_call"``. An answer without calls is returned as is."""
    import dataclasses

    from dspy.lm15 import Message, TextPart

    parts = list(response.message.parts)
    at = next((i for i, p in enumerate(parts) if p.type == "text"), None)
    if at is None:
        return response
    content, calls = calling.parse(parts[at].text, plan)
    if not calls:
        return response
    rebuilt = parts[:at] + [TextPart(content)] + calls + parts[at + 1:]
    finish = "tool_call" if response.finish_reason == "stop" else response.finish_reason
    # The scores cover the whole answer, calls included: not the text kept here.
    complete = response.logprobs_complete and response.logprobs is None
    return dataclasses.replace(response, message=Message.assistant(rebuilt), finish_reason=finish,
                               logprobs_complete=complete)
