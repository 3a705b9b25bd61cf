"""W6 "optimiser" (issue 20): the generated-shared-prefix shape of SGLang's ``bench_serving``
(64 groups x 16 questions, 2,048-token prefix, 128-token questions, 256 output tokens) on
several replicas of one GPU (``replicas_per_gpu``) with the KV cache squeezed so that not
every prefix fits one replica; ours under each routing policy against raw vLLM engines fed
the same requests, with each replica's prefix-cache hit rate beside each row.

    python -m benchmarks.w6_bench --replicas 2,3,4 --out $OUT                 # one H200
    python -m benchmarks.w6_bench --smoke                                     # CPU: tiny model, numbers mean nothing

Systems (``--systems``): ``cache``, ``prefix``, ``round_robin``, ``least_loaded`` (ours,
``vLLMOfflineMultiGPU(routing=...)``, one LM start each) and ``raw`` (k ``AsyncLLM`` engines
on the GPU: every request at once round robin, from threads to the engine with the fewest
in flight). Modes (``--modes``): ``batch`` (every request at once: ``batch_generate``, which
groups by prefix) and ``threads`` (``--threads`` DSPy-style threads calling ``lm(Request)``).
Requests are chat messages: the prefix is the system message, the question the user's,
both decoded from random token ids; every run draws fresh ones (same for every system).
``--replay FILE``: the calls a real optimiser made (``benchmarks.record_optimiser``: GEPA
on the default model, CPU build) instead of the generated shape, in their recorded order.
Each row: ``@@W6 {json}`` on stdout and appended to ``--out``/w6.jsonl; a table with
each system's ratio to round robin ends the run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from dataclasses import replace

from .dspy_calls import chat_call

OURS = ("cache", "prefix", "round_robin", "least_loaded")
ENGINE_ARGS: dict = {}  # --engine-arg, recorded in every row
REPLAY: list[str] = []  # --replay FILE


def chat_requests(tokenizer, shape, run_key: str):
    if REPLAY:
        return replay_requests(REPLAY[0], run_key)
    from .workloads import Request, w6

    workload = w6(tokenizer, shape, run_key)
    out = []
    for r in workload.requests:
        prefix, question = r.token_ids[:shape.prefix_len], r.token_ids[shape.prefix_len:]
        out.append(Request(max_tokens=r.max_tokens, group=r.group, messages=[
            {"role": "system", "content": tokenizer.decode(prefix)},
            {"role": "user", "content": tokenizer.decode(question)}]))
    return out


def replay_requests(path: str, run_key: str):
    """The calls ``benchmarks.record_optimiser`` recorded, in their order; the first message
    carries the run key, so that a run never hits the cache of the one before it."""
    from .workloads import Request

    out = []
    with open(path) as fh:
        for line in fh:
            call = json.loads(line)
            messages = [dict(m) for m in call["messages"]]
            messages[0]["content"] = f"(run {run_key}) " + messages[0]["content"]
            out.append(Request(max_tokens=int(call.get("max_tokens") or 128), messages=messages))
    return out


def squeeze(shape, prefixes: int, model: str, on_gpu: bool) -> dict:
    """Engine arguments that leave each replica room for about ``prefixes`` prefixes."""
    from .workloads import kv_bytes_per_token, w6_kv_tokens

    tokens = w6_kv_tokens(shape, prefixes)
    if on_gpu:
        return {"kv_cache_memory_bytes": tokens * kv_bytes_per_token(model)}
    return {"num_gpu_blocks_override": -(-tokens // 128)}  # the CPU build's 128-token blocks


class OursW6:
    def __init__(self, model, engine, k: int, policy: str, on_gpu: bool, spill_at: int | None = None):
        from vllm_dspy_adapter import vLLMOfflineMultiGPU

        from .systems import subset_router

        place = {"num_gpus": 1, "replicas_per_gpu": k} if on_gpu else {"num_replicas": k}
        self.router = subset_router(policy)
        if spill_at is not None:
            place["spill_at"] = spill_at
        self.lm = vLLMOfflineMultiGPU(model, **place, routing=self.router, cache=False,
                                      sampling_params={"ignore_eos": True}, **engine)

    def use(self, policy: str) -> None:
        self.router.use(policy)

    def counters(self) -> list[tuple[int, int]]:
        return [(int(s.get("prompt_tokens") or 0), int(s.get("cached_tokens") or 0)) for s in self.lm.stats()]

    def batch(self, requests) -> None:
        self.lm.batch_generate([r.messages for r in requests], progress=False, temperature=0.0,
                               per_prompt=[{"max_tokens": r.max_tokens} for r in requests])

    def call(self, r) -> None:
        chat_call(self.lm, r.messages, max_tokens=r.max_tokens, temperature=0.0)

    def close(self) -> None:
        self.lm.shutdown()


class RawW6:
    """k AsyncLLM engines on the GPU (``systems.RawAsync``), counting each engine's cached tokens."""

    def __init__(self, model, engine, k: int, on_gpu: bool):
        from .systems import RawAsync

        if on_gpu and k > 1:  # RawAsync splits the GPU only without kv_cache_memory_bytes: split it here too
            engine = {**engine, "gpu_memory_utilization": engine.get("gpu_memory_utilization", 0.9) / k}
        self.raw = RawAsync(model, engine, dp=1, ignore_eos=True, engines_per_gpu=k)
        self.totals = [[0, 0] for _ in range(k)]
        raw, totals = self.raw, self.totals

        async def one(r, least_busy: bool = False) -> int:  # RawAsync._one, with the hit counts
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            from .systems import _sampling, render_chat

            params = SamplingParams(**_sampling(r, True), output_kind=RequestOutputKind.FINAL_ONLY)
            raw._ids += 1
            slot = raw._pick(least_busy)
            raw._in_flight[slot] += 1
            final = None
            try:
                async for out in raw.engines[slot].generate(render_chat(raw.tokenizer, r.messages), params,
                                                            f"w6-{raw._ids}"):
                    final = out
            finally:
                raw._in_flight[slot] -= 1
            totals[slot][0] += len(final.prompt_token_ids)
            totals[slot][1] += final.num_cached_tokens or 0
            return len(final.outputs[0].token_ids)

        raw._one = one

    def counters(self):
        return [tuple(t) for t in self.totals]

    def batch(self, requests) -> None:
        self.raw.batch(requests)

    def threads(self, requests, threads: int) -> None:
        self.raw.concurrent(requests, threads)

    def close(self) -> None:
        self.raw.close()


