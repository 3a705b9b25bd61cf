"""The plan of a run: the model folder, the engine arguments of every layout, deadlines."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

@dataclasses.dataclass
class Plan:
    cpu: bool
    model: str
    tokenizer: str | None
    engine: dict[str, Any]          # every layout
    single_memory: float | None     # vLLMOffline and proc1 on GPU
    rpg2_memory: float | None       # replicas_per_gpu=2, total per GPU
    vocab_size: int
    scale: float                    # deadline multiplier
    work_dir: str
    out_dir: str | None
    batch_prompt_len: int
    batch_max_tokens: int
    eval_n: int
    noise_max_tokens: int          # structured outputs on noise (see the docstring)


def _qwen3_tool_tokenizer(model: str, folder: str) -> str:
    """The default model's tokenizer with Qwen3's tool-calling chat template (as
    tests/test_tools_engine.py): the same ChatML tokens frame both."""
    from ..bench_models import QWEN3_CHAT_TEMPLATE

    os.makedirs(folder, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(model, name)):
            shutil.copy(os.path.join(model, name), os.path.join(folder, name))
    with open(os.path.join(folder, "chat_template.jinja"), "w") as fh:
        fh.write(QWEN3_CHAT_TEMPLATE)
    return folder


def make_plan(args: argparse.Namespace) -> Plan:
    work = tempfile.mkdtemp(prefix="gpu-smoke-")  # the adapter, the CPU tokenizer folder: not in --out
    if args.model:
        model, tokenizer = args.model, None
    elif args.cpu:
        from vllm_dspy_adapter.models import resolve_model

        model = resolve_model(None)  # $VLLM_DSPY_MODEL or the prepared default model's folder
        tokenizer = _qwen3_tool_tokenizer(model, os.path.join(work, "tokenizer-qwen3-template"))
    else:
        from ..bench_models import benchmark_weights_path

        # Random weights on disk too: vLLM still loads "dummy" ones, the GRPO trainer reads these.
        model, tokenizer = benchmark_weights_path(shape=args.shape), None
    with open(os.path.join(model, "config.json")) as fh:
        vocab = int(json.load(fh).get("vocab_size") or 32000)
    engine: dict[str, Any] = {"load_format": args.load_format, "max_model_len": args.max_model_len, "cache": False}
    if tokenizer:
        engine["tokenizer"] = tokenizer
    if args.cpu or args.eager:
        engine["enforce_eager"] = True
    return Plan(cpu=args.cpu, model=model, tokenizer=tokenizer, engine=engine,
                single_memory=None if args.cpu else args.gpu_memory_utilization,
                rpg2_memory=None if args.cpu else args.rpg2_memory_utilization, vocab_size=vocab,
                scale=args.deadline_scale or (2.5 if args.cpu else 1.0), work_dir=work, out_dir=args.out,
                batch_prompt_len=32 if args.cpu else 128, batch_max_tokens=8 if args.cpu else 64,
                eval_n=args.eval_n, noise_max_tokens=args.noise_max_tokens)
