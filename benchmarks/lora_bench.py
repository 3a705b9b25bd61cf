"""LoRA serving throughput (issue 15, item 4): W2's DSPy-shaped requests sent from
DSPy-style threads, each with one of K adapters (round robin), against the base
model alone; with and without adapter-aware routing when there are several replicas.

    python -m benchmarks.lora_bench --gpus 1 --adapters 0,1,4,16 --out /tmp/lora
    python -m benchmarks.lora_bench --gpus 2 --adapters 0,16 --routing adapter,plain
    python -m benchmarks.lora_bench --gpus 1 --adapters 16 --max-loras 0,4,16   # the default beside 4 and 16
    python -m benchmarks.lora_bench --smoke          # CPU: 2 replicas of a tiny model, numbers mean nothing

Adapters are random (rank ``--rank``, every attention and MLP projection), written
straight from the model's config.json shapes, so no model is loaded to build them.
The model defaults to the Qwen3-8B-shaped folder with dummy weights (as ``benchmarks.run``).
One JSON line per run is printed (prefix ``@@LORA``) and appended to ``--out``/lora.jsonl.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time

from .dspy_calls import chat_call

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(model_dir: str, out_dir: str, rank: int, seed: int, scale: float = 0.01) -> str:
    """A PEFT-format LoRA for ``model_dir``'s shapes, with random A and B of standard
    deviation ``scale`` (0.1 makes a small model's greedy answers differ from the base's)."""
    import torch
    from safetensors.torch import save_file

    config = json.load(open(os.path.join(model_dir, "config.json")))
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
              "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator).mul_(scale).bfloat16()
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator).mul_(scale).bfloat16()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
                   "target_modules": list(TARGETS), "task_type": "CAUSAL_LM",
                   "base_model_name_or_path": model_dir}, fh)
    return out_dir


def run_once(lm, adapters: list[str], messages, lengths, threads: int) -> dict:
    """Every request from a pool of ``threads`` threads, as DSPy's Evaluate sends them."""
    lms = [lm.with_adapter(name) for name in adapters] or [lm]
    before = sum(s.get("output_tokens", 0) for s in lm.stats())
    started = time.monotonic()

    def call(i: int) -> None:
        chat_call(lms[i % len(lms)], messages[i], max_tokens=lengths[i], temperature=0.0)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(call, range(len(messages))))
    seconds = time.monotonic() - started
    out_tokens = sum(s.get("output_tokens", 0) for s in lm.stats()) - before
    return {"requests": len(messages), "seconds": round(seconds, 2), "req_s": round(len(messages) / seconds, 2),
            "out_tok_s": round(out_tokens / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the Qwen3-8B-shaped folder, dummy weights)")
    parser.add_argument("--gpus", type=int, default=1, help="replicas, one per GPU (CPU replicas without GPUs)")
    parser.add_argument("--adapters", default="0,1,4,16", help="adapter counts to run (0: the base model)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-loras", default=None,
                        help="adapters in one replica's GPU slots, comma-separated for one engine start each, "
                             "side by side in one run; 0: not set (the LM's default); default 4 (smoke: 2)")
    parser.add_argument("--routing", default="adapter,plain", help="with several replicas: adapter and/or plain")
    parser.add_argument("--requests", type=int, default=512, help="requests per replica")
    parser.add_argument("--threads", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--load-format", default="dummy", help="vLLM load_format (dummy: random weights)")
    parser.add_argument("--out", help="folder for lora.jsonl and the adapters")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    from vllm_dspy_adapter import vLLMOfflineMultiGPU, visible_gpu_count

    from .options import Settings
    from .workloads import w2_messages

    on_gpu = visible_gpu_count() > 0
    settings = Settings(smoke=args.smoke, on_gpu=on_gpu)
    if args.smoke:
        from .smoke_model import tiny_model_path

        model, args.requests, args.threads, args.rank, args.gpus = tiny_model_path(), 4, 4, 8, 2
        args.adapters, args.max_model_len = "0,3", 1024
        args.max_loras = args.max_loras or "2"
        settings.w2_max_output, settings.w2_mean_output = 16, 8
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    else:
        from .bench_models import benchmark_model_path

        model = args.model or benchmark_model_path()
    out = args.out or os.path.join("/tmp", "lora-bench")
    counts = [int(c) for c in args.adapters.split(",")]
    paths = [write_random_adapter(model, os.path.join(out, "adapters", f"a{i}"), args.rank, seed=i)
             for i in range(max(counts))]
    routings = args.routing.split(",") if args.gpus > 1 else ["adapter"]
    engine = dict(max_model_len=args.max_model_len, enforce_eager=args.smoke, load_format=args.load_format)
    placement = {"num_gpus": args.gpus} if on_gpu else {"num_replicas": args.gpus}
    slots = [int(n) for n in (args.max_loras or "4").split(",")]
    for max_loras, routing in [(n, r) for n in slots for r in routings]:
        with vLLMOfflineMultiGPU(model, **placement, routing="least_loaded", enable_lora=True,
                                 **({"max_loras": max_loras} if max_loras else {}),
                                 max_lora_rank=args.rank, cache=False, adapter_routing=routing == "adapter",
                                 **engine) as lm:
            for count in counts:
                names = [f"a{i}" for i in range(count)]
                for name, path in zip(names, paths):
                    if name not in {a["name"] for a in lm.adapters()}:
                        lm.load_adapter(name, path)
                messages, lengths = w2_messages(settings, args.requests * args.gpus,
                                                f"lora-{max_loras}-{routing}-{count}")
                row = {"replicas": args.gpus, "adapters": count, "rank": args.rank, "max_loras": max_loras,
                       "routing": routing, "threads": args.threads,
                       **run_once(lm, names, messages, lengths, args.threads)}
                print("@@LORA " + json.dumps(row), flush=True)
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "lora.jsonl"), "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print("lora_bench: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
