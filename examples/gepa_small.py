"""A small dspy.GEPA run on local replicas, with the same local model reflecting.

    python examples/gepa_small.py [--budget 24]

GEPA evaluates many candidate programs; each evaluation is a burst of parallel
calls that vLLMOfflineMultiGPU spreads over the replicas (with prefix routing,
the calls of one candidate share its instructions and land on the same replica's
prefix cache). The reflection LM here is a copy of the same local LM at a higher
temperature; with a real run you would use a stronger model for reflection.

The budget (max_metric_calls) is tiny so the run finishes in minutes on a CPU;
a 135M model will not improve much, the point is the plumbing.
"""

import argparse
import os
import time

import dspy

from vllm_dspy_adapter import vLLMOfflineMultiGPU, visible_gpu_count
from vllm_dspy_adapter.cli import arithmetic_devset as arithmetic  # "What is a + b?" with known answers


def metric_with_feedback(gold, pred, trace=None, pred_name=None, pred_trace=None):
    """GEPA's metric: a score and a textual feedback the reflection LM reads."""
    answer = str(getattr(pred, "answer", "")).strip()
    if gold.answer in answer:
        return dspy.Prediction(score=1.0, feedback=f"Correct: the answer is {gold.answer}.")
    return dspy.Prediction(
        score=0.0,
        feedback=f"Wrong: expected {gold.answer}, got {answer!r}. Add the two numbers and answer with the number only.",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local folder or hub id (default: the embedded model)")
    parser.add_argument("--budget", type=int, default=24, help="max_metric_calls")
    args = parser.parse_args()

    if visible_gpu_count() > 0:
        placement, engine, threads = {"num_gpus": None}, {}, 64
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        placement, engine, threads = {"num_replicas": 2}, {"enforce_eager": True}, 16

    trainset, valset = arithmetic(6, seed=1), arithmetic(6, seed=2)
    started = time.monotonic()
    with vLLMOfflineMultiGPU(args.model, **placement, temperature=0.0, max_tokens=96, max_model_len=2048,
                             **engine) as lm:
        print(f"{lm.num_replicas} replica(s) of {lm.model} ready in {time.monotonic() - started:.0f} s")
        dspy.configure(lm=lm)
        reflection_lm = lm.copy(temperature=1.0, max_tokens=256)  # same engines, other sampling

        program = dspy.ChainOfThought("question -> answer")
        evaluate = dspy.Evaluate(devset=valset, metric=lambda g, p, t=None: metric_with_feedback(g, p).score,
                                 num_threads=threads, display_progress=False)
        before = evaluate(program).score

        t0 = time.monotonic()
        optimizer = dspy.GEPA(metric=metric_with_feedback, auto=None, max_metric_calls=args.budget,
                              reflection_lm=reflection_lm, reflection_minibatch_size=3,
                              num_threads=threads, track_stats=True, seed=0)
        optimized = optimizer.compile(program, trainset=trainset, valset=valset)
        elapsed = time.monotonic() - t0

        after = evaluate(optimized).score
        results = optimized.detailed_results
        print(f"GEPA: {len(results.candidates)} candidate(s), {results.total_metric_calls} metric calls "
              f"in {elapsed:.0f} s; valset score {before:.0f}% -> {after:.0f}%")
        print("optimized instructions:", repr(optimized.predict.signature.instructions[:300]))
        stats = lm.stats()
        for s in stats:
            print({k: s.get(k) for k in ("replica", "device", "requests", "prefix_cache_hit_rate")})
        print("requests per replica:", [s.get("requests", 0) for s in stats])
    print("gepa_small: done")


if __name__ == "__main__":  # required: replicas are started as child processes (spawn)
    main()
