"""dspy.Evaluate over every GPU of a node with vLLMOfflineMultiGPU.

    python examples/evaluate_multi_gpu.py [--questions 32]

On a machine with GPUs it starts one replica per visible GPU (num_gpus=None);
without a GPU it starts two CPU replicas that split the cores (num_replicas=2),
so the same file runs in CI. The model is the embedded default
(SmolLM2-135M-Instruct) unless $VLLM_DSPY_MODEL or --model names another.
"""

import argparse
import os
import time

import dspy

from vllm_dspy_adapter import vLLMOfflineMultiGPU, visible_gpu_count
from vllm_dspy_adapter.cli import arithmetic_devset  # "What is a + b?" questions with known answers


def answer_match(example, prediction, trace=None) -> bool:
    return example.answer in str(prediction.answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder or hub id (default: the embedded model)")
    parser.add_argument("--questions", type=int, default=32)
    args = parser.parse_args()

    on_gpu = visible_gpu_count() > 0
    if on_gpu:
        placement = {"num_gpus": None}  # every visible GPU, one replica each
        engine = {}  # CUDA graphs on: slower start, faster decoding
        per_replica_batch = 64  # concurrent calls that keep one GPU busy with a small model
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache per CPU replica
        placement = {"num_replicas": 2}
        engine = {"enforce_eager": True}  # a fast start on CPU
        per_replica_batch = 8

    started = time.monotonic()
    with vLLMOfflineMultiGPU(args.model, **placement, temperature=0.0, max_tokens=128, max_model_len=2048,
                             **engine) as lm:
        print(f"{lm.num_replicas} replica(s) of {lm.model} ready in {time.monotonic() - started:.0f} s")
        dspy.configure(lm=lm)

        # DSPy keeps at most num_threads calls in flight, and only calls in flight
        # are batched by the engines: give every replica enough of them.
        num_threads = per_replica_batch * lm.num_replicas
        evaluate = dspy.Evaluate(devset=arithmetic_devset(args.questions), metric=answer_match,
                                 num_threads=num_threads, display_progress=True, provide_traceback=False)
        program = dspy.ChainOfThought("question -> answer")
        t0 = time.monotonic()
        result = evaluate(program)
        elapsed = time.monotonic() - t0

        stats = lm.stats()
    print(f"score: {result.score:.1f}% on {args.questions} questions in {elapsed:.1f} s "
          f"with num_threads={num_threads}")
    print(f"{'replica':>7} {'device':>12} {'alive':>5} {'requests':>8} {'out tok':>8} {'cache hit':>9}")
    for s in stats:
        hit = s.get("prefix_cache_hit_rate")
        print(f"{s['replica']:>7} {s['device']:>12} {str(s['alive']):>5} {s.get('requests', 0):>8} "
              f"{s.get('output_tokens', 0):>8} {'-' if hit is None else f'{hit:.0%}':>9}")
    print("requests per replica:", [s.get("requests", 0) for s in stats])
    print("evaluate_multi_gpu: done")


if __name__ == "__main__":  # required: replicas are started as child processes (spawn)
    main()
