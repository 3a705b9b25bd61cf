"""Command-line options and the two presets (GPU default, ``--smoke`` for CPU).

Every option defaults to None on the command line and is filled from the preset
afterwards, so ``--smoke --w1-requests-per-gpu 16`` changes one number of the
smoke preset. The resulting ``Settings`` travels to each child process as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

SYSTEMS = ("raw-llm", "raw-async", "reference", "http", "ours", "tp", "ray")
ROUTINGS = ("prefix", "least_loaded", "round_robin")
WORKLOADS = ("w1", "w2", "w3", "w4", "w5")
DEFAULT_WORKLOADS = ("w1", "w2", "w3", "w4")  # W5 (small models, replicas per GPU) when asked for
W5_SYSTEMS = ("raw-async", "ours")
SAMPLERS = {"torch": "0", "flashinfer": "1"}  # W5 --w5-samplers -> VLLM_USE_FLASHINFER_SAMPLER


@dataclass
class Settings:
    smoke: bool = False
    on_gpu: bool = True
    device_name: str = ""
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    gpus: list[int] = field(default_factory=lambda: [1])
    # Systems measured at N=1 too (the others only at N>1).
    single_gpu_systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    routings: list[str] = field(default_factory=lambda: list(ROUTINGS))
    workloads: list[str] = field(default_factory=lambda: list(DEFAULT_WORKLOADS))
    # Throughput model (W1-W3): a folder with config + tokenizer; dummy weights by default.
    model: str | None = None
    load_format: str = "dummy"
    # W4's small real model (None: the adapter's default model).
    w4_model: str | None = None
    max_model_len: int = 4096
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)
    # CPU only: KV cache bytes per engine (vLLM's CPU backend otherwise reserves a
    # fraction of all memory per engine, which several engines cannot share).
    cpu_kv_cache_bytes: int = 512 << 20
    warmup_requests: int = 8
    # W1 uniform
    w1_requests_per_gpu: int = 1024
    w1_prompt_len: int = 512
    w1_output_len: int = 256
    # W2 DSPy-shaped
    w2_requests_per_gpu: int = 512
    w2_threads: list[int] = field(default_factory=lambda: [16, 64, 256])
    w2_rounds: int = 8  # a threads run sends min(requests, threads * rounds) requests
    w2_mean_output: int = 250
    w2_max_output: int = 2048
    w2_min_output: int = 8
    w2_demos: int = 4
    w2_percall_requests_per_gpu: int = 8  # the reference per-call design serves one request per GPU at a time
    # W3 optimiser-shaped
    w3_candidates: int = 32
    w3_questions: int = 64
    w3_prefix_min: int = 2000
    w3_prefix_max: int = 3000
    w3_question_len: int = 96
    w3_output_len: int = 64
    w3_order: str = "grouped"
    w3_kv_prefixes: int = 4  # KV cache per replica holds about this many prefixes; 0: W3 shares the main engine
    w3_kv_tokens: int | None = None  # explicit KV size in tokens per replica (overrides w3_kv_prefixes)
    # W4 end to end
    w4_examples: int = 64
    w4_threads: int = 16
    w4_max_tokens: int = 256
    w4_systems: list[str] = field(default_factory=lambda: ["ours"])
    w4_gpus: list[int] | None = None  # None: every --gpus value
    # W5 small models: k replicas (raw: k AsyncLLM engines) sharing each GPU
    replicas_per_gpu: list[int] = field(default_factory=lambda: [1, 2, 3])
    w5_shapes: list[str] = field(default_factory=lambda: ["0.6b"])
    w5_samplers: list[str] = field(default_factory=lambda: ["torch"])
    w5_requests_per_gpu: int = 8192
    w5_prompt_len: int = 256
    w5_output_len: int = 128
    w5_threads: list[int] = field(default_factory=lambda: [64, 256, 1024])
    w5_rounds: int = 8  # a threads run sends threads * rounds requests, at least w5_min_requests
    w5_min_requests: int = 1024
    w5_batch: bool = True
    # Where one engine's time goes: py-spy (if installed) on every process of the system
    # for this many seconds during W5-batch with one replica active; 0: off.
    profile_s: float = 0.0
    # Measure every smaller N of --gpus (and of --replicas-per-gpu) on the engines started
    # for the largest, by routing only to the first N replicas (one start per system).
    subsets: bool = False
    # Run control
    budget_s: float = 480.0
    min_job_s: float = 120.0  # do not start a job (engine start: 60-200 s on GPU) with less left
    server_start_timeout_s: float = 900.0
    group_jobs: bool = False
    out: str = "benchmarks/out"
    append: bool = False
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))


def smoke_preset() -> dict[str, Any]:
    """Smallest counts that still exercise every system and code path on 2 CPU cores."""
    return dict(
        smoke=True, gpus=[1, 2], single_gpu_systems=["raw-llm", "ours"], load_format="dummy", max_model_len=2048, enforce_eager=True,
        warmup_requests=2,
        w1_requests_per_gpu=4, w1_prompt_len=64, w1_output_len=8,
        w2_requests_per_gpu=4, w2_threads=[4], w2_rounds=2, w2_mean_output=12, w2_max_output=32,
        w2_min_output=2, w2_percall_requests_per_gpu=2,
        w3_candidates=4, w3_questions=3, w3_prefix_min=160, w3_prefix_max=240, w3_question_len=16,
        w3_output_len=4, w3_kv_prefixes=0,
        w4_examples=3, w4_threads=3, w4_max_tokens=64, w4_gpus=[1],
        replicas_per_gpu=[1, 2], w5_requests_per_gpu=4, w5_prompt_len=32, w5_output_len=8, w5_threads=[2],
        w5_rounds=2, w5_min_requests=4,
        budget_s=1500.0, min_job_s=20.0, group_jobs=True,
    )


def visible_gpu_count() -> int:
    """GPUs visible here, without initialising CUDA in this (parent) process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def device_name(on_gpu: bool) -> str:
    if not on_gpu:
        return f"cpu ({os.cpu_count()} cores)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
        return out or "gpu"
    except (OSError, subprocess.SubprocessError):
        return "gpu"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(choices):
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return names
    return parse


