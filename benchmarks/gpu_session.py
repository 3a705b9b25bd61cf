"""One lean GPU session for the scaling figures (issues: foundation, data parallel).

Engine starts dominate a short GPU lease (60-200 s each), so this script starts
each system once on all GPUs and measures 1, 2 and 4 replicas on the same
engines by restricting where requests may go (``SubsetRouter`` for ours, pinned
``data_parallel_rank`` for raw vLLM). Rows are printed as JSON lines and appended
to ``$OUT/results.jsonl``.

    python -m benchmarks.gpu_session ours --gpus 4      # vLLMOfflineMultiGPU
    python -m benchmarks.gpu_session raw --gpus 4       # AsyncLLM(data_parallel_size=4)
    python -m benchmarks.gpu_session ref --gpus 4       # N LLM instances, static split / per-call lock
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import random
import threading
import time

W1_PROMPT, W1_OUT = 512, 256


def emit(row: dict) -> None:
    row = {**row, "t": time.strftime("%H:%M:%S")}
    line = json.dumps(row)
    print("ROW " + line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "results.jsonl"), "a") as f:
            f.write(line + "\n")


VOCAB = 150000  # Qwen3's ordinary tokens; the --cpu smoke model has fewer


def w1_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)  # fresh tokens per run: no prefix-cache help
    return [[rng.randrange(1000, VOCAB) for _ in range(W1_PROMPT)] for _ in range(n)]


WORDS = ("model engine batch token prefix cache replica router thread answer question reason "
         "signal vector matrix kernel memory queue latency throughput program module").split()


def w2_requests(n: int, seed: int):
    """DSPy-shaped: ChatAdapter messages of a ChainOfThought signature with 4 demos,
    long-tailed output lengths (log-normal, mean ~250, capped at 2048)."""
    import dspy

    rng = random.Random(seed)
    sig = dspy.Signature("question -> reasoning, answer", "Answer the question. Think step by step first.")
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    demos = [{"question": text(40), "reasoning": text(120), "answer": text(10)} for _ in range(4)]
    adapter = dspy.ChatAdapter()
    out = []
    for i in range(n):
        messages = adapter.format(sig, demos, {"question": f"[{seed}-{i}] " + text(60)})
        length = min(2048, max(8, int(rng.lognormvariate(5.15, 0.9))))
        out.append((messages, length))
    return out


def _subset_router(base, k):
    """Route only to replicas < k: measures k replicas on already-started engines."""
    from vllm_dspy_adapter.router import Router

    class SubsetRouter(Router):
        name = f"{base.name}[<{k}]"

        def choose(self, prompt, loads):
            return base.choose(prompt, [load for load in loads if load.index < k])

    return SubsetRouter()


def _measure_w1(lm, args, label: str, seed: int) -> int:
    """W1 on 1, 2, 4, ... of the LM's replicas (fresh prompts each); returns the next seed."""
    from vllm_dspy_adapter.router import LeastLoadedRouter

    for k in [k for k in (1, 2, 4, 8) if k <= args.gpus]:
        lm._runtime.pool.router = _subset_router(LeastLoadedRouter(), k)
        prompts = [{"prompt_token_ids": p} for p in w1_prompts(args.w1_per_gpu * k, seed)]
        seed += 1
        t = time.monotonic()
        outs = lm.batch_generate(prompts, max_tokens=W1_OUT, progress=False, return_outputs=True)
        dt = time.monotonic() - t
        emit({"system": "ours", "workload": label, "replicas": k, "requests": len(outs),
              "req_s": round(len(outs) / dt, 2), "out_tok_s": round(sum(o.num_output_tokens for o in outs) / dt),
              "seconds": round(dt, 1)})
    return seed


