"""The vLLM side of the wire types (vLLM imported lazily, no engine state):
a ``GenerationRequest`` becomes the prompt and ``SamplingParams`` of one
``AsyncLLM.generate`` call, and the finished ``RequestOutput`` becomes a
``Generation``. The checks that refuse a request before vLLM sees it (an image
for a text-only model, a prompt longer than ``max_model_len``, sampling options
vLLM does not take) live here, so every backend refuses them alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import vllm_api
from .errors import PromptTooLongError, UnsupportedInputError
from .protocol import Generation, GenerationRequest, TokenLogprobData

__all__ = ["to_vllm_inputs", "to_generation"]


def to_vllm_inputs(request: GenerationRequest, tokenize: Callable[[GenerationRequest], list[int]], *, model: str,
                   max_model_len: int, model_defaults: dict[str, Any], is_multimodal: bool, streamed: bool = False):
    """``(prompt, SamplingParams)`` for ``AsyncLLM.generate``. ``streamed``: DELTA
    outputs (each new piece of text as it is decoded), else FINAL_ONLY."""
    if request.images and not is_multimodal:
        raise UnsupportedInputError(
            f"{model} is a text-only model and cannot take images. "
            "Use a vision-language model (for example Qwen/Qwen2.5-VL-3B-Instruct)."
        )
    if request.images:
        # Let vLLM's processor expand the image placeholders into tokens.
        prompt: Any = {"prompt": request.prompt, "multi_modal_data": {"image": request.images}}
        n_prompt = 0
    else:
        ids = tokenize(request)
        n_prompt = len(ids)
        if n_prompt >= max_model_len:
            raise PromptTooLongError(
                f"The prompt has {n_prompt} tokens but max_model_len is {max_model_len}: "
                "shorten the input (fewer demos, shorter fields) or start the LM with a larger max_model_len."
            )
        prompt = {"prompt_token_ids": ids}
    sampling = {**model_defaults, **{k: v for k, v in request.sampling.items() if v is not None}}
    room = max_model_len - n_prompt
    sampling["max_tokens"] = min(int(sampling.get("max_tokens") or room), room)
    try:
        params = vllm_api.make_sampling_params(sampling, streamed=streamed)
    except (TypeError, ValueError) as exc:
        raise UnsupportedInputError(f"Invalid sampling options {request.sampling!r}: {exc}") from exc
    return prompt, params


def to_generation(output, request_id: str) -> Generation:
    completion = output.outputs[0]
    logprobs = None
    if completion.logprobs is not None:
        logprobs = []
        for token_id, entry in zip(completion.token_ids, completion.logprobs):
            chosen = entry[token_id]
            top = sorted(((lp.decoded_token or "", lp.logprob, tid, lp.rank) for tid, lp in entry.items()),
                         key=lambda item: item[3] or 0)
            logprobs.append(TokenLogprobData(
                token=chosen.decoded_token or "", logprob=float(chosen.logprob), token_id=int(token_id),
                top=[(t, float(v), int(i)) for t, v, i, _ in top],
            ))
    return Generation(
        text=completion.text,
        finish_reason=completion.finish_reason,
        num_prompt_tokens=len(output.prompt_token_ids or ()),
        num_output_tokens=len(completion.token_ids),
        num_cached_tokens=int(output.num_cached_tokens or 0),
        token_ids=list(completion.token_ids),
        logprobs=logprobs,
        request_id=request_id,
    )
