"""GRPO on given completions: the options, the advantages and the loss (pure);
``grpo_trainer.GRPOTrainer`` holds the model and takes the steps.

``dspy.GRPO`` hands the provider groups of rollouts the replicas already generated:
``[{"messages": [...], "completion": {"role": "assistant", "content": ...},
"reward": r}, ...]``, one group per (example, predictor), ``num_generations``
completions each. ``GRPOTrainer.step(groups)`` (grpo_trainer.py) turns them into one GRPO update:

- advantages are group-relative: ``(r - mean(group)) / (std(group) + eps)``, the
  sample std as TRL (``scale_rewards="batch"``: the std of the step's rewards;
  ``False``/``"none"``: ``r - mean`` only, as Dr. GRPO);
- the loss per completion token is TRL's GRPO loss: the clipped surrogate
  ``-min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)`` with
  ``ratio = exp(logp - logp_old)``, plus ``beta`` times the k3 estimator of the KL
  to the reference, ``exp(ref - logp) - (ref - logp) - 1``; aggregated as TRL's
  ``loss_type`` says (``LOSS_TYPES``; ours defaults to ``"grpo"``: averaged over each
  completion's tokens, then over completions; TRL's own default is ``"dapo"``);
- the reference is the base model: the same PEFT model with its adapter switched
  off (``disable_adapter()``), so it costs no second copy of the weights;
- ``logp_old`` is the policy that generated the rollouts: the adapter version
  being served. When the trainer is ahead of it (``update_interval > 1``), its
  saved LoRA weights are put back for one no-grad pass; otherwise it is the
  current policy before the update;
- log-probabilities are taken on logits divided by the sampling ``temperature``,
  on the prompt rendered exactly as it was served (``render_chat``) followed by
  the completion and the template's end of turn.

Why not TRL: its ``GRPOTrainer`` generates the completions itself (its own
``generate`` or a vLLM server) from a prompt dataset and a reward function; it has
no entry point for completions and rewards produced elsewhere, and its loss is a
method of that trainer. The formula above is TRL's, in ~30 lines; PEFT does the
adapter. A step that fails (out of memory, a non-finite loss, gradient or weight)
puts the adapter and optimiser back as they were and raises ``TrainingStepError``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..chat_template import render_chat
from ..errors import ConfigurationError
from .grpo_kwargs import IGNORED, RENAMED, translate
from .training import DEFAULT_TARGET_MODULES, check_lora_shape

__all__ = ["GRPOConfig", "StepMetrics", "group_advantages", "grpo_loss", "grpo_token_losses", "completion_means",
           "aggregate_loss", "check_groups", "tokenize_completion"]

logger = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    """What ``train_kwargs`` may set for ``lm.reinforce`` / ``dspy.GRPO``.

    DSPy names none of these except ``num_generations`` (it sets it to
    ``num_rollouts_per_grpo_step``); the loss options are TRL's names, ``beta``'s
    default is Arbor's (0.04), ``temperature`` defaults to the student LM's."""

    # the loss
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (a symmetric clip)
    temperature: float | None = None  # None: the LM's sampling temperature (1.0 if it has none or 0)
    scale_rewards: bool | str = True  # True / "group", "batch" (the step's std), False / "none"
    loss_type: str = "grpo"  # TRL's: "grpo" (per completion, then mean), "bnpo", "dr_grpo", "dapo"
    max_completion_length: int | None = None  # dr_grpo's constant (None: the LM's max_tokens)
    # the optimiser
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "constant"  # or constant_with_warmup, linear, cosine (these two need max_steps)
    warmup_steps: int = 0  # optimiser steps
    max_steps: int | None = None  # optimiser steps: the length of a linear or cosine schedule
    gradient_accumulation_steps: int = 1
    batch_size: int = 8  # completions per forward pass
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    gradient_checkpointing_kwargs: dict | None = None  # None: {"use_reentrant": False}
    # the adapter
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES
    # the job
    update_interval: int = 1  # steps between two adapter versions loaded into the replicas
    groups_per_step: int = 1  # batch ids the job asks DSPy for per step
    num_generations: int | None = None  # set by dspy.GRPO; informative
    max_seq_length: int = 2048
    seed: int = 0
    device: str | None = None  # None: the replicas' GPU when there is one, else "cpu"
    dtype: str | None = None  # None: bfloat16 on GPU, float32 on CPU
    # torch threads of a CPU trainer; None: every core this process may use (the engines wait, idle and
    # without spinning, while a step trains; give fewer when other threads call the LM during training)
    cpu_threads: int | None = None
    adapter_name: str = "grpo"  # versions are served as <adapter_name>-v1, -v2, ...
    output_dir: str | None = None  # None: $DSPY_FINETUNEDIR/lora/<adapter_name>
    swap_timeout: float = 120.0  # seconds to load a version, and for requests to release the old one

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any] | None) -> GRPOConfig:
        """The options from ``train_kwargs`` (ours, or TRL's and Arbor's names: ``grpo_kwargs``);
        options that do nothing here are logged once. A bad one raises ``ConfigurationError``."""
        import difflib

        options, notes = translate(kwargs)
        known = {f.name for f in dataclasses.fields(cls)}
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, [*known, *RENAMED, *IGNORED], n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigurationError(f"Unknown GRPO train_kwargs option {name!r}.{hint} Known: {sorted(known)} "
                                         "(and TRL's names that DSPy's GRPO tutorials use: docs/LORA_GUIDE.md)")
        for name in _INTEGERS:  # Arbor's examples compute some, e.g. gradient_accumulation_steps 24/6 = 4.0
            value = options.get(name)
            if isinstance(value, float) and value.is_integer():
                options[name] = int(value)
        config = cls(**options)
        config.check()
        for note in notes:
            logger.info("GRPO train_kwargs: %s", note)
        return config

    def check(self) -> None:
        positive = {"learning_rate": self.learning_rate, "epsilon": self.epsilon, "rank": self.rank,
                    "alpha": self.alpha, "batch_size": self.batch_size, "max_seq_length": self.max_seq_length,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "update_interval": self.update_interval, "groups_per_step": self.groups_per_step,
                    "swap_timeout": self.swap_timeout}
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigurationError(f"GRPO option {name} must be a positive number; got {value!r}")
        for name in ("gradient_accumulation_steps", "update_interval", "groups_per_step", "batch_size", "rank"):
            if not isinstance(getattr(self, name), int):
                raise ConfigurationError(f"GRPO option {name} must be an integer; got {getattr(self, name)!r}")
        threads = self.cpu_threads
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ConfigurationError(f"GRPO option cpu_threads must be an integer >= 1 (or None: every core of "
                                     f"the process); got {threads!r}")
        if not isinstance(self.beta, (int, float)) or self.beta < 0:
            raise ConfigurationError(f"GRPO option beta (the KL weight) must be >= 0; got {self.beta!r}")
        if self.temperature is not None and not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigurationError(f"GRPO option temperature must be > 0 (the rollouts' sampling temperature); "
                                     f"got {self.temperature!r}")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ConfigurationError(f"GRPO option epsilon_high must be > 0; got {self.epsilon_high!r}")
        scale = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)  # TRL's reading
        if scale not in ("group", "batch", "none"):
            raise ConfigurationError(f"GRPO option scale_rewards must be True/'group', 'batch' or False/'none'; "
                                     f"got {self.scale_rewards!r}")
        self.scale_rewards = scale
        if self.loss_type not in LOSS_TYPES:
            raise ConfigurationError(f"GRPO option loss_type {self.loss_type!r} is not supported; use one of "
                                     f"{list(LOSS_TYPES)} (TRL's meanings).")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ConfigurationError(f"GRPO option lr_scheduler_type {self.lr_scheduler_type!r} is not supported; "
                                     f"use one of {list(SCHEDULES)}.")
        for name in ("warmup_steps", "max_steps", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigurationError(f"GRPO option {name} must be a whole number >= 0; got {value!r}")
        if SCHEDULES[self.lr_scheduler_type] and not self.max_steps:
            raise ConfigurationError(f"GRPO option lr_scheduler_type={self.lr_scheduler_type!r} decays over "
                                     "max_steps optimiser steps: give max_steps, or use 'constant' / "
                                     "'constant_with_warmup'.")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigurationError(f"GRPO option gradient_checkpointing must be True or False; "
                                     f"got {self.gradient_checkpointing!r}")
        if self.gradient_checkpointing_kwargs is not None and not isinstance(self.gradient_checkpointing_kwargs,
                                                                              dict):
            raise ConfigurationError(f"GRPO option gradient_checkpointing_kwargs must be a dict; "
                                     f"got {self.gradient_checkpointing_kwargs!r}")
        check_lora_shape(self.dropout, self.target_modules)


# TRL's loss aggregations (trl/trainer/grpo_trainer.py): how per-token losses become the step's loss.
LOSS_TYPES = {
    "grpo": "mean over each completion's tokens, then over completions",
    "bnpo": "mean over the tokens of each forward pass (batch_size completions)",
    "dr_grpo": "sum over tokens / (completions x max_completion_length)",
    "dapo": "sum over tokens / the tokens of the whole accumulation window",
}
# transformers' scheduler names we take -> whether it needs max_steps (a decay).
SCHEDULES = {"constant": False, "constant_with_warmup": False, "linear": True, "cosine": True}
_INTEGERS = ("gradient_accumulation_steps", "update_interval", "groups_per_step", "batch_size", "rank", "alpha",
             "cpu_threads", "warmup_steps", "max_steps", "max_completion_length", "max_seq_length", "seed")


@dataclass
class StepMetrics:
    loss: float
    kl: float
    reward_mean: float
    completions: int
    tokens: int
    updates: int  # optimiser steps taken
    seconds: float
    per_pass: int = 0  # completions per forward pass (batch_size, or less after an out-of-memory retry)


def check_groups(groups: Any) -> list[list[dict[str, Any]]]:
    """DSPy's GRPO groups, checked before any training: a clear error naming the bad item."""
    if not isinstance(groups, list) or not groups:
        raise ConfigurationError("GRPO step: no groups to train on (expected a non-empty list of groups).")
    out = []
    for g, group in enumerate(groups):
        if not isinstance(group, list) or not group:
            raise ConfigurationError(f"GRPO group {g} is {str(group)[:80]!r}; expected a non-empty list of "
                                     "{'messages', 'completion', 'reward'} dicts.")
        for i, item in enumerate(group):
            where = f"GRPO group {g}, completion {i}"
            if not isinstance(item, dict) or not isinstance(item.get("messages"), list) or not item["messages"]:
                raise ConfigurationError(f"{where}: expected {{'messages': [...], 'completion': {{...}}, "
                                         f"'reward': float}}, got {str(item)[:120]!r}")
            completion = item.get("completion")
            if not isinstance(completion, dict) or not isinstance(completion.get("content"), str):
                raise ConfigurationError(f"{where}: 'completion' must be {{'role': 'assistant', 'content': str}}")
            reward = item.get("reward")
            if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
                raise ConfigurationError(f"{where}: reward {reward!r} is not a finite number; make the metric "
                                         "return a float for every rollout.")
        out.append(group)
    return out


