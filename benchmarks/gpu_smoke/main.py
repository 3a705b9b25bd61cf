"""``python -m benchmarks.gpu_smoke``: the arguments, the run, its files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import traceback

from . import __doc__ as _DOC
from .machine import _versions
from .plan import make_plan
from .runner import Result, _children, _error_text, run_lines
from .smoke import Smoke


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on this CPU machine: the default model, CPU replicas")
    p.add_argument("--shape", default="0.6b", help="benchmark model shape on GPU (bench_models.SHAPES)")
    p.add_argument("--model", help="a model folder instead (its config.json shapes the LoRA adapter)")
    p.add_argument("--load-format", default="dummy", help="vLLM load_format (default dummy: random weights)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--noise-max-tokens", type=int, default=1536,
                   help="max_tokens of the structured lines (jsonadapter.typed, tool_call; half for streamify)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="vLLMOffline and the 1-replica layout")
    p.add_argument("--rpg2-memory-utilization", type=float, default=0.8, help="replicas_per_gpu=2, total per GPU")
    p.add_argument("--eager", action="store_true", help="enforce_eager on GPU too (faster starts; always on CPU)")
    p.add_argument("--eval-n", type=int, default=64, help="examples of dspy.evaluate64 (64 threads)")
    p.add_argument("--deadline-scale", type=float, help="multiply every line's deadline (default 1 GPU, 2.5 CPU)")
    p.add_argument("--out", help="folder for gpu_smoke.txt, gpu_smoke.json and the stacks of hung lines")
    p.add_argument("--only", help="comma-separated lines to run (and the start line and shutdown of their layout)")
    p.add_argument("-v", "--verbose", action="store_true", help="show vLLM's INFO logs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Before vLLM is imported (the engine processes inherit the environment).
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # its JIT takes minutes on a fresh machine
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the header and the lines only
    if args.cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    try:
        from vllm_dspy_adapter.logs import quiet_engine_logs
    except ImportError:  # the smoke must still run (and say what broke) without it
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if args.verbose else "ERROR")
    else:
        quiet_engine_logs(verbose=args.verbose)
    import logging

    if not args.verbose:
        logging.getLogger("dspy").setLevel(logging.ERROR)  # noise's parse failures, one warning per call

    wall0 = time.monotonic()
    lines_out: list[str] = []

    def emit(text: str) -> None:
        lines_out.append(text)
        print(text, flush=True)

    versions = _versions(args.cpu)
    emit("gpu_smoke: " + " | ".join(f"{k} {v}" for k, v in versions.items()))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    try:
        plan = make_plan(args)
    except Exception as exc:  # no model folder: nothing can run, said as a line
        traceback.print_exc()
        emit(f"FAIL setup {_error_text(exc)}")
        emit("SMOKE: 0 passed, 1 failed")
        return 1
    emit(f"gpu_smoke: model {plan.model}{' (tokenizer ' + plan.tokenizer + ')' if plan.tokenizer else ''} | "
         f"load_format {args.load_format} | max_model_len {args.max_model_len} | "
         f"{'CPU' if plan.cpu else 'GPU'}{', enforce_eager' if plan.engine.get('enforce_eager') else ''}")
    import dspy

    # DSPy's response cache on, as by default, but in this run's own folder: lora.* checks that
    # what it cached for an adapter is not served after the unload (issue 22); ~/.dspy_cache untouched.
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True,
                         disk_cache_dir=os.path.join(plan.work_dir, "dspy-cache"))
    smoke = Smoke(plan)
    results: list[Result] = []
    only = {n.strip() for n in args.only.split(",") if n.strip()} if args.only else None
    code = run_lines(smoke.lines(only), emit=emit, stacks_dir=args.out or plan.work_dir, results=results)
    wall = time.monotonic() - wall0
    emit(f"gpu_smoke: wall {wall:.0f} s")
    if args.out:
        with open(os.path.join(args.out, "gpu_smoke.txt"), "w") as fh:
            fh.write("\n".join(lines_out) + "\n")
        with open(os.path.join(args.out, "gpu_smoke.json"), "w") as fh:
            json.dump({"versions": versions, "model": plan.model, "args": vars(args), "wall_s": round(wall, 1),
                       "exit_code": code, "shutdowns": smoke.shutdowns,
                       "lines": [dataclasses.asdict(r) for r in results]}, fh, indent=1, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    if not any(r.hung for r in results):
        shutil.rmtree(plan.work_dir, ignore_errors=True)  # the adapter; a hang's stacks may be there
    else:
        # A hung line's thread (and maybe its engine) is still there: exit without waiting for it.
        for child in _children():
            try:
                child.kill()
            except Exception:
                pass
        os._exit(code)
    return code
