"""The engine layer: one vLLM ``AsyncLLM`` and nothing about DSPy, routing or placement.

- ``engine``: ``Engine``: an ``AsyncLLM`` on a background event loop, thread-safe
  ``submit`` and ``cancel``, LoRA adapters loaded into it;
- ``liveness``: the engine's watchdog and pulse, its shutdown and kill (a mixin of ``Engine``);
- ``processes``: the processes an engine launched: found, measured (CPU pulse), killed;
- ``cache_events``: the engine's KV-cache events, read from the ZMQ socket its engine core
  publishes on (``ModelSpec.cache_events``), for the ``"cache"`` routing policy;
- ``vllm_io``: a ``GenerationRequest`` to vLLM's prompt and ``SamplingParams``, vLLM's
  outputs to a ``Generation`` (whole or gathered from streamed deltas); the refusals.

Runs in the user's process, in worker processes and in Ray actors. May import only the
shared contracts, configuration and errors (``protocol``, ``config``, ``errors``) and
``vllm_api``, the one module that touches vLLM (``tests/test_layers.py``).
"""