def ours(args) -> None:
    from vllm_dspy_adapter import vLLMOfflineMultiGPU
    from vllm_dspy_adapter.router import PrefixRouter

    t0 = time.monotonic()
    place = {"num_replicas": args.gpus} if args.cpu else {"num_gpus": args.gpus}
    lm = vLLMOfflineMultiGPU(_model(args), **place, **_engine(args), cache=False,
                             sampling_params={"ignore_eos": True}, routing="least_loaded")
    emit({"system": "ours", "event": "start", "replicas": args.gpus, "seconds": round(time.monotonic() - t0, 1)})
    pool = lm._runtime.pool
    seed = _measure_w1(lm, args, "W1", seed=1)
    for k in [k for k in (1, args.gpus)]:
        for threads in args.threads:
            pool.router = _subset_router(PrefixRouter(), k)
            reqs = w2_requests(args.w2_per_gpu * k, seed)
            seed += 1
            t = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(threads) as ex:
                outs = list(ex.map(lambda r: lm(messages=r[0], max_tokens=r[1]), reqs))
            dt = time.monotonic() - t
            toks = sum(r[1] for r in reqs)  # ignore_eos: every call yields exactly its max_tokens
            emit({"system": "ours", "workload": "W2-dspy-threads", "replicas": k, "threads": threads,
                  "requests": len(outs), "req_s": round(len(outs) / dt, 2), "out_tok_s": round(toks / dt),
                  "seconds": round(dt, 1)})
    emit({"system": "ours", "event": "stats", "stats": lm.stats()})
    lm.shutdown()


def raw(args) -> None:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    model = _model(args)
    tok = AutoTokenizer.from_pretrained(model)

    async def main():
        t0 = time.monotonic()
        eargs = AsyncEngineArgs(model=model, **_engine(args), data_parallel_size=args.gpus,
                                enable_prefix_caching=True, disable_log_stats=True)
        engine = AsyncLLM.from_vllm_config(eargs.create_engine_config(UsageContext.LLM_CLASS),
                                           usage_context=UsageContext.LLM_CLASS, disable_log_stats=True)
        emit({"system": "raw-async", "event": "start", "dp": args.gpus, "seconds": round(time.monotonic() - t0, 1)})
        counter = iter(range(10**9))
        # The model's generation-config defaults, as our LM applies them: same sampling cost.
        defaults = dict(engine.model_config.get_diff_sampling_param() or {})

        async def one(ids, max_tokens, rank):
            params = SamplingParams(**{**defaults, "max_tokens": max_tokens}, ignore_eos=True,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
            final = None
            async for out in engine.generate({"prompt_token_ids": ids}, params, f"r{next(counter)}",
                                             data_parallel_rank=rank):
                final = out
            return len(final.outputs[0].token_ids)

        seed = 101
        for k in [k for k in (1, 2, 4, 8) if k <= args.gpus]:
            prompts = w1_prompts(args.w1_per_gpu * k, seed)
            seed += 1
            t = time.monotonic()
            toks = await asyncio.gather(*[one(p, W1_OUT, i % k) for i, p in enumerate(prompts)])
            dt = time.monotonic() - t
            emit({"system": "raw-async", "workload": "W1", "replicas": k, "requests": len(prompts),
                  "req_s": round(len(prompts) / dt, 2), "out_tok_s": round(sum(toks) / dt), "seconds": round(dt, 1)})
        for k in [k for k in (1, args.gpus)]:
            for threads in args.threads:
                reqs = w2_requests(args.w2_per_gpu * k, seed)
                seed += 1
                ids = [tok.encode(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
                       for m, _ in reqs]
                sem = asyncio.Semaphore(threads)  # the same in-flight cap DSPy's threads impose
                rr = iter(range(10**9))

                async def capped(i, n):
                    async with sem:
                        return await one(i, n, next(rr) % k)

                t = time.monotonic()
                toks = await asyncio.gather(*[capped(i, r[1]) for i, r in zip(ids, reqs)])
                dt = time.monotonic() - t
                emit({"system": "raw-async", "workload": "W2-same-concurrency", "replicas": k, "threads": threads,
                      "requests": len(reqs), "req_s": round(len(reqs) / dt, 2), "out_tok_s": round(sum(toks) / dt),
                      "seconds": round(dt, 1)})
        engine.shutdown()

    asyncio.run(main())




def _ref_worker(conn, model: str, engine: dict, gpu_env: dict) -> None:
    os.environ.update(gpu_env)
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **engine, enable_prefix_caching=True)
    defaults = dict(llm.llm_engine.model_config.get_diff_sampling_param() or {})
    conn.send("ready")
    while True:
        kind, payload = conn.recv()
        if kind == "stop":
            return
        params = [SamplingParams(**{**defaults, "max_tokens": n}, ignore_eos=True) for _, n in payload]
        t = time.monotonic()
        outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in payload], params, use_tqdm=False)
        conn.send((sum(len(o.outputs[0].token_ids) for o in outs), time.monotonic() - t))


