"""Pure conversions between DSPy's canonical request/response types and what a
vLLM engine takes and gives. No engine calls here, so every function is tested
on its own (tests/test_render.py).

- ``request_to_messages``: a ``dspy.lm15.Request`` to chat messages (and images)
- ``render_chat``: chat messages to the model's prompt text through its template
- ``config_to_sampling``: ``Request.config`` to ``SamplingParams`` keyword arguments
- ``generation_to_response``: an engine result to a ``dspy.lm15.Response``
"""

from __future__ import annotations

import base64
import io
from typing import Any

from ..errors import UnsupportedInputError
from ..protocol import Generation
from .tools import assistant_tool_calls, tool_result_message

__all__ = [
    "request_to_messages",
    "config_to_sampling",
    "generation_to_response",
    "split_reasoning",
    "to_finish_reason",
]

# The thinking block of Qwen3, DeepSeek-R1 and their kin.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # one definition: stream_events uses them too


def _part_text(parts) -> str:
    return "".join(getattr(p, "text", "") or "" for p in parts)


def _load_image(part) -> Any:
    """An lm15 ImagePart to a PIL image (the form vLLM's multimodal input takes)."""
    from PIL import Image

    if part.data:
        raw = base64.b64decode(part.data.split(",", 1)[-1] if part.data.startswith("data:") else part.data)
        return Image.open(io.BytesIO(raw)).convert("RGB")
    if part.path:
        return Image.open(part.path).convert("RGB")
    if part.url and part.url.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(part.url.split(",", 1)[1]))).convert("RGB")
    raise UnsupportedInputError(
        "Images must be inline (base64 data or a data: URL) or a local path: vLLM runs offline here "
        f"and does not fetch {part.url!r}. Load the image and pass dspy.Image(<bytes or PIL image>)."
    )


def request_to_messages(request) -> tuple[list[dict[str, Any]], list[Any]]:
    """A DSPy ``Request`` to (chat messages, images).

    Messages are HF chat-template dicts. A message with images gets list content
    (``{"type": "image"}`` placeholders beside ``{"type": "text"}``), which is what
    vision models' templates expect; text-only messages keep string content so
    every text model's template accepts them. Earlier tool calls become the
    assistant message's ``tool_calls`` and tool results ``{"role": "tool"}``
    messages, as ``vllm serve`` hands them to the template. The request's
    ``tools`` are not read here (``tools.template_tools`` renders them).
    """
    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else _part_text(request.system)
        messages.append({"role": "system", "content": system})
    for message in request.messages:
        role = message.role
        if role == "developer":
            # Open models have no developer role; their system role is the same authority.
            role = "system"
        if role == "tool":
            messages.extend(tool_result_message(p) for p in message.parts if p.type == "tool_result")
            continue
        content: list[dict[str, Any]] = []
        for part in message.parts:
            kind = part.type
            if kind == "tool_call":
                continue  # collected below, as the message's tool_calls
            if kind == "text":
                content.append({"type": "text", "text": part.text})
            elif kind == "image":
                images.append(_load_image(part))
                content.append({"type": "image"})
            elif kind == "thinking":
                continue  # earlier reasoning is not fed back, as chat templates of reasoning models do
            else:
                raise UnsupportedInputError(
                    f"A {kind!r} part in a {message.role} message is not supported by vLLMOffline "
                    "(supported: text and images)."
                )
        if any(c["type"] != "text" for c in content):
            entry: dict[str, Any] = {"role": role, "content": content}
        else:
            entry = {"role": role, "content": "".join(c["text"] for c in content)}
        calls = assistant_tool_calls(message.parts)
        if calls:
            entry["tool_calls"] = calls
        messages.append(entry)
    return messages, images


# lm15 Config fields that are SamplingParams fields of the same name and meaning.
SAME_NAMED = ("max_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty")
# Every Config field a request may set (the engine's supported_params): those, stop, logprobs and
# response_format (converted below), and n, top_logprobs (which DSPy itself handles around the call).
SUPPORTED_PARAMS = frozenset({*SAME_NAMED, "stop", "logprobs", "top_logprobs", "response_format", "n"})


