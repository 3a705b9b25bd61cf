"""Chat messages to prompt text with the model's own chat template: the one rendering
the LM uses at inference and LoRA training uses for its examples (so an adapter
learns on exactly the prompts it will be served).
"""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedInputError

__all__ = ["render_chat"]


def render_chat(tokenizer, messages: list[dict[str, Any]], chat_template_kwargs: dict[str, Any] | None = None,
                tools: list[dict[str, Any]] | None = None) -> str:
    """Chat messages to prompt text with the model's own template, ready for generation.

    ``tools``: OpenAI-format function dicts (``tools.template_tools``), passed to the
    template as its ``tools`` variable, as ``vllm serve`` does."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UnsupportedInputError(
            "This model's tokenizer has no chat template, so DSPy's chat messages cannot be rendered. "
            "Use an instruct/chat model, or pass chat_template_kwargs / a tokenizer with a template."
        )
    extra = dict(chat_template_kwargs or {})
    if tools:
        extra["tools"] = tools
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
