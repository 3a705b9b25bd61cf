"""``Backend.model_facts`` for every backend that runs vLLM (in-process, local, Ray): the
arguments checked against vLLM's own tables, the model resolved (None: the embedded
default), and the tokenizer loaded as vLLM loads it. One rule for the three.
"""

from __future__ import annotations

from typing import Any

from .. import vllm_api
from ..config import ModelSpec, check_engine_kwargs, check_sampling_kwargs
from ..protocol import ModelFacts

__all__ = ["vllm_model_facts"]


def vllm_model_facts(model: str | None, engine_kwargs: dict[str, Any], sampling: dict[str, Any]) -> ModelFacts:
    """Check, resolve, load: everything before an engine backend starts its replicas."""
    from ..models import resolve_model

    path = resolve_model(model)
    check_engine_kwargs(engine_kwargs)
    check_sampling_kwargs(sampling)
    tokenizer = ModelSpec(model=path, engine_kwargs=engine_kwargs).load_tokenizer()
    return ModelFacts(model=path, tokenizer=tokenizer, sampling_fields=vllm_api.sampling_field_names())
