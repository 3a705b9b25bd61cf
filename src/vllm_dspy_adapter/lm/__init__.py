"""The DSPy-facing layer: what a DSPy program sees.

- ``offline``: the LM classes ``vLLMOffline`` / ``vLLMOfflineMultiGPU`` (one start path,
  ``batch_generate``, ``stats``), ``batch`` (``batch_generate``'s checks, grouping and ordered
  results), and ``lora_methods`` (``load_adapter``, ``with_adapter``, ...);
- ``dspy_engine``: DSPy 3.4's engine contract (``DSPyEngine``, ``AsyncDSPyEngine``),
  ``Runtime`` and the table that maps our errors to DSPy's;
- ``render``: DSPy requests to chat prompts and sampling options, results to responses;
- ``tools``: native tool calls; ``modalities``: which inputs a model takes;
- ``stream_channel``, ``stream_events``, ``dspy_stream``: token streaming to lm15 events.

May import: ``serving``, ``backends``, ``lora`` and the shared modules (``config``,
``errors``, ``protocol``, ``vllm_api``, ``chat_template``, ``models``, ``logs``). Nothing
below imports from here (``tests/test_layers.py``).
"""


def __getattr__(name: str):
    # ``from vllm_dspy_adapter.lm import vLLMOffline`` keeps working (the LM classes lived in lm.py).
    if name in ("vLLMOffline", "vLLMOfflineMultiGPU", "GenerationOutput"):
        from . import offline

        return getattr(offline, name)
    raise AttributeError(f"module 'vllm_dspy_adapter.lm' has no attribute {name!r}")