def ref(args) -> None:
    """The reference design: N vllm.LLM instances, one per GPU (one process each).
    batch: the prompt list split into N equal chunks, one generate() per instance.
    per-call: each DSPy call round-robin to an instance, generate([prompt]) under its lock."""
    import multiprocessing as mp

    from transformers import AutoTokenizer

    model = _model(args)
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    t0 = time.monotonic()
    for g in range(args.gpus):
        parent, child = ctx.Pipe()
        env = {"VLLM_CPU_OMP_THREADS_BIND": str(g)} if args.cpu else {"CUDA_VISIBLE_DEVICES": str(g)}
        p = ctx.Process(target=_ref_worker, args=(child, model, _engine(args), env))
        p.start()
        conns.append(parent)
        procs.append(p)
    for c in conns:
        assert c.recv() == "ready"
    emit({"system": "reference", "event": "start", "instances": args.gpus, "seconds": round(time.monotonic() - t0, 1)})
    seed = 201
    for k in [k for k in (1, 2, 4, 8) if k <= args.gpus]:
        prompts = [(p, W1_OUT) for p in w1_prompts(args.w1_per_gpu * k, seed)]
        seed += 1
        size = len(prompts) // k
        t = time.monotonic()
        for i in range(k):
            conns[i].send(("batch", prompts[i * size:(i + 1) * size]))
        replies = [conns[i].recv() for i in range(k)]
        dt = time.monotonic() - t
        done = sorted(r[1] for r in replies)
        emit({"system": "reference-static" if k > 1 else "raw-llm-generate", "workload": "W1", "replicas": k,
              "requests": len(prompts), "req_s": round(len(prompts) / dt, 2),
              "out_tok_s": round(sum(r[0] for r in replies) / dt), "seconds": round(dt, 1),
              "tail_s": round(done[-1] - done[0], 1)})
    tok = AutoTokenizer.from_pretrained(model)
    reqs = w2_requests(args.w2_percall, seed)
    payload = [(tok.encode(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False), n) for m, n in reqs]
    for label, mode in (("reference-static", "batch"), ("reference-percall", "percall")):
        t = time.monotonic()
        if mode == "batch":
            size = -(-len(payload) // args.gpus)
            for i in range(args.gpus):
                conns[i].send(("batch", payload[i * size:(i + 1) * size]))
            replies = [conns[i].recv() for i in range(args.gpus)]
            toks = sum(r[0] for r in replies)
            done = sorted(r[1] for r in replies)
            extra = {"tail_s": round(done[-1] - done[0], 1)}
        else:
            locks = [threading.Lock() for _ in conns]
            rr = iter(range(10**9))

            def call(item):
                i = next(rr) % args.gpus
                with locks[i]:
                    conns[i].send(("batch", [item]))
                    return conns[i].recv()[0]

            with concurrent.futures.ThreadPoolExecutor(max(args.threads)) as ex:
                toks = sum(ex.map(call, payload))
            extra = {"threads": max(args.threads)}
        dt = time.monotonic() - t
        emit({"system": label, "workload": "W2", "replicas": args.gpus, "requests": len(payload),
              "req_s": round(len(payload) / dt, 2), "out_tok_s": round(toks / dt), "seconds": round(dt, 1), **extra})
    for c in conns:
        c.send(("stop", None))
    for p in procs:
        p.join(timeout=60)


def w3_prompts(candidates: int, questions: int, prefix_tokens: int, seed: int) -> list[list[int]]:
    """Optimiser-shaped: each candidate instruction a long shared prefix, then one
    question; candidates interleaved, as an optimiser's threads submit them."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000, VOCAB) for _ in range(prefix_tokens)] for _ in range(candidates)]
    items = [prefixes[c] + [rng.randrange(1000, VOCAB) for _ in range(64)]
             for q in range(questions) for c in range(candidates)]
    # Shuffled: an optimiser's threads submit candidates in no fixed rhythm (a
    # strict c0, c1, ... cycle would let round-robin group candidates by luck).
    rng.shuffle(items)
    return items


def ours_w3(args) -> None:
    """W1 again after a warm-up, then W3 (routing) on engines with a KV cache that holds a few prefixes."""
    from vllm_dspy_adapter.router import PrefixRouter, RoundRobinRouter, Router

    class StaticRouter(Router):
        """The static contiguous split: the i-th of n requests goes to replica i*k//n."""

        name = "static"

        def __init__(self, n, k):
            self.n, self.k, self.i = n, k, 0

        def choose(self, prompt, loads):
            index = self.i * self.k // self.n
            self.i += 1
            return index

    place = {"num_replicas": args.gpus} if args.cpu else {"num_gpus": args.gpus}
    seed = 501
    if not args.skip_w1:
        _w1_warm(args, place)
    _w3(args, place, seed, PrefixRouter, RoundRobinRouter, StaticRouter)


def _w1_warm(args, place) -> None:
    from vllm_dspy_adapter import vLLMOfflineMultiGPU

    t0 = time.monotonic()
    lm = vLLMOfflineMultiGPU(_model(args), **place, **_engine(args), cache=False,
                             sampling_params={"ignore_eos": True}, routing="least_loaded")
    emit({"system": "ours", "event": "start", "replicas": args.gpus, "seconds": round(time.monotonic() - t0, 1)})
    lm.batch_generate([{"prompt_token_ids": p} for p in w1_prompts(64 * args.gpus, 999)], max_tokens=64,
                      progress=False)  # warm-up: first batches of each shape compile kernels
    _measure_w1(lm, args, "W1-warm", seed=501)
    lm.shutdown()


def _w3(args, place, seed, PrefixRouter, RoundRobinRouter, StaticRouter) -> None:
    from vllm_dspy_adapter import vLLMOfflineMultiGPU

    blocks = args.w3_blocks
    lm = vLLMOfflineMultiGPU(_model(args), **place, **_engine(args), cache=False, num_gpu_blocks_override=blocks,
                             sampling_params={"ignore_eos": True}, routing="prefix")
    pool = lm._runtime.pool
    for name, router in (("prefix", lambda n: PrefixRouter()), ("round_robin", lambda n: RoundRobinRouter()),
                         ("static", lambda n: StaticRouter(n, args.gpus))):
        prompts = [{"prompt_token_ids": p} for p in w3_prompts(32, args.w3_questions, args.w3_prefix, seed)]
        seed += 1
        pool.router = router(len(prompts))
        t = time.monotonic()
        outs = lm.batch_generate(prompts, max_tokens=64, progress=False, return_outputs=True)
        dt = time.monotonic() - t
        cached = sum(o.num_cached_tokens for o in outs) / max(1, sum(o.num_prompt_tokens for o in outs))
        emit({"system": f"ours-{name}", "workload": "W3", "replicas": args.gpus, "requests": len(outs),
              "req_s": round(len(outs) / dt, 2), "out_tok_s": round(sum(o.num_output_tokens for o in outs) / dt),
              "seconds": round(dt, 1), "kv_blocks": blocks, "prefix_hit": round(cached, 3)})
    lm.shutdown()


def _model(args) -> str:
    from vllm_dspy_adapter.models import benchmark_model_path, resolve_model

    return resolve_model(None) if args.cpu else benchmark_model_path()


def _engine(args) -> dict:
    if args.cpu:  # smoke run of this script on a CPU machine with the tiny default model
        return {"enforce_eager": True, "max_model_len": 2048}
    return {"load_format": "dummy", "max_model_len": 4096}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["ours", "raw", "ref", "w3"])
    parser.add_argument("--w3-blocks", type=int, default=1024, help="KV blocks (16 tokens) per replica for W3")
    parser.add_argument("--w3-questions", type=int, default=64)
    parser.add_argument("--skip-w1", action="store_true")
    parser.add_argument("--w3-prefix", type=int, default=2500)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--w1-per-gpu", type=int, default=768)
    parser.add_argument("--w2-per-gpu", type=int, default=384)
    parser.add_argument("--threads", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--w2-percall", type=int, default=256, help="W2 requests for the reference per-call path")
    parser.add_argument("--cpu", action="store_true", help="smoke run on CPU: default model, CPU replicas")
    args = parser.parse_args()
    if args.cpu:
        global VOCAB
        VOCAB = 40000
    {"ours": ours, "raw": raw, "ref": ref, "w3": ours_w3}[args.phase](args)


if __name__ == "__main__":
    main()
