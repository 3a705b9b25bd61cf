"""A short check of the LM classes on a lent GPU, before long benchmark runs.

Each phase starts one layout (``single``: vLLMOffline; ``proc1``: one worker-process
replica; ``proc2``/``proc3``: 2/3 replicas on the GPU), sends one batch of prompts
of random token ids through ``batch_generate``, prints requests/s and shuts down.
A phase that has not finished within its deadline is dumped with py-spy (every
process of the run: driver, workers, engine cores) into ``$OUT/stacks-<phase>.txt``,
then the run exits: a hang is evidence, not a wait.

    python -m benchmarks.gpu_check single proc1 proc2 --shape 0.6b --n 2048 --deadline-s 120
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time

LAYOUTS = {"single": 0, "proc1": 1, "proc2": 2, "proc3": 3}


def _dump_all(path: str) -> None:
    import psutil

    me = psutil.Process()
    with open(path, "w") as out:
        for proc in [me, *me.children(recursive=True)]:
            try:
                name = " ".join(proc.cmdline())[:160]
            except psutil.Error:
                continue
            out.write(f"===== pid {proc.pid} {name}\n")
            out.flush()
            subprocess.run(["py-spy", "dump", "--pid", str(proc.pid)], stdout=out, stderr=subprocess.STDOUT,
                           timeout=60, check=False)


def _watch(phase: str, deadline_s: float, done: threading.Event) -> None:
    if done.wait(deadline_s):
        return
    path = os.path.join(os.environ.get("OUT", "."), f"stacks-{phase}.txt")
    print(f"== {phase}: not done after {deadline_s:.0f} s; dumping every process to {path}", flush=True)
    _dump_all(path)
    os._exit(5)


def main() -> None:
    from vllm_dspy_adapter import vLLMOffline, vLLMOfflineMultiGPU

    from .bench_models import benchmark_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phases", nargs="+", choices=sorted(LAYOUTS))
    p.add_argument("--shape", default="0.6b")
    p.add_argument("--n", type=int, default=2048, help="prompts per batch")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--deadline-s", type=float, default=180, help="start + batch of one phase")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    args = p.parse_args()

    model = benchmark_model_path(shape=args.shape)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 100000) for _ in range(args.prompt_len)]}
               for _ in range(args.n)]
    common = dict(model=model, load_format="dummy", cache=False, max_model_len=4096,
                  gpu_memory_utilization=args.gpu_memory_utilization, sampling_params={"ignore_eos": True})
    for phase in args.phases:
        done = threading.Event()
        threading.Thread(target=_watch, args=(phase, args.deadline_s, done), daemon=True).start()
        t0 = time.monotonic()
        k = LAYOUTS[phase]
        lm = vLLMOffline(**common) if k == 0 else vLLMOfflineMultiGPU(num_gpus=1, replicas_per_gpu=k, **common)
        started = time.monotonic() - t0
        t1 = time.monotonic()
        lm.batch_generate(prompts[:64], max_tokens=8, progress=False)  # warm-up
        t2 = time.monotonic()
        outs = lm.batch_generate(prompts, max_tokens=args.max_tokens, progress=False, return_outputs=True)
        wall = time.monotonic() - t2
        tokens = sum(o.num_output_tokens for o in outs)
        per_replica = [s.get("routed") for s in lm.stats()]
        print(f"== {phase}: start {started:.0f} s, warm-up {t2 - t1:.1f} s, {args.n} requests in {wall:.1f} s: "
              f"{args.n / wall:.1f} req/s, {tokens / wall:.0f} output tok/s; routed {per_replica}", flush=True)
        lm.shutdown()
        done.set()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
