"""What token streaming costs the requests beside it (issue 14, item 1).

N requests are sent at once through DSPy's async engine contract (the path
``dspy.streamify`` and ``acall`` take). In a "plain" round all N are whole-answer
requests; in a "mixed" round S of them are streamed (vLLM DELTA outputs, pieces
over the worker pipe) and the other N - S are not. The same N - S positions are
timed in both rounds: their requests/s from the common start to the last of them,
so both rounds carry the same load and differ only in the streaming. Rounds
alternate (plain, mixed, plain, mixed, ...) on one LM; every prompt starts with a
salt of its own, so no round reuses another's prefix cache.

    python -m benchmarks.stream_bench --gpus 1 --n 1024 --streamed 256       # a GPU, 8B-shaped dummy model
    python -m benchmarks.stream_bench --smoke                                 # CPU, default model, small N

Prints one line per round and the ratio mixed / plain (median over rounds); with
``--out`` appends the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import uuid

WORDS = ("river stone cloud paper orange window music garden silver letter engine yellow forest "
         "number bridge candle planet winter summer market").split()


def _request(text: str, max_tokens: int):
    from dspy.lm15 import Config, Message, Request

    return Request(model="m", messages=(Message.user(text),), config=Config(max_tokens=max_tokens, temperature=0.0))


def _engine_of(lm):
    """The async twin of the LM's DSPy engine (``lm.engine``, DSPy's public
    property), on the same runtime: what ``acall`` and ``dspy.streamify`` use."""
    from vllm_dspy_adapter.lm.dspy_engine import AsyncDSPyEngine

    return AsyncDSPyEngine(lm.engine.runtime)


async def _round(engine, texts: list[str], streamed: set[int], timed: list[int], max_tokens: int) -> dict:
    """Requests ``streamed`` stream, the others do not; ``timed`` are the positions timed."""
    started = time.monotonic()
    finished: dict[int, float] = {}
    pieces = 0

    async def plain(i: int) -> None:
        await engine.complete(_request(texts[i], max_tokens))
        finished[i] = time.monotonic() - started

    async def stream(i: int) -> None:
        nonlocal pieces
        async for event in engine.stream(_request(texts[i], max_tokens)):
            if event.type == "delta":
                pieces += 1
        finished[i] = time.monotonic() - started

    await asyncio.gather(*((stream if i in streamed else plain)(i) for i in range(len(texts))))
    return {"timed_end_s": max(finished[i] for i in timed), "all_end_s": max(finished.values()), "pieces": pieces,
            "timed": len(timed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the 8B-shaped dummy folder on a GPU)")
    p.add_argument("--gpus", type=int, default=1, help="replicas in worker processes (0: vLLMOffline in-process)")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--streamed", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="pairs of (plain, mixed) rounds")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--smoke", action="store_true", help="CPU: default model, N=64, 16 streamed, 32 tokens")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from vllm_dspy_adapter import vLLMOffline, vLLMOfflineMultiGPU

    kwargs = dict(cache=False, sampling_params={"ignore_eos": True}, max_model_len=2048)
    if args.smoke:
        args.n, args.streamed, args.max_tokens, args.prompt_words, args.rounds = 64, 16, 32, 60, 3
        model = args.model
        kwargs.update(enforce_eager=True)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        layout = dict(num_replicas=args.gpus) if args.gpus else None
    else:
        from .bench_models import benchmark_model_path

        model = args.model or benchmark_model_path()
        kwargs.update(load_format=args.load_format)
        layout = dict(num_gpus=args.gpus) if args.gpus else None
    lm = vLLMOffline(model=model, **kwargs) if layout is None else vLLMOfflineMultiGPU(model=model, **layout,
                                                                                       **kwargs)
    engine = _engine_of(lm)
    rng = random.Random(0)
    streamed = set(rng.sample(range(args.n), args.streamed))
    timed = [i for i in range(args.n) if i not in streamed]  # the same positions in both kinds of round
    rows = []
    try:
        asyncio.run(_round(engine, [f"warm-up {i}" for i in range(16)], set(range(4)), list(range(4, 16)), 8))
        for r in range(args.rounds):
            for kind in ("plain", "mixed"):
                salt = uuid.uuid4().hex[:8]
                texts = [f"{salt}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
                         for i in range(args.n)]
                out = asyncio.run(_round(engine, texts, streamed if kind == "mixed" else set(), timed, args.max_tokens))
                row = {"round": r, "kind": kind, "n": args.n, "streamed": args.streamed if kind == "mixed" else 0,
                       "max_tokens": args.max_tokens, "replicas": args.gpus, "model": os.path.basename(lm.model),
                       "timed_req_per_s": round(out["timed"] / out["timed_end_s"], 2), **out}
                rows.append(row)
                print(f"@@STREAM {json.dumps(row)}", flush=True)
    finally:
        lm.shutdown()
    ratios = [m["timed_req_per_s"] / p_["timed_req_per_s"]
              for p_, m in zip(rows[0::2], rows[1::2])]
    print(f"stream_bench: mixed / plain requests/s of the {args.n - args.streamed} non-streamed requests: "
          f"{', '.join(f'{x:.3f}' for x in ratios)} (median {statistics.median(ratios):.3f})", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "stream.jsonl"), "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    print("stream_bench: done")


if __name__ == "__main__":  # vLLM starts its engines in child processes (spawn)
    main()
