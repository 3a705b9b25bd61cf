"""The ``train_kwargs`` that DSPy's GRPO tutorials and Arbor pass, in our names.

DSPy's GRPO tutorials (``rl_multihop``, ``rl_papillon``) and Arbor's examples write
``train_kwargs`` in TRL's ``GRPOConfig`` names plus a few of Arbor's. A program moved from
Arbor to this provider keeps its dict: ``translate(kwargs)`` returns the options in
``GRPOConfig``'s names and one line per option that does nothing here (and why), for
the job to log once. What would silently change the training (full fine-tuning, a loss
or schedule we do not have) is refused by name.

Pure: no torch, no model.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError

__all__ = ["translate", "IGNORED"]

# TRL / Arbor name -> ours (the same meaning).
RENAMED = {
    "per_device_train_batch_size": "batch_size",
}

# Options that do nothing in this provider, with the reason the log gives.
IGNORED = {
    **dict.fromkeys(("report_to", "log_completions", "logging_steps", "num_completions_to_print", "logging_dir",
                     "run_name", "disable_tqdm", "wandb_log_unique_prompts", "log_on_each_node"),
                    "logging: the job logs each step through Python's logging, and get_status() has the figures"),
    **dict.fromkeys(("save_steps", "save_strategy", "save_total_limit", "push_to_hub", "hub_model_id",
                     "overwrite_output_dir"),
                    "saving: every published version is a PEFT folder under output_dir; job.save_checkpoint(name) "
                    "keeps one"),
    **dict.fromkeys(("num_training_gpus", "num_inference_gpus", "use_vllm", "vllm_mode",
                     "vllm_gpu_memory_utilization"),
                    "placement: the LM's replicas generate; train_kwargs['device'] names the trainer's GPU"),
    **dict.fromkeys(("top_k", "top_p", "min_p", "repetition_penalty", "max_prompt_length", "num_train_epochs",
                     "remove_unused_columns", "dataloader_num_workers"),
                    "generation: the rollouts are the LM's, sampled with its own settings (set them on the LM); "
                    "dspy.GRPO's num_train_steps sets the run's length"),
}

_LORA_CONFIG = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules"}
_LORA_CONFIG_FIXED = {"bias": "none", "task_type": "CAUSAL_LM"}  # what we build; anything else is refused


def translate(kwargs: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """``(options in GRPOConfig's names, notes on the options that do nothing here)``."""
    out: dict[str, Any] = {}
    notes: list[str] = []

    def put(name: str, value: Any, source: str) -> None:
        if name in out and out[name] != value:
            raise ConfigurationError(f"GRPO train_kwargs set {name!r} twice ({source} gives {value!r}, "
                                     f"and {out[name]!r} was set): keep one.")
        out[name] = value

    for name, value in (kwargs or {}).items():
        if name in RENAMED:
            put(RENAMED[name], value, name)
        elif name in IGNORED:
            if value is not None:
                notes.append(f"{name}={value!r} does nothing here ({IGNORED[name]})")
        elif name == "lora":
            if value is not True:
                raise ConfigurationError("GRPO train_kwargs lora=False asks for full fine-tuning: this provider "
                                         "trains a LoRA adapter, which the running replicas swap in live without a "
                                         "restart. Remove 'lora' (or set it to True).")
        elif name == "lora_config":
            if not isinstance(value, dict):
                raise ConfigurationError(f"GRPO train_kwargs lora_config must be a dict like {{'r': 8, "
                                         f"'lora_alpha': 16}}; got {value!r}")
            for key, sub in value.items():
                if key in _LORA_CONFIG:
                    put(_LORA_CONFIG[key], list(sub) if key == "target_modules" else sub, f"lora_config[{key!r}]")
                elif _LORA_CONFIG_FIXED.get(key, object()) != sub:
                    raise ConfigurationError(f"GRPO train_kwargs lora_config[{key!r}]={sub!r} is not supported: "
                                             f"the adapter takes r, lora_alpha, lora_dropout and target_modules.")
        elif name in ("bf16", "fp16"):
            if value:
                put("dtype", "bfloat16" if name == "bf16" else "float16", name)
        elif name == "warmup_ratio":
            if value:
                steps = (kwargs or {}).get("max_steps")
                if not isinstance(steps, int) or steps <= 0:
                    raise ConfigurationError(f"GRPO train_kwargs warmup_ratio={value!r} needs max_steps (the "
                                             "number of optimiser steps); or give warmup_steps.")
                put("warmup_steps", round(value * steps), name)
        elif name == "num_iterations":
            if value != 1:
                raise ConfigurationError(f"GRPO train_kwargs num_iterations={value!r}: this provider takes one "
                                         "pass over each step's rollouts (num_iterations=1).")
        elif name == "importance_sampling_level":
            if value != "token":
                raise ConfigurationError(f"GRPO train_kwargs importance_sampling_level={value!r}: only 'token' "
                                         "(TRL's default) is supported.")
        else:
            put(name, value, name)
    if "max_steps" in out and out.get("lr_scheduler_type", "constant") in ("constant", "constant_with_warmup"):
        notes.append(f"max_steps={out.pop('max_steps')!r} does nothing with a constant learning rate "
                     "(dspy.GRPO's num_train_steps sets the run's length)")
    return out, notes
