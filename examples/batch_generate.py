"""Batch inference without DSPy modules: lm.batch_generate over hundreds of prompts.

    python examples/batch_generate.py [--prompts 300]

Every prompt is submitted at once and routed like a DSPy call; results come
back in input order whichever replica served them. One replica per GPU when
GPUs are visible, two CPU replicas otherwise.
"""

import argparse
import os
import time

from vllm_dspy_adapter import vLLMOfflineMultiGPU
from vllm_dspy_adapter import visible_gpu_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder or hub id (default: the embedded model)")
    parser.add_argument("--prompts", type=int, default=300)
    args = parser.parse_args()

    if visible_gpu_count() > 0:
        placement, engine = {"num_gpus": None}, {}
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        placement, engine = {"num_replicas": 2}, {"enforce_eager": True}

    # Raw-text prompts go to the model as they are (like vllm.LLM.generate). Prompt i
    # starts a sequence at i, so the output order is easy to check by eye.
    prompts = [f"Continue the sequence: {i}, {i + 1}, {i + 2}," for i in range(args.prompts)]
    chats = [[{"role": "user", "content": f"Name one fruit that is {colour}."}]
             for colour in ("red", "yellow", "green")]

    with vLLMOfflineMultiGPU(args.model, **placement, max_model_len=2048, **engine) as lm:
        print(f"{lm.num_replicas} replica(s) of {lm.model}")

        t0 = time.monotonic()
        outputs = lm.batch_generate(prompts, max_tokens=4, temperature=0.0, return_outputs=True)
        elapsed = time.monotonic() - t0
        assert len(outputs) == len(prompts)
        # Results are in input order, whichever replica served each prompt.
        for i in (0, 1, 2, len(prompts) - 1):
            print(f"[{i}] {prompts[i]!r} -> {outputs[i].text!r} (replica {outputs[i].replica}, "
                  f"{outputs[i].num_output_tokens} tokens, finish_reason={outputs[i].finish_reason})")
        served = {r: sum(o.replica == r for o in outputs) for r in range(lm.num_replicas)}
        tokens = sum(o.num_output_tokens for o in outputs)
        print(f"{len(outputs)} prompts in {elapsed:.1f} s: {len(outputs) / elapsed:.1f} prompts/s, "
              f"{tokens / elapsed:.0f} output tokens/s; prompts per replica: {served}")

        # Chat messages get the model's chat template; the result is plain strings.
        for chat, text in zip(chats, lm.batch_generate(chats, max_tokens=16, temperature=0.0, progress=False)):
            print(f"{chat[0]['content']!r} -> {text.strip()!r}")

        # A failing prompt does not lose the others with raise_on_error=False.
        too_long = "word " * 5000
        mixed = lm.batch_generate(["Say hi.", too_long], max_tokens=8, progress=False, raise_on_error=False)
        print(f"mixed batch: {[type(r).__name__ for r in mixed]}")

        stats = lm.stats()
        for s in stats:
            print({k: s.get(k) for k in ("replica", "device", "alive", "requests", "output_tokens", "routed")})
        print("requests per replica:", [s.get("requests", 0) for s in stats])
    print("batch_generate: done")


if __name__ == "__main__":  # required: replicas are started as child processes (spawn)
    main()
