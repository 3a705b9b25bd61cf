"""One place for the configuration of an engine: what model, which vLLM engine
arguments, which sampling and chat-template options are fixed for the LM.

Everything the adapter reads from the user arrives here once, is checked here
(before any engine process starts) and travels as this frozen dataclass to the
replicas, so no other module reads configuration from anywhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from . import vllm_api
from .errors import ConfigurationError

__all__ = ["ModelSpec", "PERFORMANCE_ONLY_ARGS", "PERFORMANCE_ONLY_SAMPLING", "check_engine_kwargs",
           "check_sampling_kwargs", "engine_defaults",
           "lora_defaults", "LORA_SLOTS", "LORA_SLOTS_COST", "lora_slots_warning"]

# Engine arguments that change speed or memory but not what the model answers.
# They stay out of the label DSPy caches under, so a cached answer survives a
# change of batch size or GPU count.
PERFORMANCE_ONLY_ARGS = frozenset({
    "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "enforce_eager",
    "tensor_parallel_size", "pipeline_parallel_size", "enable_prefix_caching", "swap_space",
    "disable_log_stats", "kv_cache_memory_bytes", "cpu_offload_gb", "block_size",
    "compilation_config", "enable_chunked_prefill", "max_parallel_loading_workers",
    "disable_custom_all_reduce", "distributed_executor_backend", "kv_cache_dtype_skip_layers",
    "use_tqdm_on_load", "performance_mode",
    # LoRA capacity: the base model answers the same with or without it (an adapter's
    # answers are cached under the adapter's own label, see lora.AdapterSpec.label).
    "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "fully_sharded_loras",
})
# SamplingParams fields of the same kind: ``detokenize=False`` only moves the decoding of
# the answer from vLLM's steps to its end (engine.vllm_io.to_generation), same text.
PERFORMANCE_ONLY_SAMPLING = frozenset({"detokenize"})

# SamplingParams fields the adapter owns: they are set from DSPy's request or
# by the adapter itself and may not be fixed at construction.
_ADAPTER_OWNED_SAMPLING = frozenset({"n", "output_kind", "structured_outputs", "guided_decoding"})


_TOKENIZERS: dict[tuple, Any] = {}  # (tokenizer, trust_remote_code, revision) -> the loaded tokenizer
_TOKENIZERS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to start one replica's engine, and nothing about placement."""

    model: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None  # a short name for labels; defaults to the path's basename
    cache_events: bool = False  # the engines publish their KV-cache events ("cache" routing)

    def label(self) -> str:
        """The model string DSPy caches under: the model and every setting that
        changes outputs, hashed so that two LMs differing in any of them never
        share cache entries."""
        name = self.display_name
        identity = {
            "model": self.model if self.model_name is None else self.model_name,
            "engine": {k: v for k, v in sorted(self.engine_kwargs.items()) if k not in PERFORMANCE_ONLY_ARGS},
            "sampling": {k: v for k, v in sorted(self.sampling.items()) if k not in PERFORMANCE_ONLY_SAMPLING},
            "chat_template_kwargs": dict(sorted(self.chat_template_kwargs.items())),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=repr).encode()).hexdigest()[:10]
        return f"vllm/{name}@{digest}"

    @property
    def display_name(self) -> str:
        """The model's short name for labels and messages: ``model_name``, else the path's basename."""
        return self.model_name or os.path.basename(os.path.normpath(self.model)) or self.model

    @property
    def max_lora_rank(self) -> int | None:
        """The largest adapter rank the engines accept; None when LoRA is off."""
        if not self.engine_kwargs.get("enable_lora"):
            return None
        return int(self.engine_kwargs.get("max_lora_rank") or 16)  # vLLM's default

    @property
    def max_loras(self) -> int | None:
        """Adapter slots per engine (``lora_defaults`` chose them when the user did not);
        None when LoRA is off."""
        if not self.engine_kwargs.get("enable_lora"):
            return None
        return int(self.engine_kwargs.get("max_loras") or 4)  # vLLM's default

    def tokenize(self, prompt: str, *, chat: bool, tokenizer=None) -> list[int]:
        """The one tokenising rule of a text prompt, the engines' and the router's: a
        chat-rendered prompt already holds its special tokens (BOS where the template
        wants one); a raw prompt gets them as ``LLM.generate`` gives them. ``tokenizer``:
        the backend's (``ModelFacts``); None: the model's own (``load_tokenizer``)."""
        return (tokenizer or self.load_tokenizer()).encode(prompt, add_special_tokens=not chat)

    def with_engine_kwargs(self, **updates: Any) -> ModelSpec:
        return dataclasses.replace(self, engine_kwargs={**self.engine_kwargs, **updates})

    def load_tokenizer(self):
        """The model's Hugging Face tokenizer, as vLLM loads it (``tokenizer=``,
        ``trust_remote_code``, ``tokenizer_revision``); one per process and model, so the
        driver renders and an in-process engine counts tokens with the same object."""
        kwargs = self.engine_kwargs
        key = (kwargs.get("tokenizer") or self.model, bool(kwargs.get("trust_remote_code", False)),
               kwargs.get("tokenizer_revision"))
        with _TOKENIZERS_LOCK:
            tokenizer = _TOKENIZERS.get(key)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = _TOKENIZERS[key] = AutoTokenizer.from_pretrained(key[0], trust_remote_code=key[1],
                                                                              revision=key[2])
            return tokenizer


