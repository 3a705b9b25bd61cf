"""DSPy's fine-tuning interface for our LMs: ``lm.finetune(...)`` and
``dspy.BootstrapFinetune`` train a LoRA adapter on the chat data DSPy hands over,
load it into the running replicas, and return the LM that serves it.

DSPy's contract (``dspy/clients/provider.py``, ``dspy.LM.finetune``):
``lm.finetune(train_data, train_data_format, train_kwargs)`` starts a thread and
returns a ``TrainingJob`` (a ``Future``); the thread calls
``provider.finetune(job=..., model=..., train_data=..., ...)``, which returns a
model string, and DSPy sets the job's result to ``lm.copy(model=that string)``.
Our provider returns the adapter's model label; the LM's ``copy`` turns such a
label into the LM that sends every request with that adapter.

``BootstrapFinetune`` calls ``lm.kill()`` before training "to free up
resources"; here ``kill`` and ``launch`` do nothing: the engines belong to the LM
(``lm.shutdown()`` stops them), and the adapter must be loaded into them after
training. On a GPU the training runs beside the engine: leave it room
(``gpu_memory_utilization=0.5`` for a small model) or pass
``train_kwargs={"device": "cuda:1"}``.

The provider reaches the LM through a small *host* interface (``LoRAHost``), so
it is tested without an engine and the LM classes stay its only user.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from typing import Any, Protocol

from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat, TrainingStatus

from ..errors import ConfigurationError
from .reinforce import GRPOJob
from .training import LoRATrainConfig, check_rank_fits, train_lora

__all__ = ["LoRAHost", "LoRAProvider", "LoRATrainingJob", "default_adapter_dir"]

logger = logging.getLogger(__name__)

# train_kwargs keys that are about the adapter, not the training run.
_ADAPTER_KEYS = ("adapter_name", "output_dir")


class LoRAHost(Protocol):  # with ReinforceHost's methods too when the LM serves dspy.GRPO
    """What the provider needs from the LM that serves the adapter."""

    base_model_path: str  # the local folder the engines loaded
    chat_template_kwargs: dict[str, Any]
    max_lora_rank: int | None  # None: the LM was built without enable_lora=True

    def load_adapter(self, name: str, path: str) -> None: ...

    def adapter_model(self, name: str) -> str: ...


class LoRATrainingJob(TrainingJob):
    """A running LoRA training: ``status()``, ``progress`` (step, total, last
    loss) and ``cancel()`` (stops between two steps; the job's result becomes the
    ``InterruptedError``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._stop = threading.Event()
        self._training_status = TrainingStatus.pending
        self.progress: tuple[int, int, float | None] = (0, 0, None)
        self.adapter_path: str | None = None

    def cancel(self) -> bool:
        """Stop the training between two steps. The future is not cancelled: DSPy's
        thread sets its result (the ``InterruptedError``) when the loop stops."""
        self._stop.set()
        if self._training_status in (TrainingStatus.pending, TrainingStatus.running):
            self._training_status = TrainingStatus.cancelled
            return True
        return False

    def status(self) -> TrainingStatus:
        if self.done() and self._training_status == TrainingStatus.running:
            result = self.result()
            return TrainingStatus.failed if isinstance(result, BaseException) else TrainingStatus.succeeded
        return self._training_status

    def should_stop(self) -> bool:
        """Polled by the training loop between two steps: True once ``cancel()`` was called."""
        return self._stop.is_set()

    def on_step(self, step: int, total: int, loss: float) -> None:
        """Called by the training loop after each step."""
        self.progress = (step, total, loss)


def default_adapter_dir(name: str) -> str:
    """``$DSPY_FINETUNEDIR/lora/<name>`` (DSPy's fine-tuning folder)."""
    from dspy.clients.utils_finetune import get_finetune_directory

    return os.path.join(get_finetune_directory(), "lora", name)


def _default_name(base: str, train_data: list[dict[str, Any]], train_kwargs: dict[str, Any]) -> str:
    payload = json.dumps([os.path.basename(base.rstrip("/")), train_data, train_kwargs], sort_keys=True, default=repr)
    return "ft-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


class LoRAProvider(Provider):
    """Trains a LoRA with PEFT on the host LM's base model and serves it there."""

    def __init__(self, host: LoRAHost):
        super().__init__()
        self.finetunable = True
        self.TrainingJob = LoRATrainingJob
        self.reinforceable = True  # lm.reinforce / dspy.GRPO (reinforce.py)
        self.ReinforceJob = GRPOJob.bound(host)
        self._host = host

    @staticmethod
    def is_provider_model(model: str) -> bool:
        return model.startswith("vllm/")

    @staticmethod
    def launch(lm, launch_kwargs=None) -> None:
        """Nothing to launch: the LM's engines run from its construction on."""

    @staticmethod
    def kill(lm, launch_kwargs=None) -> None:
        """Deliberately nothing (see the module docstring): use ``lm.shutdown()``."""

    def finetune(self, job: TrainingJob, model: str, train_data: list[dict[str, Any]],
                 train_data_format: TrainDataFormat | str | None, train_kwargs: dict[str, Any] | None = None) -> str:
        host = self._host
        kwargs = dict(train_kwargs or {})
        adapter_kwargs = {k: kwargs.pop(k) for k in _ADAPTER_KEYS if k in kwargs}
        fmt = train_data_format.value if isinstance(train_data_format, TrainDataFormat) else train_data_format
        if fmt not in (None, TrainDataFormat.CHAT.value):
            raise ConfigurationError(f"LoRA fine-tuning takes chat data (TrainDataFormat.CHAT); got {fmt!r}. "
                                     "dspy.GRPO's data goes through lm.reinforce(), not lm.finetune().")
        config = LoRATrainConfig.from_kwargs(kwargs)
        # Every refusal happens before any training step is spent.
        check_rank_fits(config.rank, host.max_lora_rank, "LoRA fine-tuning")
        name = adapter_kwargs.get("adapter_name") or _default_name(host.base_model_path, train_data, kwargs)
        path = adapter_kwargs.get("output_dir") or default_adapter_dir(name)
        ours = job if isinstance(job, LoRATrainingJob) else None  # DSPy's plain TrainingJob has no hooks
        if ours is not None:
            ours._training_status = TrainingStatus.running
        logger.info("LoRA fine-tuning %r on %d examples into %s", name, len(train_data), path)
        try:
            result = train_lora(host.base_model_path, train_data, path, config,
                                chat_template_kwargs=host.chat_template_kwargs,
                                should_stop=ours.should_stop if ours is not None else None,
                                on_step=ours.on_step if ours is not None else None)
        except BaseException:
            if isinstance(job, LoRATrainingJob) and job._training_status == TrainingStatus.running:
                job._training_status = TrainingStatus.failed  # a cancel keeps "cancelled"
            raise
        logger.info("LoRA %r trained: %d steps in %.1f s, last loss %.4f", name, result.steps, result.seconds,
                    result.losses[-1])
        host.load_adapter(name, path)
        if isinstance(job, LoRATrainingJob):
            job.adapter_path = path
            job._training_status = TrainingStatus.succeeded
        return host.adapter_model(name)
