"""Command line: ``python -m vllm_dspy_adapter {multigpu,ask,prepare-model,doctor}``.

Only argparse is imported at start, so ``--help`` answers at once on any machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .errors import VllmDspyAdapterError

__all__ = ["main", "build_parser", "arithmetic_devset"]


def arithmetic_devset(n: int, seed: int = 0):
    """Questions with known answers that even a 135M model gets partly right."""
    import random

    import dspy

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        out.append(dspy.Example(question=f"What is {a} + {b}?", answer=str(a + b)).with_inputs("question"))
    return out


def _answer_match(example, prediction, trace=None) -> bool:
    return example.answer in str(getattr(prediction, "answer", ""))


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local folder or hub id (default: $VLLM_DSPY_MODEL or the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true", help="skip CUDA graphs / compilation (faster start)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=256)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-dspy-adapter", description="DSPy programs on in-process vLLM, one GPU or many.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show vLLM's own logs (engine start and stop) and log at INFO level; "
                             "without it only warnings of this program and vLLM's errors are shown "
                             "(VLLM_LOGGING_LEVEL, when set, keeps its value)")
    sub = parser.add_subparsers(dest="command", required=True)

    multi = sub.add_parser("multigpu", help="run a DSPy evaluation over every replica and print a throughput table")
    _add_engine_args(multi)
    multi.add_argument("--num-gpus", type=int, default=None, help="GPUs to use (default: every visible GPU)")
    multi.add_argument("--num-replicas", type=int, default=None, help="CPU replicas on a machine without GPUs")
    multi.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica")
    multi.add_argument("--replicas-per-gpu", type=int, default=1,
                       help="replicas sharing each GPU (small models; --gpu-memory-utilization is the total per GPU)")
    multi.add_argument("--routing", choices=["prefix", "least_loaded", "round_robin"], default="prefix")
    multi.add_argument("--questions", type=int, default=64, help="questions in the evaluation")
    multi.add_argument("--threads", type=int, default=32, help="DSPy threads (in-flight calls)")

    ask = sub.add_parser("ask", help="answer one question with a ChainOfThought program on one engine")
    _add_engine_args(ask)
    ask.add_argument("question")

    prep = sub.add_parser("prepare-model", help="prepare the embedded default model and print its folder")
    prep.add_argument("--cache-dir", default=None)

    doctor = sub.add_parser("doctor", help="report vLLM, torch, DSPy, CUDA and GPUs, and whether this setup "
                                           "is supported (checks vLLM's API without starting an engine)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _engine_kwargs(args) -> dict:
    kwargs = {"max_model_len": args.max_model_len, "max_tokens": args.max_tokens, "temperature": 0.0}
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    if args.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kwargs


def _multigpu(args) -> int:
    import dspy

    from .lm.offline import vLLMOfflineMultiGPU

    started = time.monotonic()
    with vLLMOfflineMultiGPU(model=args.model, num_gpus=args.num_gpus, num_replicas=args.num_replicas,
                             tensor_parallel_size=args.tensor_parallel_size, routing=args.routing, cache=False,
                             replicas_per_gpu=args.replicas_per_gpu, **_engine_kwargs(args)) as lm:
        start_s = time.monotonic() - started
        print(f"engine ready in {start_s:.0f} s: {lm.model} ({lm.num_replicas} replica(s): "
              f"{', '.join(str(s['device']) for s in lm.stats())})", flush=True)
        dspy.configure(lm=lm)
        devset = arithmetic_devset(args.questions)
        program = dspy.ChainOfThought("question -> answer")
        evaluate = dspy.Evaluate(devset=devset, metric=_answer_match, num_threads=args.threads,
                                 display_progress=True, provide_traceback=False)
        t0 = time.monotonic()
        result = evaluate(program)
        elapsed = time.monotonic() - t0
        stats = lm.stats()
    total_requests = sum(s.get("requests", 0) for s in stats) or 1
    total_tokens = sum(s.get("output_tokens", 0) for s in stats)
    score = getattr(result, "score", result)
    print(f"\nmodel: {lm.model}   replicas: {len(stats)}   start: {start_s:.0f} s   score: {score}")
    print(f"questions/s: {len(devset) / elapsed:.2f}   output tokens/s: {total_tokens / elapsed:.0f}   "
          f"wall: {elapsed:.1f} s   threads: {args.threads}   routing: {args.routing}")
    print(f"{'replica':>7} {'device':>12} {'alive':>5} {'requests':>8} {'share':>6} {'out tok':>8} {'cache hit':>9}")
    for s in stats:
        hit = s.get("prefix_cache_hit_rate")
        print(f"{s['replica']:>7} {s['device']:>12} {str(s['alive']):>5} {s.get('requests', 0):>8} "
              f"{s.get('requests', 0) / total_requests:>6.0%} {s.get('output_tokens', 0):>8} "
              f"{'-' if hit is None else f'{hit:.0%}':>9}")
    return 0


def _ask(args) -> int:
    import dspy

    from .lm.offline import vLLMOffline

    started = time.monotonic()
    with vLLMOffline(model=args.model, **_engine_kwargs(args)) as lm:
        print(f"engine ready in {time.monotonic() - started:.0f} s: {lm.model}", flush=True)
        dspy.configure(lm=lm)
        prediction = dspy.ChainOfThought("question -> answer")(question=args.question)
        print(f"reasoning: {prediction.reasoning}\nanswer: {prediction.answer}")
    return 0


def _prepare(args) -> int:
    from .models import prepare_default_model

    print(prepare_default_model(args.cache_dir))
    return 0


def _doctor(args) -> int:
    from .doctor import run

    return run(as_json=args.json)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .logs import quiet_engine_logs

    quiet_engine_logs(verbose=args.verbose)  # before vLLM is imported: engine processes inherit it
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = {"multigpu": _multigpu, "ask": _ask, "prepare-model": _prepare, "doctor": _doctor}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted; engines stopped", file=sys.stderr)
        return 130
    except (VllmDspyAdapterError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