# The batch limits a user may set; one who sets any keeps vLLM's own (max_num_batched_tokens
# must stay >= max_num_seqs, so the adapter never raises one under a user's other).
_BATCH_ARGS = ("performance_mode", "max_num_seqs", "max_num_batched_tokens")
# vLLM's own max_num_seqs for LLM-class engines on the cards the wider limit was measured on
# (H100 and H200, and the larger B200 class: 1024; A100 and smaller cards get 256, where vLLM keeps
# its limits low on purpose and nothing was measured).
WIDE_SEQS_FROM = 1024
# What twice vLLM's max_num_seqs gave, measured side by side (issue #20, BENCHMARKS.md).
WIDE_SEQS_GAIN = ("measured on one H100, vLLM 0.26: W5 at once 1.19x, every other workload 0.995x-1.05x, "
                  "0.6B and 8B shapes")


# On a CPU without native bfloat16 matmuls (x86 without AVX-512 BF16 or AMX: AVX2-only machines
# such as the AMD EPYC CI runs on) torch runs bfloat16 on a slow fallback; float32 is faster there.
CPU_FLOAT32_GAIN = ("a 334-token prefill of SmolLM2-135M took 13.8 s in bfloat16 and 2.5 s in float32, side by "
                    "side on a 2-core AMD EPYC with AVX2 only, vLLM 0.32 CPU build")


def engine_defaults(engine_kwargs: dict[str, Any], *, vllm_max_num_seqs: int | None = None,
                    slow_cpu_bf16: bool = False) -> tuple[dict[str, Any], str | None]:
    """``engine_kwargs`` over the adapter's engine defaults, and the line to log once about the
    batch limit chosen (None: vLLM's kept).

    Always (unless set): quiet per-request stats, and vLLM's prefix cache (DSPy prompts share
    long system and demo prefixes). ``max_num_seqs`` twice vLLM's own (2048 on an H100 or H200)
    when ``vllm_max_num_seqs`` (vLLM's own for this card, None where unknown) is at least
    ``WIDE_SEQS_FROM`` and the user set no batch limit: chosen by measurement (issue #20, W5 at
    once 1.19x and no workload below 0.98x). vLLM's ``performance_mode="throughput"``, which
    also doubles ``max_num_batched_tokens``, was measured and not taken (W2 from 256 DSPy
    threads 0.89x). ``slow_cpu_bf16`` (the engine runs on a CPU without native bfloat16):
    ``dtype="float32"`` unless the user chose a dtype (``CPU_FLOAT32_GAIN``)."""
    chosen: dict[str, Any] = {"disable_log_stats": True, "enable_prefix_caching": True}
    message = None
    if slow_cpu_bf16 and engine_kwargs.get("dtype") is None:
        chosen["dtype"] = "float32"
        message = (f"dtype=float32: this CPU has no native bfloat16 matmuls (no AVX-512 BF16 or AMX), where "
                   f"bfloat16 runs on a slow fallback ({CPU_FLOAT32_GAIN}). Pass dtype=... to choose.")
    if (vllm_max_num_seqs is not None and vllm_max_num_seqs >= WIDE_SEQS_FROM
            and not any(engine_kwargs.get(name) is not None for name in _BATCH_ARGS)):
        chosen["max_num_seqs"] = 2 * vllm_max_num_seqs
        wide = (f"max_num_seqs={2 * vllm_max_num_seqs} (vLLM's own on this card: {vllm_max_num_seqs}): more "
                f"sequences per step for batch work ({WIDE_SEQS_GAIN}). Pass max_num_seqs=... to choose.")
        message = wide if message is None else f"{message} {wide}"
    return {**chosen, **engine_kwargs}, message


