"""Start-up from a fresh process: ours beside raw vLLM (issue 38, item 1), rounds alternating.

    python -m benchmarks.start_bench --cpu --rounds 3 --out benchmarks/results/start-cpu   # CPU build, ~4 min
    python -m benchmarks.start_bench --model FOLDER --systems ours,raw,ours-multigpu --out DIR  # a GPU

Each system starts in its own fresh Python process (what a DSPy script, a notebook restart or a
test pays), one after another, the order alternating between rounds so a warm file cache or a
busy neighbour favours no system. A child reports three phases: ``import`` (the package a user
imports: ``vllm_dspy_adapter`` for ours, ``vllm`` for raw), ``start`` (the constructor:
``vLLMOffline(...)``, ``vLLMOfflineMultiGPU(num_replicas=1, ...)`` / ``num_gpus=1``, or
``vllm.LLM(...)``) and ``first`` (one 8-token answer). Printed: every row, then each system's
median total and its ratio to raw's median (the target: ours <= 1.03x raw).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SYSTEMS = ("ours", "raw", "ours-multigpu")

_CHILD = r"""
import json, sys, time
def main():
    system, model, engine = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3])
    t0 = time.monotonic()
    if system == "raw":
        import vllm
        from vllm_dspy_adapter.models import resolve_model  # the same folder ours resolves
        t1 = time.monotonic()
        llm = vllm.LLM(resolve_model(model), **engine)
        t2 = time.monotonic()
        llm.generate(["Say hi."], vllm.SamplingParams(max_tokens=8), use_tqdm=False)
    else:
        import vllm_dspy_adapter as vda
        t1 = time.monotonic()
        if system == "ours":
            lm = vda.vLLMOffline(model, max_tokens=8, cache=False, **engine)
        else:
            on_gpu = vda.visible_gpu_count() > 0
            lm = vda.vLLMOfflineMultiGPU(model, **({"num_gpus": 1} if on_gpu else {"num_replicas": 1}),
                                         max_tokens=8, cache=False, **engine)
        t2 = time.monotonic()
        lm("Say hi.")
    t3 = time.monotonic()
    print("@@START " + json.dumps({"system": system, "import_s": round(t1 - t0, 2), "start_s": round(t2 - t1, 2),
                                   "first_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2)}), flush=True)
    if system != "raw":
        lm.shutdown()
if __name__ == "__main__":
    main()
"""


def run_child(system: str, model: str | None, engine: dict, timeout: float) -> dict:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    run = subprocess.run([sys.executable, "-c", _CHILD, system, model or "", json.dumps(engine)],
                         capture_output=True, text=True, timeout=timeout, env=env)
    for line in run.stdout.splitlines():
        if line.startswith("@@START "):
            return json.loads(line[len("@@START "):])
    raise RuntimeError(f"{system}: no result (exit {run.returncode}):\n{run.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the embedded model on the CPU build (enforce_eager)")
    parser.add_argument("--model", default=None, help="a model folder (default: the embedded model)")
    parser.add_argument("--systems", default="ours,raw", help=f"comma-separated, of {','.join(SYSTEMS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--load-format", default=None, help="e.g. dummy (random weights) for a benchmark shape")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for one child")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or "raw" not in systems:
        parser.error(f"--systems: unknown {unknown}; choose from {SYSTEMS}, raw included (the baseline)")
    engine: dict = {"max_model_len": args.max_model_len}
    if args.cpu:
        engine["enforce_eager"] = True
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.load_format:
        engine["load_format"] = args.load_format
    rows = []
    for round_ in range(args.rounds):
        order = systems if round_ % 2 == 0 else systems[::-1]
        for system in order:
            row = {"round": round_, **run_child(system, args.model, engine, args.timeout)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    medians = {s: statistics.median(r["total_s"] for r in rows if r["system"] == s) for s in systems}
    summary = {s: {"median_total_s": round(m, 2), "vs_raw": round(m / medians["raw"], 3)} for s, m in medians.items()}
    for s, row in summary.items():
        print(f"{s:>14}: median {row['median_total_s']:.1f} s to the first answer, {row['vs_raw']:.3f}x raw")
    result = {"args": vars(args), "engine": engine, "rows": rows, "summary": summary,
              "date": time.strftime("%Y-%m-%d")}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "start_bench.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
