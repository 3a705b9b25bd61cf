"""A DSPy LM call with chat messages, as DSPy 3.4 writes it.

DSPy 3.4.1 deprecates ``lm(messages=[{"role": ..., "content": ...}, ...])`` (removed in 3.5):
a call with chat messages passes an lm15 ``Request`` (``lm(request)``) and gets an lm15
``Response``. ``chat_request`` builds that Request from OpenAI-style messages with DSPy's own
reader, ``dspy.lm15.request_from_openai_chat`` (what DSPy 3.4 runs on every
``lm(messages=...)`` call, so the engine receives the same Request), under the LM's default
settings and then the call's: an explicit Request takes its settings from its ``config``
only, not from the LM. The conversion runs in the calling thread, inside a measured call,
where DSPy's own conversion ran.
"""

from __future__ import annotations

from typing import Any

# What DSPy keeps out of a request body built from an LM's settings (execution._canonical):
# call controls, and the client settings of its own engines (backend_selection.CLIENT_KEYS).
_NOT_SENT = frozenset({"n", "rollout_id", "num_generations", "prompt_cache", "api_key", "api_base", "base_url",
                       "headers", "extra_headers", "timeout", "api_version", "azure_ad_token_provider",
                       "organization", "project", "extra_query", "custom_llm_provider"})


def chat_request(lm, messages: list[dict[str, Any]], **kwargs: Any):
    """``lm(messages=messages, **kwargs)``'s Request: the LM's settings, then ``kwargs``."""
    from dspy import lm15

    settings = {k: v for k, v in {**lm.kwargs, **kwargs}.items() if v is not None and k not in _NOT_SENT}
    return lm15.request_from_openai_chat({"model": lm.model, "messages": list(messages), **settings})


def chat_call(lm, messages: list[dict[str, Any]], **kwargs: Any) -> list[str | None]:
    """What ``lm(messages=messages, **kwargs)`` returned for a text answer: ``[text]``."""
    return [lm(chat_request(lm, messages, **kwargs)).text]