def measure(system, label: str, k: int, mode: str, requests, threads: int) -> dict:
    before = system.counters()
    started = time.monotonic()
    if mode == "batch":
        system.batch(requests)
    elif isinstance(system, RawW6):
        system.threads(requests, threads)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(system.call, requests))
    seconds = time.monotonic() - started
    after = system.counters()
    hits = [round((c1 - c0) / (p1 - p0), 3) if p1 > p0 else None for (p0, c0), (p1, c1) in zip(before, after)]
    prompt = sum(p1 - p0 for (p0, _), (p1, _) in zip(before, after))
    cached = sum(c1 - c0 for (_, c0), (_, c1) in zip(before, after))
    out_tokens = sum(r.max_tokens for r in requests)  # ignore_eos: every request writes all of them
    return {"system": label, "replicas": k, "mode": mode, "engine_args": ENGINE_ARGS, "threads": threads if mode == "threads" else None,
            "requests": len(requests), "seconds": round(seconds, 2), "req_s": round(len(requests) / seconds, 3),
            "out_tok_s": round(out_tokens / seconds, 1), "hit_rate": round(cached / prompt, 3) if prompt else None,
            "hit_rate_per_replica": hits}


def warm_up(system, tokenizer, shape, k: int) -> None:
    """One small unmeasured batch after a start (the first steps of an engine are slow)."""
    small = replace(shape, groups=2 * k, questions=2, output_len=8)
    system.batch(chat_requests(tokenizer, small, f"warm-up-{k}")[:4 * k])