def group_advantages(rewards: Sequence[float], *, scale: bool = True, std: float | None = None,
                     eps: float = 1e-4) -> list[float]:
    """``(r - mean) / (std + eps)`` within one group, as TRL: ``std`` is the group's sample
    standard deviation (Bessel's correction, TRL's ``nanstd``) unless given (``scale_rewards=
    "batch"``: the step's); ``scale=False``: ``r - mean`` only (Dr. GRPO). All-equal rewards
    give zeros (nothing to learn from that group but the KL term)."""
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if not scale:
        return centred
    if std is None:
        std = sample_std(rewards)
    return [c / (std + eps) for c in centred]


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def grpo_token_losses(logp, old_logp, ref_logp, advantages, *, beta: float, epsilon: float, epsilon_high: float):
    """TRL's GRPO loss and k3 KL per token: ``(per_token, kl)``, both [B, T]. ``logp``/
    ``old_logp``/``ref_logp``: [B, T]; ``advantages``: [B]."""
    import torch

    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv)
    delta = ref_logp - logp
    kl = torch.exp(delta) - delta - 1
    return -surrogate + beta * kl, kl


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, beta: float, epsilon: float, epsilon_high: float):
    """The loss and the mean k3 KL per completion (``grpo_token_losses`` averaged over each
    completion's tokens, ``mask`` [B, T]): what the step reports."""
    per_token, kl = grpo_token_losses(logp, old_logp, ref_logp, advantages, beta=beta, epsilon=epsilon,
                                      epsilon_high=epsilon_high)
    return completion_means(per_token, kl, mask)


