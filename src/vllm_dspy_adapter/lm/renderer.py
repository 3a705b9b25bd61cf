"""A DSPy request to an engine request and an engine's answer back to DSPy, for one
model: its tokenizer and chat template, its sampling fields, its tool parser, the
modalities it takes. Pure with respect to serving: no pool, no replica, no lifetime
(``dspy_engine.Runtime`` holds those and one ``Renderer``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..chat_template import render_chat
from ..config import ModelSpec, check_sampling_kwargs
from ..errors import ConfigurationError, UnsupportedInputError
from ..protocol import Generation, GenerationRequest, ModelFacts
from .modalities import check_modalities
from .render import config_to_sampling, generation_to_response, request_to_messages
from .tools import ToolCalling, ToolPlan, choose_parser, with_tool_calls

__all__ = ["Renderer", "Prepared"]


@dataclass
class Prepared:
    """A DSPy Request made ready: the engine request, its tool plan (None without
    tools) and whether the prompt opened a ``<think>`` block."""

    request: GenerationRequest
    plan: ToolPlan | None = None
    starts_in_thinking: bool = False
    label: str = ""  # the model label of the adapter the request was sent with (DSPyEngine._submit)


class Renderer:
    """Requests in, responses out, for one model (shared by an LM and all its copies)."""

    def __init__(self, spec: ModelSpec, facts: ModelFacts, modalities: tuple[str, ...],
                 tool_call_parser: str | None = None):
        self.spec = spec
        self.tokenizer = facts.tokenizer  # the driver's one tokenizer (the backend's, see Backend.model_facts)
        self.label = spec.label()
        self.model_name = spec.display_name
        self.modalities = modalities
        self.sampling_fields = facts.sampling_fields
        self._lock = threading.Lock()
        # The vLLM tool parser (None: native tool calls off), built on first use:
        # importing vLLM's serving layer takes seconds that a run without tools should not pay.
        self.tool_parser = choose_parser(tool_call_parser, self.tokenizer, model=self.model_name)
        self._tool_calling: ToolCalling | None = None

    def tool_calling(self) -> ToolCalling:
        with self._lock:
            if self._tool_calling is None:
                self._tool_calling = ToolCalling(self.tool_parser, self.tokenizer)
            return self._tool_calling

    def build(self, request) -> Prepared:
        """A DSPy Request to an engine request: chat template (with the request's
        tools), sampling options, images; refused before anything runs when the
        model cannot take it."""
        check_modalities(request, self.modalities, model=self.model_name)  # before anything is rendered
        plan = None
        if request.tools:
            if self.tool_parser is None:
                raise UnsupportedInputError(
                    f"Native tool calls are off for {self.model_name}: its chat template does not render tools, or "
                    "no vLLM tool parser reads its format. Pass tool_call_parser=NAME (as for `vllm serve "
                    "--tool-call-parser`) for a model whose template takes tools, or use dspy.ReAct / "
                    "ChatAdapter without use_native_function_calling (tools described in text).")
            plan = self.tool_calling().plan(request.tools, request.config.tool_choice)
        messages, images = request_to_messages(request)
        chat_kwargs = dict(self.spec.chat_template_kwargs)
        reasoning = request.config.reasoning
        if reasoning is not None and reasoning.is_off:
            chat_kwargs.setdefault("enable_thinking", False)  # Qwen3's switch; ignored by other templates
        prompt = render_chat(self.tokenizer, messages, chat_kwargs, tools=plan.tools if plan else None)
        sampling = {**self.spec.sampling, **config_to_sampling(request.config, allowed=self.sampling_fields),
                    **(plan.sampling if plan else {})}
        engine_request = GenerationRequest(prompt=prompt, sampling=sampling, chat=True, images=images)
        return Prepared(engine_request, plan, starts_in_thinking=prompt.rstrip().endswith("<think>"))

    def check_sampling(self, sampling: dict[str, Any]) -> None:
        """Refuse unknown or adapter-owned sampling options (vLLM's own rules) before
        anything is submitted; a backend whose ``ModelFacts`` takes any field checks none."""
        if self.sampling_fields is not None:
            check_sampling_kwargs(sampling)

    def prompt_request(self, prompt, sampling: dict[str, Any]) -> GenerationRequest:
        """A batch_generate prompt: raw text, token ids, or chat messages."""
        if isinstance(prompt, str):
            return GenerationRequest(prompt=prompt, sampling=sampling)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return GenerationRequest(prompt=list(prompt["prompt_token_ids"]), sampling=sampling)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
            text = render_chat(self.tokenizer, list(prompt), self.spec.chat_template_kwargs)
            return GenerationRequest(prompt=text, sampling=sampling, chat=True)
        raise ConfigurationError(
            f"A batch_generate prompt must be a string, a list of chat messages ({{'role': ..., 'content': ...}}) "
            f"or {{'prompt_token_ids': [...]}}; got {type(prompt).__name__}: {str(prompt)[:80]!r}"
        )

    def to_response(self, generation: Generation, plan: ToolPlan | None = None, label: str | None = None):
        response = generation_to_response(generation, model=label or self.label)
        return with_tool_calls(response, self.tool_calling(), plan) if plan is not None else response

    def parse_tools(self, plan: ToolPlan):
        """For a stream: the whole answer text to (content, tool calls), as ``to_response`` reads it."""
        return lambda text: self.tool_calling().parse(text, plan)

