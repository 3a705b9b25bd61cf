"""CPU time the driver process spends per request: what limits a node with many replicas.

With N replicas the driver (the DSPy process) renders chat templates, routes, and
moves every request and result over a pipe; tokenisation, detokenisation and the
engines run in the replicas' worker processes. This measures the driver's own CPU
seconds (user + system of this process only, not its children) per request, for
three paths, and prints how many requests per second one driver core could feed:

    python -m benchmarks.driver_cpu                      # 2 CPU replicas of the default model
    python -m benchmarks.driver_cpu --gpus 8 --model M   # on a GPU node

Every request asks for one output token, so the engines finish fast and the
driver's share is what is left to see; the numbers are per request, so they do
not depend on how fast the engines are.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time

import psutil

from .dspy_calls import chat_call
from .options import Settings, _engine_arg
from .workloads import w1, w2_messages


def chat_messages(n: int, run_key: str) -> list[list[dict]]:
    """W2's prompts (DSPy ChatAdapter, ChainOfThought, 4 demos), from the harness's own generator."""
    return w2_messages(Settings(), n, run_key)[0]


def measure(label: str, fn, n: int) -> dict:
    me = psutil.Process()
    before, started = me.cpu_times(), time.monotonic()
    fn()
    after, wall = me.cpu_times(), time.monotonic() - started
    cpu = (after.user - before.user) + (after.system - before.system)
    per = cpu / n
    row = {"path": label, "requests": n, "driver_cpu_s": round(cpu, 3), "wall_s": round(wall, 2),
           "driver_cpu_ms_per_request": round(per * 1000, 3),
           "requests_per_driver_core_s": round(1 / per) if per > 0 else None}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.driver_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder or id (default: the adapter's default model)")
    p.add_argument("--gpus", type=int, help="GPU replicas (default: --replicas CPU replicas)")
    p.add_argument("--replicas", type=int, default=2, help="CPU replicas when --gpus is not given")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--threads", type=int, default=64, help="DSPy-style caller threads for the lm(...) path")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from vllm_dspy_adapter import vLLMOfflineMultiGPU

    engine = dict(_engine_arg(a) for a in args.engine_arg)
    if args.gpus:
        place = {"num_gpus": args.gpus}
    else:
        place = {"num_replicas": args.replicas}
        engine = {"enforce_eager": True, "max_model_len": 2048, **engine}
    lm = vLLMOfflineMultiGPU(model=args.model, **place, cache=False, max_tokens=1, **engine)
    try:
        n = args.requests
        # W1's prompts (512 random token ids), from the harness's own generator.
        tokenizer = lm.engine.runtime.renderer.tokenizer
        ids = [{"prompt_token_ids": r.token_ids} for r in w1(tokenizer, Settings(), n, "driver-cpu").requests]
        lm.batch_generate(ids[:8], max_tokens=1, progress=False)  # warm-up
        rows = [measure("batch_generate, 512 token ids each", lambda: lm.batch_generate(ids, max_tokens=1,
                                                                                        progress=False), n)]
        chats = chat_messages(n, "driver-cpu-batch")
        rows.append(measure("batch_generate, DSPy-rendered chat messages",
                            lambda: lm.batch_generate(chats, max_tokens=1, progress=False), n))
        chats = chat_messages(n, "driver-cpu-calls")

        def dspy_calls():
            with concurrent.futures.ThreadPoolExecutor(args.threads) as ex:
                list(ex.map(lambda m: chat_call(lm, m), chats))

        rows.append(measure(f"lm(Request) of chat messages from {args.threads} threads", dspy_calls, n))
        print(json.dumps({"replicas": len(lm.stats()), "model": lm.model, "cpu": psutil.cpu_count(),
                          "summary": {r["path"]: r["driver_cpu_ms_per_request"] for r in rows}}))
    finally:
        lm.shutdown()


if __name__ == "__main__":
    main()
