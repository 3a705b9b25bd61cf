"""The GRPO trainer: a PEFT LoRA on the base model, kept in memory across steps.

``GRPOTrainer(base_model, config)`` loads the model once; ``step(groups)`` takes
one GRPO update on DSPy's groups (the loss and its reasons: ``grpo.py``);
``write(folder)`` writes the adapter in PEFT's format (what vLLM and
``lm.load_adapter`` load); ``mark_served()`` records it as the version being
served, the behaviour policy of the next rollouts; ``close()`` frees the model (and the GPU
memory it held). Heavy libraries are imported inside the methods.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

from ..errors import ConfigurationError, TrainingStepError
from .grpo import (GRPOConfig, StepMetrics, aggregate_loss, check_groups, completion_means, group_advantages,
                   grpo_token_losses, sample_std, tokenize_completion)
from .trainer_device import usable_cores
from .training import device_and_dtype

__all__ = ["GRPOTrainer"]

logger = logging.getLogger(__name__)


class GRPOTrainer:
    """One LoRA trained by GRPO steps (see the module docstring)."""

    def __init__(self, base_model: str, config: GRPOConfig, *, temperature: float = 1.0,
                 chat_template_kwargs: dict[str, Any] | None = None, start_from: str | None = None):
        """``start_from``: a PEFT folder of this shape (``config``'s rank, alpha, target
        modules) whose weights the LoRA starts from (and the served policy is); None: a
        fresh LoRA (B = 0: the base model)."""
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.temperature = float(temperature)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.device, dtype = device_and_dtype(config)
        started = time.monotonic()
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (
            self.tokenizer.eos_token_id or 0)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(self.device)
        model.config.use_cache = False
        if config.gradient_checkpointing:
            kwargs = config.gradient_checkpointing_kwargs or {"use_reentrant": False}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if kwargs.get("use_reentrant", True):  # reentrant checkpoints need an input that requires grad
                model.enable_input_require_grads()
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
        try:
            self.model = get_peft_model(model, lora)
        except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
            raise ConfigurationError(f"LoRA target_modules {list(config.target_modules)} do not match this model: "
                                     f"{exc}. Pass train_kwargs={{'target_modules': [...]}}.") from exc
        if start_from is not None:
            self._load_start(start_from)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = _scheduler(self.optimizer, config)
        self._served = self._adapter_state()  # the policy the replicas sample from (the base at first: B = 0)
        self._ahead = False  # trained since the served version was saved
        self.steps = 0
        self.per_pass = config.batch_size  # completions per forward pass: halved by an out-of-memory retry
        logger.info("GRPO trainer ready on %s in %.1f s (%d trainable parameters)", self.device,
                    time.monotonic() - started, sum(p.numel() for p in self.params))

    # ------------------------------------------------------------------ state

    def _adapter_state(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def _load_adapter_state(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)

    def _load_start(self, folder: str) -> None:
        """The LoRA's weights from ``folder``, every one of them, or ``ConfigurationError``."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        weights = load_peft_weights(folder, device=self.device)
        result = set_peft_model_state_dict(self.model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ConfigurationError(f"GRPO: the adapter in {folder} does not fit this model's LoRA (missing "
                                     f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}); start from the "
                                     "base model with lm.switch_adapter(None) before lm.reinforce(...).")

    # ------------------------------------------------------------ log-probs

    def _chunks(self, items: list, size: int):
        for start in range(0, len(items), size):
            yield start, items[start:start + size]

    def _tensors(self, batch: list[tuple[list[int], int]]):
        """``(ids, attention, mask, first)`` of right-padded sequences: ``mask`` marks the completion
        tokens among the predicted positions 1..width-1; ``first``, the shortest prompt's length."""
        import torch

        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s, _ in batch], device=self.device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in batch], device=self.device)
        mask = torch.tensor([[1.0 if n <= j < len(s) else 0.0 for j in range(1, width)] for s, n in batch],
                            device=self.device)
        return ids, attention, mask, max(1, min(n for _, n in batch))

    def _logps(self, ids, attention, first: int):
        """Log-probs [B, width-1] of ``ids[:, 1:]``. Only the positions from ``first`` on get logits
        (``logits_to_keep``: the prompts' share of the vocabulary-wide logits is never made) and
        the float32 log-softmax runs one row at a time (TRL's ``selective_log_softmax``): the
        logits, not the layers, are most of a small model's training memory. Zeros stand in for
        the prompt positions, which the completion mask leaves out."""
        import torch

        logits = self.model(input_ids=ids, attention_mask=attention, logits_to_keep=ids.shape[1] - first + 1).logits
        rows = [torch.gather(torch.log_softmax(row.float() / self.temperature, dim=-1), 1, t.unsqueeze(1)).squeeze(1)
                for row, t in zip(logits[:, :-1], ids[:, first:])]
        return torch.nn.functional.pad(torch.stack(rows), (first - 1, 0))

    def _sequence_logps(self, sequences) -> list:
        """Each sequence's log-probs (1-D, its own length - 1), computed ``per_pass`` at a time."""
        out = []
        for _, chunk in self._chunks(sequences, self.per_pass):
            ids, attention, _, first = self._tensors(chunk)
            out += [row[:len(s) - 1] for row, (s, _) in zip(self._logps(ids, attention, first), chunk)]
        return out

    @staticmethod
    def _padded(rows: list, width: int):
        import torch

        return torch.stack([torch.nn.functional.pad(r, (0, width - 1 - len(r))) for r in rows])

    def _reference_and_old(self, sequences):
        """Per sequence: the base model's log-probs (adapter off) and the served policy's."""
        import torch

        self.model.eval()  # no dropout: the policies as they sample
        with torch.no_grad():
            if self._ahead:
                current = self._adapter_state()
                self._load_adapter_state(self._served)
            try:
                olds = self._sequence_logps(sequences)
                with self.model.disable_adapter():
                    refs = self._sequence_logps(sequences)
            finally:
                if self._ahead:
                    self._load_adapter_state(current)
        return refs, olds

    def mean_completion_logp(self, groups: list[list[dict[str, Any]]]) -> list[float]:
        """The current adapter's mean per-token log-probability of each completion, in order
        (what a GRPO step should raise for rewarded completions)."""
        import torch

        sequences = [tokenize_completion(self.tokenizer, item, self.chat_template_kwargs, self.config.max_seq_length)
                     for group in check_groups(groups) for item in group]
        self.model.eval()
        with torch.no_grad():
            logps = self._sequence_logps(sequences)
        return [float(logp[n - 1:].mean()) if len(ids) > n else 0.0 for logp, (ids, n) in zip(logps, sequences)]

    # ----------------------------------------------------------------- a step

    def step(self, groups: list[list[dict[str, Any]]]) -> StepMetrics:
        """One GRPO update on the groups; ``TrainingStepError`` (state restored) on failure.

        Out of GPU memory, the step is retried from the same state with half as many
        completions per forward pass (``per_pass``, kept for the next steps; the update is
        the same, only split finer), down to one; then it fails."""
        import torch

        groups = check_groups(groups)  # bad input: refused before any work
        config = self.config
        started = time.monotonic()
        sequences, advantages = [], []
        rewards = [float(item["reward"]) for group in groups for item in group]
        step_std = sample_std(rewards) if config.scale_rewards == "batch" else None
        for group in groups:
            advantages += group_advantages([float(item["reward"]) for item in group],
                                           scale=config.scale_rewards != "none", std=step_std)
            sequences += [tokenize_completion(self.tokenizer, item, self.chat_template_kwargs, config.max_seq_length)
                          for item in group]
        saved_adapter, saved_optimizer = self._adapter_state(), copy.deepcopy(self.optimizer.state_dict())
        saved_scheduler = self.scheduler.state_dict()
        threads = torch.get_num_threads()
        if self.device == "cpu":
            torch.set_num_threads(config.cpu_threads or usable_cores())
        try:
            while True:
                try:
                    metrics = self._update(sequences, torch.tensor(advantages, dtype=torch.float32,
                                                                   device=self.device))
                    break
                except BaseException as exc:
                    self.optimizer.zero_grad(set_to_none=True)
                    self._load_adapter_state(saved_adapter)
                    self.optimizer.load_state_dict(copy.deepcopy(saved_optimizer))  # a retry must not see it moved
                    self.scheduler.load_state_dict(saved_scheduler)
                    out_of_memory = isinstance(exc, torch.OutOfMemoryError)
                    if not out_of_memory or self.per_pass == 1:
                        if self.device.startswith("cuda"):
                            torch.cuda.empty_cache()
                        if out_of_memory:
                            raise TrainingStepError(
                                f"GRPO step {self.steps + 1} ran out of memory on {self.device}, even one "
                                f"completion per forward pass: {str(exc).splitlines()[0]}. Pass train_kwargs "
                                "gradient_checkpointing=True (recomputes the layers' activations), lower "
                                "max_seq_length or the replicas' gpu_memory_utilization, or give the trainer its "
                                "own GPU (train_kwargs={'device': 'cuda:N'}). The adapter served before this step "
                                "keeps serving.") from exc
                        raise
                    reason = str(exc).splitlines()[0]
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                # out of memory; the exception and the tensors its frames held are released: split finer
                self.per_pass = max(1, self.per_pass // 2)
                logger.warning("GRPO step %d ran out of memory on %s (%s); retrying it with %d completions per "
                               "forward pass (the same update, split finer; kept for the next steps). To start "
                               "there, pass train_kwargs batch_size=%d with gradient_accumulation_steps=%d, or "
                               "gradient_checkpointing=True.", self.steps + 1, self.device, reason, self.per_pass,
                               self.per_pass, config.gradient_accumulation_steps * config.batch_size // self.per_pass)
        finally:
            torch.set_num_threads(threads)
        loss, kl, updates, tokens = metrics
        self.steps += 1
        self._ahead = True
        result = StepMetrics(loss=loss, kl=kl, reward_mean=sum(rewards) / len(rewards), completions=len(sequences),
                             tokens=tokens, updates=updates, seconds=time.monotonic() - started,
                             per_pass=self.per_pass)
        logger.info("GRPO step %d: loss %.4f, kl %.4f, mean reward %.3f, %d completions, %d optimiser step(s), "
                    "%.1f s", self.steps, loss, kl, result.reward_mean, len(sequences), updates, result.seconds)
        return result

    def _update(self, sequences, advantages) -> tuple[float, float, int, int]:
        import torch

        config = self.config
        refs, olds = self._reference_and_old(sequences)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = total_kl = 0.0
        tokens = updates = 0
        batches = list(self._chunks(sequences, config.batch_size))
        windows = [batches[i:i + config.gradient_accumulation_steps]
                   for i in range(0, len(batches), config.gradient_accumulation_steps)]
        for window in windows:
            window_completions = sum(len(batch) for _, batch in window)
            window_tokens = sum(len(ids) - n for _, batch in window for ids, n in batch)
            for start, batch in window:
                batch_tokens = sum(len(ids) - n for ids, n in batch)
                for offset, chunk in self._chunks(batch, self.per_pass):  # the batch, per_pass at a time
                    at = slice(start + offset, start + offset + len(chunk))
                    ids, attention, mask, first = self._tensors(chunk)
                    per_token, kl = grpo_token_losses(self._logps(ids, attention, first),
                                                      self._padded(olds[at], ids.shape[1]),
                                                      self._padded(refs[at], ids.shape[1]), advantages[at],
                                                      beta=config.beta, epsilon=config.epsilon,
                                                      epsilon_high=config.epsilon_high or config.epsilon)
                    loss = aggregate_loss(per_token, mask, config.loss_type, window_completions=window_completions,
                                          window_tokens=window_tokens, window_batches=len(window),
                                          max_completion_length=config.max_completion_length,
                                          batch_tokens=batch_tokens)
                    if not torch.isfinite(loss):
                        raise TrainingStepError(f"GRPO step {self.steps + 1}: the loss is not finite "
                                                f"({float(loss.detach())}); no update was applied and the adapter "
                                                "served before this step keeps serving. Lower train_kwargs "
                                                "learning_rate.")
                    loss.backward()
                    loss_means, kl_means = completion_means(per_token.detach(), kl.detach(), mask)
                    total_loss += float(loss_means.sum())
                    total_kl += float(kl_means.sum())
                    tokens += int(mask.sum())
            norm = torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm or float("inf"))
            if not torch.isfinite(norm):
                raise TrainingStepError(f"GRPO step {self.steps + 1}: the gradient is not finite; no update was "
                                        "kept. Lower train_kwargs learning_rate.")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            updates += 1
        if not all(torch.isfinite(p).all() for p in self.params):
            raise TrainingStepError(f"GRPO step {self.steps + 1} made the adapter's weights non-finite; the update "
                                    "was undone. Lower train_kwargs learning_rate.")
        return total_loss / len(sequences), total_kl / len(sequences), updates, tokens

    @property
    def learning_rate(self) -> float:
        """The learning rate the next optimiser step takes (the schedule's)."""
        return float(self.optimizer.param_groups[0]["lr"])

    # --------------------------------------------------------------- output

    def write(self, folder: str) -> str:
        """Write the current adapter to ``folder`` in PEFT's format."""
        os.makedirs(folder, exist_ok=True)
        self.model.save_pretrained(folder)
        return folder

    def mark_served(self) -> None:
        """Record the current adapter as the version the replicas serve (the behaviour
        policy of the next rollouts): call it once a ``write`` is loaded."""
        self._served = self._adapter_state()
        self._ahead = False

    def close(self) -> None:
        """Free the model, the optimiser and their memory (idempotent)."""
        import gc

        import torch

        self.model = self.optimizer = self.scheduler = self._served = None
        self.params = []
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _scheduler(optimizer, config: GRPOConfig):
    """transformers' learning-rate schedule by its name (``GRPOConfig.lr_scheduler_type``),
    stepped once per optimiser step."""
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.max_steps)
