"""The request and result types that travel between the DSPy side, the router
and the replicas (possibly in another process, so everything here is plain,
picklable data with no vLLM objects in it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["GenerationRequest", "Generation", "TokenLogprobData"]


@dataclass
class GenerationRequest:
    """One prompt ready for an engine.

    ``prompt`` is the final text (chat template already applied when ``chat`` is
    true) or a list of token ids. ``sampling`` holds ``SamplingParams`` keyword
    arguments; ``max_tokens=None`` means "the rest of the context window", which
    only the engine can compute once it has tokenised the prompt.
    """

    prompt: str | list[int]
    sampling: dict[str, Any] = field(default_factory=dict)
    chat: bool = False
    images: list[Any] = field(default_factory=list)

    def estimated_prompt_tokens(self) -> int:
        # Routing needs a load estimate before any tokeniser runs; four
        # characters a token is close enough for English and code.
        if isinstance(self.prompt, str):
            return max(1, len(self.prompt) // 4)
        return len(self.prompt)

    def estimated_output_tokens(self) -> int:
        max_tokens = self.sampling.get("max_tokens")
        return int(max_tokens) if max_tokens else 256


@dataclass
class TokenLogprobData:
    token: str
    logprob: float
    token_id: int | None = None
    top: list[tuple[str, float, int | None]] = field(default_factory=list)


@dataclass
class Generation:
    """What one finished request produced, as plain data."""

    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobData] | None = None
    replica: int = 0
    request_id: str = ""