def _engine_arg(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Throughput of vllm-dspy-adapter against raw vLLM, the reference multi-GPU design, "
                    "vllm serve + dspy.LM, and tensor parallelism. Prints one table; writes "
                    "results.json and throughput.png to --out.")
    p.add_argument("--smoke", action="store_true", help="tiny CPU preset (test suite): every system, tiny counts")
    p.add_argument("--systems", type=_names(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)} (default: all)")
    p.add_argument("--gpus", type=_ints, help="comma list of GPU counts N (on CPU: replica counts); default 1,2,4 "
                                              "up to the visible GPUs")
    p.add_argument("--single-gpu-systems", type=_names(SYSTEMS),
                   help="systems also measured at N=1 (default: all; --smoke: raw-llm,ours)")
    p.add_argument("--routings", type=_names(ROUTINGS), help="routing policies for ours with N>1 (default: all)")
    p.add_argument("--workloads", type=_names(WORKLOADS),
                   help="comma list of w1,w2,w3,w4,w5 (default: w1-w4; w5: small models, replicas per GPU)")
    p.add_argument("--model", help="throughput model folder (default: bench_models.benchmark_model_path(), Qwen3-8B shape)")
    p.add_argument("--load-format", help="vLLM load_format of the throughput model (default dummy)")
    p.add_argument("--w4-model", help="W4's real model (default: the adapter's default model)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--enforce-eager", action="store_true", default=None)
    p.add_argument("--engine-arg", action="append", type=_engine_arg, default=[], metavar="KEY=VALUE",
                   help="extra vLLM engine argument for every engine (value parsed as JSON if it can be)")
    p.add_argument("--cpu-kv-cache-bytes", type=int)
    p.add_argument("--warmup-requests", type=int)
    for name, kind in [("w1-requests-per-gpu", int), ("w1-prompt-len", int), ("w1-output-len", int),
                       ("w2-requests-per-gpu", int), ("w2-rounds", int), ("w2-mean-output", int),
                       ("w2-max-output", int), ("w2-min-output", int), ("w2-demos", int),
                       ("w2-percall-requests-per-gpu", int),
                       ("w3-candidates", int), ("w3-questions", int), ("w3-prefix-min", int),
                       ("w3-prefix-max", int), ("w3-question-len", int), ("w3-output-len", int),
                       ("w3-kv-prefixes", int), ("w3-kv-tokens", int),
                       ("w4-examples", int), ("w4-threads", int), ("w4-max-tokens", int),
                       ("w5-requests-per-gpu", int), ("w5-prompt-len", int), ("w5-output-len", int),
                       ("w5-rounds", int), ("w5-min-requests", int), ("profile-s", float),
                       ("budget-s", float), ("min-job-s", float), ("server-start-timeout-s", float),
                       ("seed", int)]:
        p.add_argument("--" + name, type=kind)
    p.add_argument("--w2-threads", type=_ints, help="DSPy num_threads values for W2 (default 16,64,256)")
    p.add_argument("--w3-order", choices=("grouped", "interleaved"),
                   help="grouped: the 64 questions of candidate 0, then candidate 1, ... (how an optimiser "
                        "evaluates); interleaved: question-major")
    p.add_argument("--w4-systems", type=_names(("ours", "reference", "http")))
    p.add_argument("--replicas-per-gpu", type=_ints,
                   help="W5: replicas per GPU to measure (raw-async: that many AsyncLLM engines on one GPU, "
                        "memory split between them); default 1,2,3")
    p.add_argument("--w5-shapes", type=_names(("0.6b", "1.7b", "8b")), help="W5 model shapes (default 0.6b)")
    p.add_argument("--w5-samplers", type=_names(tuple(SAMPLERS)),
                   help="W5 sampler: torch (VLLM_USE_FLASHINFER_SAMPLER=0), flashinfer (=1); one engine "
                        "start each (default torch)")
    p.add_argument("--w5-threads", type=_ints, help="W5 calls in flight from DSPy-style threads (default 64,256,1024)")
    p.add_argument("--no-w5-batch", dest="w5_batch", action="store_false", default=None,
                   help="W5 without the every-request-at-once run")
    p.add_argument("--subsets", action="store_true", default=None,
                   help="start each system once for the largest N (and replicas per GPU) and measure every "
                        "smaller one on it by routing only to the first replicas (fewer engine starts)")
    p.add_argument("--w4-gpus", type=_ints)
    p.add_argument("--group-jobs", action="store_true", default=None,
                   help="run all jobs in one child process (saves imports; the smoke preset does this)")
    p.add_argument("--out", help="folder for results.json, results.jsonl, throughput.png, logs/ "
                                 "(default benchmarks/out)")
    p.add_argument("--append", action="store_true", default=None,
                   help="keep the rows already in --out/results.jsonl (to build one table over several runs)")
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = smoke_preset() if args.smoke else {}
    for key, value in vars(args).items():
        if key in ("smoke", "engine_arg") or value is None:
            continue
        values[key] = value
    settings = Settings(**values)
    settings.engine_args = dict(args.engine_arg)
    n_gpus = visible_gpu_count()
    settings.on_gpu = n_gpus > 0 and not settings.smoke
    settings.device_name = device_name(settings.on_gpu)
    if args.gpus is None and not settings.smoke:
        settings.gpus = [n for n in (1, 2, 4, 8) if n <= max(n_gpus, 1)]
    if settings.w4_gpus is None:
        settings.w4_gpus = list(settings.gpus)
    if args.enforce_eager is None and not settings.smoke:
        settings.enforce_eager = False
    return settings
