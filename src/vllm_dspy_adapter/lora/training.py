"""Train a LoRA adapter on chat data: PEFT and a short plain PyTorch loop.

The data is what DSPy's ``BootstrapFinetune`` hands a provider: a list of
``{"messages": [system?, user, ..., assistant]}`` dicts, one per predictor
call, the last message the answer to learn. The prompt part is rendered with
the same function the LM uses at inference (``render.render_chat``, the model's
chat template with the generation prompt), so the adapter is trained on exactly
the token sequence it will be served; the loss covers only the answer and the
template's end-of-turn tokens.

Nothing here knows about vLLM; ``provider.py`` wraps it for DSPy and loads the
result into the running replicas. Heavy libraries (torch, transformers, peft)
are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError
from ..chat_template import render_chat

__all__ = ["LoRATrainConfig", "TrainResult", "train_lora", "tokenize_chat_examples", "check_lora_shape",
           "check_rank_fits", "device_and_dtype"]

logger = logging.getLogger(__name__)

# The projections vLLM can serve LoRA on for Llama/Qwen/Mistral-style models.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRATrainConfig:
    """What ``train_kwargs`` may set (DSPy passes them through ``lm.finetune``)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    max_steps: int | None = None  # overrides num_train_epochs when set
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 2048
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # gradient clipping, as Hugging Face's Trainer does by default
    seed: int = 0
    device: str | None = None  # None: "cuda" when a GPU is visible, else "cpu"
    dtype: str | None = None  # None: bfloat16 on GPU, float32 on CPU

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any] | None) -> LoRATrainConfig:
        import difflib

        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = dict(kwargs or {})
        for name in kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigurationError(f"Unknown LoRA training option {name!r}.{hint} Known: {sorted(known)}")
        config = cls(**kwargs)
        config.check()
        return config

    def check(self) -> None:
        positive = {"rank": self.rank, "alpha": self.alpha, "learning_rate": self.learning_rate,
                    "batch_size": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "max_seq_length": self.max_seq_length, "num_train_epochs": self.num_train_epochs}
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigurationError(f"LoRA training option {name} must be a positive number; got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            raise ConfigurationError(f"max_steps must be a positive integer or None; got {self.max_steps!r}")
        check_lora_shape(self.dropout, self.target_modules)


def check_lora_shape(dropout: float, target_modules: Sequence[str]) -> None:
    """The LoRA options every trainer here takes (``lm.finetune`` and GRPO alike)."""
    if not 0 <= dropout < 1:
        raise ConfigurationError(f"dropout must be in [0, 1); got {dropout!r}")
    if isinstance(target_modules, str) or not target_modules:
        raise ConfigurationError("target_modules must be a non-empty list of module names, "
                                 f"such as {list(DEFAULT_TARGET_MODULES)}")


def check_rank_fits(rank: int, max_lora_rank: int | None, what: str) -> None:
    """Refuse, before any training, a LoRA the LM could not serve: an LM built without
    ``enable_lora=True``, or a rank above its ``max_lora_rank``. ``what`` names the run."""
    if max_lora_rank is None:
        raise ConfigurationError(f"This LM was built without LoRA support, which {what} needs: construct it with "
                                 "enable_lora=True (and max_lora_rank >= the adapter's rank).")
    if rank > max_lora_rank:
        raise ConfigurationError(f"{what}: LoRA rank {rank} exceeds this LM's max_lora_rank={max_lora_rank}: pass "
                                 f"train_kwargs={{'rank': {max_lora_rank}}} or a smaller one, or build the LM with "
                                 f"max_lora_rank={rank}.")


@dataclass
class TrainResult:
    path: str
    steps: int
    examples: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _chat_messages(item: Any, index: int) -> list[dict[str, Any]]:
    messages = item.get("messages") if isinstance(item, dict) else None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ConfigurationError(f"train_data[{index}] is not chat data: expected {{'messages': [...]}}, "
                                 f"got {str(item)[:120]!r}")
    if messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
        raise ConfigurationError(f"train_data[{index}]: the last message must be the assistant's answer "
                                 "({'role': 'assistant', 'content': '...'}), the text the adapter learns.")
    return messages


def tokenize_chat_examples(tokenizer, data: Sequence[dict[str, Any]], *, max_seq_length: int,
                           chat_template_kwargs: dict[str, Any] | None = None) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per example; labels are -100 over the prompt.

    The prompt is rendered as the LM renders it at inference; the answer is
    what the chat template puts after that prompt for the assistant message
    (its text and end-of-turn tokens), or the text plus EOS for a template
    whose full rendering does not extend the prompt's."""
    out = []
    skipped = 0
    for i, item in enumerate(data):
        messages = _chat_messages(item, i)
        prompt = render_chat(tokenizer, messages[:-1], chat_template_kwargs)
        full = tokenizer.apply_chat_template(messages, tokenize=False, **(chat_template_kwargs or {}))
        if full.startswith(prompt):
            answer = full[len(prompt):]
        else:
            answer = messages[-1]["content"] + (tokenizer.eos_token or "")
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        if len(prompt_ids) >= max_seq_length:
            skipped += 1
            continue
        ids = (prompt_ids + answer_ids)[:max_seq_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_seq_length]
        out.append((ids, labels))
    if skipped:
        logger.warning("LoRA training: %d of %d examples skipped, their prompt exceeds max_seq_length=%d",
                       skipped, len(data), max_seq_length)
    if not out:
        raise ConfigurationError(f"No usable training example: all {len(data)} prompts exceed "
                                 f"max_seq_length={max_seq_length} (raise it in train_kwargs)."
                                 if data else "train_data is empty: nothing to train on.")
    return out


def device_and_dtype(config) -> tuple[str, Any]:
    """The trainer's device and torch dtype from a config's ``device`` and ``dtype`` (None: CUDA
    and bfloat16 when a GPU is visible, else the CPU and float32)."""
    import torch

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = config.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigurationError(f"Unknown dtype {name!r}; use 'float32', 'bfloat16' or 'float16'.")
    return device, dtype


def train_lora(base_model: str, data: Sequence[dict[str, Any]], output_dir: str,
               config: LoRATrainConfig | None = None, *, chat_template_kwargs: dict[str, Any] | None = None,
               should_stop: Callable[[], bool] | None = None,
               on_step: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train a LoRA on ``base_model`` (a local folder) and save it to ``output_dir``
    in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``),
    which vLLM loads. ``should_stop()`` is polled between steps (a cancel);
    ``on_step(step, total, loss)`` reports progress."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or LoRATrainConfig()
    config.check()
    started = time.monotonic()
    device, dtype = device_and_dtype(config)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    examples = tokenize_chat_examples(tokenizer, data, max_seq_length=config.max_seq_length,
                                      chat_template_kwargs=chat_template_kwargs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(device)
    model.config.use_cache = False
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
        raise ConfigurationError(f"LoRA target_modules {list(config.target_modules)} do not match this model: "
                                 f"{exc}. Pass train_kwargs={{'target_modules': [...]}} with its projection "
                                 "names.") from exc
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    per_epoch = math.ceil(len(examples) / (config.batch_size * config.gradient_accumulation_steps))
    total = config.max_steps or max(1, math.ceil(per_epoch * config.num_train_epochs))
    order: list[int] = []
    losses: list[float] = []
    step = 0
    while step < total:
        if should_stop is not None and should_stop():
            raise InterruptedError(f"LoRA training cancelled after {step} of {total} steps")
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(config.gradient_accumulation_steps):
            batch = []
            for _ in range(config.batch_size):
                if not order:
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                batch.append(examples[order.pop()])
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=device)
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            (loss / config.gradient_accumulation_steps).backward()
            step_loss += float(loss.detach()) / config.gradient_accumulation_steps
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        step += 1
        losses.append(step_loss)
        if on_step is not None:
            on_step(step, total, step_loss)
        logger.info("LoRA training: step %d/%d, loss %.4f", step, total, step_loss)

    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "training.json"), "w", encoding="utf-8") as fh:
        json.dump({"base_model": base_model, "steps": step, "examples": len(examples), "losses": losses,
                   "config": {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in dataclasses.asdict(config).items()}}, fh, indent=1)
    return TrainResult(path=output_dir, steps=step, examples=len(examples), losses=losses,
                       seconds=time.monotonic() - started)
