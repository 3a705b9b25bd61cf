"""Engine knobs side by side (issue 20, item 3): the LM (``vLLMOffline``, one engine) started
under each configuration in turn, in one process, each start measured on the same workloads
with the same prompts, so every ratio compares runs of one call on one card.

    python -m benchmarks.knob_bench --shape 0.6b --configs vllm:max_num_seqs=1024 lm: \\
        --order vllm,lm,lm,vllm --workloads w5-batch,w5-256,w2-256,w1,w6 --out $OUT/knob
    python -m benchmarks.knob_bench --smoke          # CPU: tiny model, numbers mean nothing

``--configs``: ``LABEL:KEY=VALUE,KEY=VALUE`` (``LABEL:`` alone: the LM's own defaults, which
is what a user who sets nothing gets: on an H100 or H200 ``max_num_seqs=2048``, twice vLLM's;
``vllm:max_num_seqs=1024`` is vLLM's own there). A key ``sampling.NAME`` is a ``SamplingParams``
field for every request of that start (the LM's ``sampling_params``), for instance
``final:sampling.detokenize=false`` (vLLM's per-step detokenisation off, the answer decoded
once). ``--order``: the labels, one engine start each; a
label that comes back starts again (round 2), and its rows are the same prompts as round 1's
of every label. Workloads (the harness's generators, ``benchmarks/workloads.py``):
``w5-batch`` (W5, every request at once through ``batch_generate``), ``w5-N`` (W5 from N DSPy
threads), ``w2-N`` (W2's DSPy-shaped calls from N threads), ``w1`` (W1 at once), ``w6`` (W6's
shared-prefix shape at once). Each row: ``@@KNOB {json}`` on stdout and in ``--out``/knob.jsonl;
the end prints each label's rate per workload and its ratio to the first label.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

from . import child
from . import workloads as wl
from .options import Settings, _engine_arg


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    label, _, rest = text.partition(":")
    if not label:
        raise SystemExit(f"--configs {text!r}: expected LABEL:KEY=VALUE,... (LABEL: alone for the LM's defaults)")
    return label, dict(_engine_arg(item) for item in rest.split(",") if item)


def build(settings: Settings, name: str, tokenizer, round_no: int) -> wl.Workload:
    """One workload's requests; the key holds the round, not the label: every label of a
    round gets the same prompts (each start has a fresh cache)."""
    key = f"knob|{name}|round{round_no}"
    if name == "w5-batch":
        return wl.w5(tokenizer, settings, "W5-batch", settings.w5_requests_per_gpu, key)
    if name.startswith("w5-"):
        threads = int(name[3:])
        return wl.w5(tokenizer, settings, "W5-threads", max(threads * settings.w5_rounds, settings.w5_min_requests),
                     key, threads=threads)
    if name.startswith("w2-"):
        threads = int(name[3:])
        return wl.w2(settings, "W2-threads", min(settings.w2_requests_per_gpu, threads * settings.w2_rounds), key,
                     threads=threads)
    if name == "w1":
        return wl.w1(tokenizer, settings, settings.w1_requests_per_gpu, key)
    if name == "w6":
        shape = wl.W6Shape() if settings.on_gpu else wl.W6Shape(groups=4, questions=3, prefix_len=128,
                                                                  question_len=16, output_len=4)
        return wl.w6(tokenizer, shape, key)
    raise SystemExit(f"unknown workload {name!r} (w5-batch, w5-N, w2-N, w1, w6)")


def table(rows: list[dict], labels: list[str]) -> str:
    """Each label's mean rate per workload over its starts, and its ratio to the first label's."""
    names = list(dict.fromkeys(r["workload"] for r in rows))
    lines = [f"{'workload':<10} " + " ".join(f"{lab + ' req/s':>18}" for lab in labels)
             + "".join(f" {lab + '/' + labels[0]:>16}" for lab in labels[1:]) + "   per start"]
    for name in names:
        means = {}
        for lab in labels:
            rates = [r["req_s"] for r in rows if r["workload"] == name and r["label"] == lab and r.get("req_s")]
            means[lab] = sum(rates) / len(rates) if rates else None
        each = {lab: [round(r["req_s"], 1) for r in rows if r["workload"] == name and r["label"] == lab
                      and r.get("req_s")] for lab in labels}
        cells = " ".join(f"{(f'{means[lab]:.2f}' if means[lab] else '-'):>18}" for lab in labels)
        ratios = "".join(f" {(f'{means[lab] / means[labels[0]]:.3f}x' if means[lab] and means[labels[0]] else '-'):>16}"
                         for lab in labels[1:])
        lines.append(f"{name:<10} {cells}{ratios}   {each}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the benchmark shape's folder, dummy weights)")
    parser.add_argument("--shape", default="0.6b", help="benchmark model shape when --model is not given (0.6b, 8b)")
    parser.add_argument("--configs", nargs="+", default=["vllm:max_num_seqs=1024", "lm:"])
    parser.add_argument("--order", help="labels, one start each (default: every label, then the same in reverse, "
                                        "A B B A: the first start of a configuration runs slower, see BENCHMARKS.md)")
    parser.add_argument("--workloads", default="w5-batch,w5-256,w2-256,w1,w6")
    parser.add_argument("--w5-requests", type=int, default=4096)
    parser.add_argument("--w1-requests", type=int, default=1024)
    parser.add_argument("--w2-requests", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--budget-s", type=float, default=540, help="start no engine after this many seconds")
    parser.add_argument("--start-s", type=float, default=150, help="what one start and its workloads need at least")
    parser.add_argument("--out", help="folder for knob.jsonl")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    began = time.monotonic()

    from vllm_dspy_adapter import visible_gpu_count

    from .systems import Ours

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    on_gpu = visible_gpu_count() > 0
    configs = dict(parse_config(text) for text in args.configs)
    labels = list(configs)
    order = args.order.split(",") if args.order else labels + labels[::-1]
    unknown = [lab for lab in order if lab not in configs]
    if unknown:
        raise SystemExit(f"--order names {unknown}, not in --configs ({labels})")
    settings = Settings(on_gpu=on_gpu, w5_requests_per_gpu=args.w5_requests, w1_requests_per_gpu=args.w1_requests,
                        w2_requests_per_gpu=args.w2_requests, max_model_len=args.max_model_len)
    engine: dict[str, Any] = {"max_model_len": args.max_model_len, "load_format": "dummy"}
    if args.smoke:
        from .smoke_model import tiny_model_path

        model = tiny_model_path()
        settings = replace(settings, w5_requests_per_gpu=16, w5_prompt_len=32, w5_output_len=4, w5_min_requests=8,
                           w5_rounds=1, w1_requests_per_gpu=8, w1_prompt_len=32, w1_output_len=4,
                           w2_requests_per_gpu=8, w2_mean_output=4, w2_max_output=8, w2_min_output=2,
                           max_model_len=1024)
        engine.update(max_model_len=1024, enforce_eager=True, kv_cache_memory_bytes=settings.cpu_kv_cache_bytes)
    else:
        from .bench_models import benchmark_model_path

        model = args.model or benchmark_model_path(shape=args.shape)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    names = args.workloads.split(",")
    rows: list[dict] = []
    seen: dict[str, int] = {}

    def emit(row: dict) -> None:
        rows.append(row)
        print("@@KNOB " + json.dumps(row), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "knob.jsonl"), "a") as fh:
                fh.write(json.dumps(row) + "\n")

    try:
        for label in order:
            if time.monotonic() - began > args.budget_s - args.start_s:
                print(f"== {label}: not started, out of --budget-s", flush=True)
                break
            seen[label] = round_no = seen.get(label, 0) + 1
            own = configs[label]
            config = {**engine, **{k: v for k, v in own.items() if not k.startswith("sampling.")}}
            sampling = {k[len("sampling."):]: v for k, v in own.items() if k.startswith("sampling.")}
            print(f"== {label} (round {round_no}): starting with {configs[label] or 'the LM defaults'}", flush=True)
            started = time.monotonic()
            driver = Ours(model, config, n=1, routing=None, tp=False, on_gpu=on_gpu, ignore_eos=True,
                          lm_kwargs={"sampling_params": sampling} if sampling else None)
            try:
                child.warm_up_w5(driver, settings, tokenizer, 1)
                start_s = time.monotonic() - started
                for name in names:
                    work = build(settings, name, tokenizer, round_no)
                    row = {"label": label, "round": round_no, "engine_args": configs[label], "workload": name,
                           "start_s": round(start_s, 1), "shape": args.shape if not args.model else args.model}
                    row.update(child.measure(driver, work))
                    emit(row)
            finally:
                driver.close()
    except KeyboardInterrupt:
        print("== interrupted: the rows so far", flush=True)
    print(table(rows, labels), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