def completion_means(per_token, kl, mask):
    """Per-token loss and KL ([B, T]) averaged over each completion's tokens (``mask``)."""
    tokens = mask.sum(1).clamp(min=1)
    return (per_token * mask).sum(1) / tokens, (kl * mask).sum(1) / tokens


def aggregate_loss(per_token, mask, loss_type: str, *, window_completions: int, window_tokens: int,
                   window_batches: int, max_completion_length: int | None, batch_tokens: int | None = None):
    """One forward pass's share of its accumulation window's loss, by TRL's ``loss_type``
    (``LOSS_TYPES``); the window's shares add up to the loss TRL would take on that window.
    ``batch_tokens``: the completion tokens of the whole batch when this pass is a slice of it
    (``bnpo`` normalises by the batch's tokens; the slices' shares then add up to the batch's)."""
    token_sum = (per_token * mask).sum()
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / window_completions
    if loss_type == "bnpo":
        tokens = mask.sum().clamp(min=1) if batch_tokens is None else max(batch_tokens, 1)
        return token_sum / tokens / window_batches
    if loss_type == "dr_grpo":
        return token_sum / (window_completions * max_completion_length)
    if loss_type == "dapo":
        return token_sum / max(window_tokens, 1)
    raise ConfigurationError(f"Unknown loss_type {loss_type!r}")


def tokenize_completion(tokenizer, item: dict[str, Any], chat_template_kwargs: dict[str, Any] | None,
                        max_seq_length: int) -> tuple[list[int], int]:
    """``(ids, n_prompt)``: the served prompt, then the completion and the template's end of turn."""
    messages = item["messages"]
    prompt = render_chat(tokenizer, messages, chat_template_kwargs)
    answer_message = {"role": "assistant", "content": item["completion"]["content"]}
    full = tokenizer.apply_chat_template([*messages, answer_message], tokenize=False, **(chat_template_kwargs or {}))
    answer = full[len(prompt):] if full.startswith(prompt) else answer_message["content"] + (tokenizer.eos_token or "")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    if len(prompt_ids) + 1 >= max_seq_length:
        raise ConfigurationError(f"A GRPO prompt has {len(prompt_ids)} tokens, at or over max_seq_length="
                                 f"{max_seq_length}: raise it in train_kwargs.")
    return (prompt_ids + answer_ids)[:max_seq_length], len(prompt_ids)

