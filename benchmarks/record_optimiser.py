"""Records the calls a real DSPy optimiser makes (issue 20, W6's replay): a small GEPA (or
MIPROv2) run of a ChainOfThought program on the default model (SmolLM2-135M-Instruct) on the
CPU build, every LM call kept in order with its messages and max_tokens, written as JSON lines.

    python -m benchmarks.record_optimiser --out benchmarks/data/gepa_smollm_calls.jsonl
    python -m benchmarks.record_optimiser --optimizer mipro --out benchmarks/data/mipro_smollm_calls.jsonl

``python -m benchmarks.w6_bench --replay FILE`` sends the recorded calls through the
harness (the optimiser's own shape, not a generated one). The 135M model's reflections are
poor; what matters here is the shape: how many calls share which prefixes, in what order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    import dspy

    ok = str(gold.answer) in str(getattr(pred, "answer", "") or "")
    return dspy.Prediction(score=float(ok), feedback="correct" if ok else f"the answer is {gold.answer}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-metric-calls", type=int, default=60)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--optimizer", choices=("gepa", "mipro"), default="gepa",
                        help="mipro: MIPROv2(auto='light') with 2 bootstrapped + 2 labelled demos")
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import dspy

    if args.optimizer == "mipro":
        try:
            import optuna  # noqa: F401  (MIPROv2's search; not a test dependency)
        except ImportError:
            print("record_optimiser --optimizer mipro needs optuna: pip install optuna", file=sys.stderr)
            return 2
    from vllm_dspy_adapter import vLLMOffline
    from vllm_dspy_adapter.cli import arithmetic_devset

    with vLLMOffline(temperature=0.7, max_tokens=128, max_model_len=2048, cache=False, enforce_eager=True) as lm:
        dspy.configure(lm=lm)
        data = arithmetic_devset(24)
        program = dspy.ChainOfThought("question -> answer")
        if args.optimizer == "mipro":
            optimizer = dspy.MIPROv2(metric=lambda gold, pred, trace=None: metric(gold, pred).score, auto="light",
                                     num_threads=args.threads, max_bootstrapped_demos=2, max_labeled_demos=2,
                                     seed=0, verbose=False)
            optimizer.compile(program, trainset=data[:12], valset=data[12:])
        else:
            optimizer = dspy.GEPA(metric=metric, max_metric_calls=args.max_metric_calls, reflection_lm=lm,
                                  num_threads=args.threads, track_stats=False, seed=0)
            optimizer.compile(program, trainset=data[:12], valset=data[12:])
        calls = [{"messages": entry.get("messages"), "max_tokens": (entry.get("kwargs") or {}).get("max_tokens", 128)}
                 for entry in lm.history if entry.get("messages")]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        for call in calls:
            fh.write(json.dumps(call) + "\n")
    print(f"record_optimiser: {len(calls)} calls written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