def table(rows: list[dict]) -> str:
    lines = [f"{'system':<14} {'k':>2} {'mode':<8} {'req/s':>8} {'out tok/s':>10} {'x rr':>6} {'hit':>6}  per replica"]
    base = {(r["replicas"], r["mode"]): r["req_s"] for r in rows if r["system"] == "round_robin"}
    for r in rows:
        ratio = r["req_s"] / base[(r["replicas"], r["mode"])] if base.get((r["replicas"], r["mode"])) else None
        lines.append(f"{r['system']:<14} {r['replicas']:>2} {r['mode']:<8} {r['req_s']:>8.2f} {r['out_tok_s']:>10,.0f} "
                     f"{(f'{ratio:.2f}' if ratio else '-'):>6} {r['hit_rate'] if r['hit_rate'] is not None else '-':>6}  "
                     f"{r['hit_rate_per_replica']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the Qwen3-8B-shaped folder, dummy weights)")
    parser.add_argument("--shape", default="8b", help="benchmark model shape when --model is not given (0.6b, 8b)")
    parser.add_argument("--replicas", default="2,3,4", help="replicas on the one GPU (replicas_per_gpu)")
    parser.add_argument("--systems", default="cache,prefix,round_robin,least_loaded,raw")
    parser.add_argument("--modes", default="batch,threads")
    parser.add_argument("--threads", type=int, default=256)
    parser.add_argument("--spill-at", type=int, help="ours: vLLMOfflineMultiGPU(spill_at=...) (default: the LM's, 256)")
    parser.add_argument("--kv-prefixes", type=int, default=12, help="prefixes one replica's KV cache holds")
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--question-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--one-lm", action="store_true", help="ours: one LM start per k, policies switched on it")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra vLLM engine argument for every engine, ours and raw (the knob sweeps: "
                             "max_num_seqs=512, max_num_batched_tokens=16384, ...)")
    parser.add_argument("--replay", help="send the calls recorded by benchmarks.record_optimiser instead")
    parser.add_argument("--out", help="folder for w6.jsonl")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    from vllm_dspy_adapter import visible_gpu_count

    from .workloads import W6Shape

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    on_gpu = visible_gpu_count() > 0
    shape = W6Shape(groups=args.groups, questions=args.questions, prefix_len=args.prefix_len,
                    question_len=args.question_len, output_len=args.output_len)
    engine = {"max_model_len": args.max_model_len, "load_format": "dummy"}
    if args.smoke:
        from .smoke_model import tiny_model_path

        model = tiny_model_path()
        shape = replace(shape, groups=4, questions=3, prefix_len=256, question_len=16, output_len=4)
        args.replicas, args.threads, args.kv_prefixes, args.one_lm = "2", 8, 2, True
        engine.update(max_model_len=1024, enforce_eager=True)
    else:
        from .bench_models import benchmark_model_path

        model = args.model or benchmark_model_path(shape=args.shape)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    engine.update(squeeze(shape, args.kv_prefixes, model, on_gpu))
    from .options import _engine_arg

    ENGINE_ARGS.update(dict(_engine_arg(text) for text in args.engine_arg))
    if args.replay:
        REPLAY.append(args.replay)
    ENGINE_ARGS.update({k: v for k, v in os.environ.items() if k == "VLLM_USE_FLASHINFER_SAMPLER"})
    engine.update({k: v for k, v in ENGINE_ARGS.items() if not k.startswith("VLLM_")})
    systems = args.systems.split(",")
    modes = args.modes.split(",")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print("@@W6 " + json.dumps(row), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "w6.jsonl"), "a") as fh:
                fh.write(json.dumps(row) + "\n")

    for k in [int(x) for x in args.replicas.split(",")]:
        # One LM for all (--one-lm) starts under "cache", so that its engines publish their events.
        ours = sorted((s for s in systems if s in OURS), key=lambda s: s != "cache")
        starts = [ours] if args.one_lm and ours else [[s] for s in ours]
        for group in starts:
            system = OursW6(model, engine, k, group[0], on_gpu, spill_at=args.spill_at)
            try:
                warm_up(system, tokenizer, shape, k)
                for policy in group:
                    system.use(policy)
                    for mode in modes:
                        # one LM for every policy: fresh prompts per policy, or the next would hit the last's
                        key = f"{k}-{mode}" + (f"-{policy}" if args.one_lm else "")
                        row = measure(system, policy, k, mode, chat_requests(tokenizer, shape, key), args.threads)
                        emit({**row, "spill_at": args.spill_at})
            finally:
                system.close()
        if "raw" in systems:
            raw = RawW6(model, engine, k, on_gpu)
            try:
                warm_up(raw, tokenizer, shape, k)
                for mode in modes:
                    emit(measure(raw, "raw", k, mode, chat_requests(tokenizer, shape, f"{k}-{mode}"), args.threads))
            finally:
                raw.close()
    print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
