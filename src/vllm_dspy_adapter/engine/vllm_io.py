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

from .. import vllm_api
from ..errors import PromptTooLongError, UnsupportedInputError
from ..protocol import Generation, GenerationRequest, StreamPiece, TokenLogprobData

__all__ = ["to_vllm_inputs", "to_generation", "DeltaCollector"]


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
    if streamed:  # a stream is vLLM's text as it is decoded: detokenize=False cannot apply to it
        sampling.pop("detokenize", None)
    room = max_model_len - n_prompt
    sampling["max_tokens"] = min(int(sampling.get("max_tokens") or room), room)
    try:
        params = vllm_api.make_sampling_params(sampling, streamed=streamed)
    except (TypeError, ValueError) as exc:
        raise UnsupportedInputError(f"Invalid sampling options {request.sampling!r}: {exc}") from exc
    return prompt, params


def to_generation(output, request_id: str, *, params=None, tokenizer=None) -> Generation:
    """A finished ``RequestOutput`` (FINAL_ONLY) to the ``Generation`` that crosses processes.

    With ``detokenize=False`` in ``params`` vLLM skips its per-step incremental
    detokenisation and returns token ids only; the text (and the logprobs' tokens) are
    then decoded here once, from the finished ids, with ``tokenizer``, as vLLM would have:
    special tokens skipped unless ``skip_special_tokens=False``, and the token that
    stopped the answer left out unless ``include_stop_str_in_output``."""
    completion = output.outputs[0]
    text = completion.text
    decoder = tokenizer if params is not None and not params.detokenize else None
    if decoder is not None:
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and ids and not params.include_stop_str_in_output:
            ids = ids[:-1]  # EOS or a stop token id (stop strings need vLLM's detokenisation)
        text = decoder.decode(ids, skip_special_tokens=params.skip_special_tokens)
    return _generation(text=text, token_ids=completion.token_ids, logprobs=completion.logprobs,
                       finish_reason=completion.finish_reason, prompt_token_ids=output.prompt_token_ids,
                       num_cached_tokens=output.num_cached_tokens, request_id=request_id, decoder=decoder)


def _generation(*, text: str, token_ids, logprobs, finish_reason, prompt_token_ids, num_cached_tokens,
                request_id: str, decoder=None) -> Generation:
    """``decoder``: the tokenizer that names a logprob's token where vLLM decoded none
    (``detokenize=False``)."""
    logprob_data = None
    if logprobs is not None:
        logprob_data = []

        def text_of(token_id, lp) -> str:
            if lp.decoded_token is not None or decoder is None:
                return lp.decoded_token
            return decoder.decode([int(token_id)])

        for token_id, entry in zip(token_ids, logprobs):
            chosen = entry[token_id]
            top = sorted(((text_of(tid, lp) or "", lp.logprob, tid, lp.rank) for tid, lp in entry.items()),
                         key=lambda item: item[3] or 0)
            logprob_data.append(TokenLogprobData(
                token=text_of(token_id, chosen) or "", logprob=float(chosen.logprob), token_id=int(token_id),
                top=[(t, float(v), int(i)) for t, v, i, _ in top],
            ))
    return Generation(
        text=text,
        finish_reason=finish_reason,
        num_prompt_tokens=len(prompt_token_ids or ()),
        num_output_tokens=len(token_ids),
        num_cached_tokens=int(num_cached_tokens or 0),
        token_ids=list(token_ids),
        logprobs=logprob_data,
        request_id=request_id,
    )


class DeltaCollector:
    """A streamed request's vLLM outputs (``RequestOutputKind.DELTA``: each holds
    only what is new) gathered into the same ``Generation`` the non-streamed path
    builds. Each new piece of text is also handed to ``sink.put`` as a ``StreamPiece``."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list | None = None
        self.finish_reason: str | None = None
        self.prompt_token_ids = None
        self.num_cached_tokens = 0
        self.count = 0

    def add(self, output) -> None:
        self.count += 1
        completion = output.outputs[0]
        if output.prompt_token_ids:
            self.prompt_token_ids = output.prompt_token_ids
        self.num_cached_tokens = max(self.num_cached_tokens, int(output.num_cached_tokens or 0))
        self.text.append(completion.text)
        self.token_ids.extend(completion.token_ids)
        if completion.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(completion.logprobs)
        self.finish_reason = completion.finish_reason
        self.sink.put(StreamPiece(completion.text, len(completion.token_ids)))

    @property
    def aborted(self) -> bool:
        return self.finish_reason == "abort"

    def generation(self, request_id: str) -> Generation:
        """The gathered outputs as one ``Generation``."""
        return _generation(text="".join(self.text), token_ids=self.token_ids, logprobs=self.logprobs,
                           finish_reason=self.finish_reason, prompt_token_ids=self.prompt_token_ids,
                           num_cached_tokens=self.num_cached_tokens, request_id=request_id)