# max_loras when enable_lora=True and the user set none (vLLM's own default is 4).
LORA_SLOTS = 16
# What too few slots cost, measured (issue #20): one H200, vLLM 0.26, an 8B-shaped model,
# W2-shaped calls from 256 threads over 16 adapters.
LORA_SLOTS_COST = ("16 adapters ran at 7.07 req/s with max_loras=4 and 15.3 req/s with max_loras=16 "
                   "(2.2x; one H200, 8B model, vLLM 0.26)")


def lora_defaults(engine_kwargs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``engine_kwargs`` with ``max_loras`` chosen when ``enable_lora`` is set and it is not,
    and the line to log once about it (None: nothing chosen).

    ``LORA_SLOTS`` slots (within ``max_cpu_loras`` when the user set it): vLLM keeps one
    GPU buffer per slot for every LoRA layer, rank x (inputs + outputs) of each, so a slot
    of an 8B Llama at rank 16 is about 84 MB (16 slots: 1.3 GB, ~1% of an H200, taken from
    the KV cache), while a request whose adapter has no slot waits for a swap."""
    if not engine_kwargs.get("enable_lora") or engine_kwargs.get("max_loras") is not None:
        return engine_kwargs, None
    slots = LORA_SLOTS
    if engine_kwargs.get("max_cpu_loras") is not None:
        slots = max(1, min(slots, int(engine_kwargs["max_cpu_loras"])))
    message = (f"enable_lora without max_loras: using max_loras={slots} adapter slots per engine, not vLLM's 4 "
               f"({LORA_SLOTS_COST}); each slot costs GPU memory (about 84 MB for an 8B model at rank 16). "
               "Pass max_loras=... to choose.")
    return {**engine_kwargs, "max_loras": slots}, message


def lora_slots_warning(loaded: int, slots: int) -> str | None:
    """The warning when more adapters are loaded than an engine has slots; None when they fit."""
    if loaded <= slots:
        return None
    return (f"{loaded} LoRA adapters are loaded but each engine has max_loras={slots} slots: requests for the "
            f"others wait for a swap ({LORA_SLOTS_COST}). Start the LM with max_loras={loaded} to keep every "
            "adapter resident.")


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_engine_kwargs(engine_kwargs: dict[str, Any]) -> None:
    """Refuse unknown vLLM engine arguments by name, before anything starts."""
    known = vllm_api.engine_arg_names()
    for name in engine_kwargs:
        if name == "model":
            raise ConfigurationError("Pass the model as model=..., not inside the engine arguments.")
        if name not in known:
            raise ConfigurationError(
                f"Unknown vLLM engine argument {name!r}.{_suggest(name, known)} "
                "Engine arguments are those of vllm.AsyncEngineArgs; sampling options such as "
                "repetition_penalty go in sampling_params={...}."
            )


def check_sampling_kwargs(sampling: dict[str, Any]) -> None:
    """Refuse unknown or adapter-owned SamplingParams fields, and bad values."""
    known = vllm_api.sampling_field_names()
    for name in sampling:
        if name in _ADAPTER_OWNED_SAMPLING:
            raise ConfigurationError(
                f"sampling_params may not set {name!r}: the adapter sets it per request "
                "(use DSPy's n=, response_format= or JSONAdapter instead)."
            )
        if name not in known:
            raise ConfigurationError(f"Unknown vLLM sampling option {name!r}.{_suggest(name, known)}")
    try:
        vllm_api.check_sampling_params({k: v for k, v in sampling.items() if v is not None})
    except Exception as exc:  # vLLM raises ValueError/TypeError with the field in the text
        raise ConfigurationError(f"Invalid sampling_params {sampling!r}: {exc}") from exc