def config_to_sampling(config, *, allowed: frozenset[str] | set[str] | None = None) -> dict[str, Any]:
    """``Request.config`` (an lm15 ``Config``) to ``SamplingParams`` keyword arguments.

    Only fields the request actually set appear, so the LM's own defaults (the
    model's generation config, then ``sampling_params=`` at construction) fill the
    rest. ``allowed`` is the set of SamplingParams field names; vLLM-only options
    that DSPy forwards in ``Config.extensions`` are accepted when they are in it.
    """
    out: dict[str, Any] = {}
    for name in SAME_NAMED:
        value = getattr(config, name)
        if value is not None:
            out[name] = value
    if config.stop:
        out["stop"] = list(config.stop)
    if config.logprobs is not None:
        # lm15: 0 = the chosen tokens only, n = also the top n; vLLM's logprobs=n
        # returns the chosen token plus the top n, so the numbers carry over.
        out["logprobs"] = config.logprobs
    fmt = config.response_format
    if fmt is not None:
        if fmt.get("type") == "json_object":
            out["structured_outputs"] = {"json_object": True}
        else:
            out["structured_outputs"] = {"json": fmt["schema"]}
    # config.tool_choice is read with the request's tools (tools.ToolCalling.plan).
    for name, value in (config.extensions or {}).items():
        if allowed is not None and name not in allowed:
            raise UnsupportedInputError(
                f"Unknown sampling option {name!r} for vLLM. vLLM-only options "
                "(repetition_penalty, min_p, ignore_eos, ...) are set once: vLLMOffline(..., sampling_params={...})."
            )
        out[name] = value
    return out


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split a ``<think>...</think>`` block off the answer.

    Reasoning models emit the block first; some chat templates open it in the
    prompt, so the text may start inside the block with only the closing tag.
    """
    close = text.find(THINK_CLOSE)
    if close < 0:
        if text.lstrip().startswith(THINK_OPEN):
            # Cut off (finish_reason "length") while still thinking: no answer yet.
            return text.lstrip()[len(THINK_OPEN):].strip(), ""
        return None, text
    thinking = text[:close]
    open_at = thinking.find(THINK_OPEN)
    if open_at >= 0:
        thinking = thinking[open_at + len(THINK_OPEN):]
    return thinking.strip(), text[close + len(THINK_CLOSE):].lstrip()


_FINISH = {"stop": "stop", "length": "length", "abort": "error", None: "stop"}


def to_finish_reason(reason: str | None) -> str:
    return _FINISH.get(reason, "stop")


def generation_to_response(generation: Generation, *, model: str, reasoning: bool = True):
    """An engine result to a ``dspy.lm15.Response`` (text, thinking, usage, logprobs)."""
    from dspy.lm15 import Message, Response, TextPart, ThinkingPart, TokenLogprob, TopLogprob, Usage

    thinking, answer = split_reasoning(generation.text) if reasoning else (None, generation.text)
    parts: list[Any] = []
    if thinking:
        parts.append(ThinkingPart(thinking))
    parts.append(TextPart(answer))
    logprobs = None
    if generation.logprobs is not None:
        logprobs = tuple(
            TokenLogprob(
                token=lp.token,
                logprob=float(lp.logprob),
                token_id=lp.token_id,
                top=tuple(TopLogprob(token=t, logprob=float(v), token_id=i) for t, v, i in lp.top),
            )
            for lp in generation.logprobs
        )
    usage = Usage(
        input_tokens=generation.num_prompt_tokens,
        output_tokens=generation.num_output_tokens,
        cache_read_tokens=generation.num_cached_tokens or None,
    )
    return Response(
        id=generation.request_id or None,
        model=model,
        message=Message.assistant(parts),
        finish_reason=to_finish_reason(generation.finish_reason),
        usage=usage,
        logprobs=logprobs,
        provider_data={"replica": generation.replica, "adapter": generation.adapter},
    )
