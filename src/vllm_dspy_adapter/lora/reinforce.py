"""DSPy's ``ReinforceJob`` for our LMs: ``dspy.GRPO`` on the replicas that serve the program.

DSPy's contract (``dspy/clients/provider.py``, ``dspy/teleprompt/grpo.py``):
``lm.reinforce(train_kwargs)`` builds ``provider.ReinforceJob(lm=lm, train_kwargs=...)``
and calls ``initialize()``; ``dspy.GRPO`` then loops: it waits until
``get_status()["pending_batch_ids"]`` lists a batch id it has not filled, generates
rollouts with the student LM (the same object), and calls ``step(train_data=
[{"batch_id", "group"}], train_data_format=TrainDataFormat.GRPO_CHAT)``, one group
per pending id; at the end ``terminate()``. It expects the job to update the
student LM in place.

``GRPOJob`` keeps one ``GRPOTrainer`` (PEFT model in memory) from ``initialize``
to ``terminate``. Every ``update_interval`` steps (and at ``terminate``, for the
steps after the last multiple) it publishes a version: saves
the adapter to ``<output_dir>/v<N>``, loads it on every replica as
``<adapter_name>-v<N>`` (all or none), switches the student LM to it
(``switch_adapter``: one assignment, every request after it carries the new
version), then unloads the previous version once no request holds it
(``retire_adapter``). No replica restarts; a replica restarted meanwhile loads
the registered, current version. A failed step (``TrainingStepError``) or a
failed load leaves the last published version serving. Ctrl-C during a step
terminates the job (frees the trainer) and goes on up.

The job reaches the LM through two small interfaces (``ReinforceHost``: the LM's
replicas; ``StudentLM``: the LM object DSPy hands over), so it is tested with fakes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import weakref
from typing import Any, ClassVar, Protocol

from dspy.clients.provider import ReinforceJob
from dspy.clients.utils_finetune import TrainDataFormat

from ..errors import ConfigurationError, TrainingStepError
from .grpo import GRPOConfig, StepMetrics, check_groups
from .grpo_start import choose_start
from .registry import check_adapter_name
from .trainer_device import ServingPlacement, check_room, choose_trainer_device
from .training import check_rank_fits

__all__ = ["GRPOJob", "ReinforceHost", "StudentLM"]

logger = logging.getLogger(__name__)


class ReinforceHost(Protocol):
    """What the job needs from the replicas that serve the student."""

    base_model_path: str
    chat_template_kwargs: dict[str, Any]
    max_lora_rank: int | None

    def trainer_placement(self) -> ServingPlacement: ...

    def load_adapter(self, name: str, path: str, timeout: float = 300.0) -> Any: ...

    def retire_adapter(self, name: str, timeout: float = 60.0) -> bool: ...

    def adapter_model(self, name: str) -> str: ...


class StudentLM(Protocol):
    """The LM object DSPy's GRPO hands the job (``lm.reinforce``)."""

    model: str
    kwargs: dict[str, Any]
    adapter: str | None  # what it serves now: a run continues from it (grpo_start.py)

    def switch_adapter(self, name: str | None) -> None: ...

    def adapters(self) -> list[dict[str, Any]]: ...


class GRPOJob(ReinforceJob):
    """A GRPO run training a LoRA on the student's own replicas (module docstring).
    ``host`` is bound per LM by ``GRPOJob.bound(host)`` (the provider's ``ReinforceJob``)."""

    host: ClassVar[ReinforceHost | None] = None
    live: ClassVar[weakref.WeakSet] = weakref.WeakSet()  # per bound class: the LM's running jobs

    @classmethod
    def bound(cls, host: ReinforceHost) -> type[GRPOJob]:
        return type(cls.__name__, (cls,), {"host": host, "live": weakref.WeakSet(), "__module__": cls.__module__})

    def __init__(self, lm: StudentLM, train_kwargs: dict[str, Any] | None = None):
        super().__init__(lm=lm, train_kwargs=train_kwargs)
        self.config = GRPOConfig.from_kwargs(train_kwargs)  # a bad option fails before anything loads
        self._groups_per_step_given = "groups_per_step" in (train_kwargs or {})
        self._told_duplicates = False
        check_adapter_name(f"{self.config.adapter_name}-v1")
        self.job_id = f"grpo-{uuid.uuid4().hex[:8]}"
        self.trainer = None
        self.version = 0
        self.adapter: str | None = None  # the version serving now
        self.steps = 0
        self.last_step: StepMetrics | None = None
        self.swap_seconds: list[float] = []
        self._retiring: list[str] = []  # old versions still held by requests at their deadline
        self._own: set[str] = set()  # the versions of this run's line (retired when replaced), not a user's adapter
        self._published_steps = 0  # self.steps when the serving version was published
        self.publish_error: str | None = None  # why terminate() could not publish the last steps
        self._next_batch = 0
        self._pending: list[int] = []
        self._status = "not_started"
        self._lock = threading.Lock()  # one step / checkpoint / terminate at a time

    # ------------------------------------------------------------ lifetime

    def initialize(self) -> None:
        host, config = self.host, self.config
        if host is None:
            raise ConfigurationError("GRPOJob is not bound to an LM: use lm.reinforce(train_kwargs) on a "
                                     "vLLMOffline / vLLMOfflineMultiGPU.")
        start = choose_start(self.lm, config, self.train_kwargs)  # the served adapter's shape, or refused
        check_rank_fits(config.rank, host.max_lora_rank, "GRPO (a LoRA trained and served live)")
        for earlier in list(self.live):  # one trainer per LM: a run given up on (Ctrl-C) frees its memory now
            logger.warning("GRPO job %s was still running on this LM: terminating it (its unpublished steps "
                           "are dropped)", earlier.job_id)
            with earlier._lock:
                earlier._close("terminated")
        placement = host.trainer_placement()
        device = choose_trainer_device(config.device, placement)
        check_room(device, placement)
        if device == "cpu" and placement.gpu_count and config.device is None:
            logger.warning("GRPO job %s: training on the CPU although %d GPU(s) are visible: the replicas run on %s, "
                           "none a local GPU the trainer can share. Pass train_kwargs device='cuda:N' to train on one.",
                           self.job_id, placement.gpu_count, ", ".join(placement.replica_devices))
        temperature = config.temperature or self.lm.kwargs.get("temperature") or 1.0
        sampled = self.lm.kwargs.get("temperature")
        if sampled == 0:
            logger.warning("GRPO job %s: the LM samples at temperature=0, so every rollout of a group is the same "
                           "and GRPO has nothing to learn from: build the LM with temperature=1.0.", self.job_id)
        if config.temperature and sampled and abs(config.temperature - sampled) > 1e-6:
            logger.warning("GRPO train_kwargs temperature=%g but the LM samples the rollouts at temperature=%g: the "
                           "trainer's log-probabilities are not the sampling policy's. Set one value for both.",
                           config.temperature, sampled)
        if config.loss_type == "dr_grpo" and config.max_completion_length is None:
            config.max_completion_length = self.lm.kwargs.get("max_tokens")  # what the rollouts may reach
            if not config.max_completion_length:
                raise ConfigurationError("GRPO loss_type='dr_grpo' divides by max_completion_length: give it in "
                                         "train_kwargs, or set max_tokens on the LM.")
        from .grpo_trainer import GRPOTrainer

        config.device = device
        logger.info("GRPO job %s: training LoRA %r on %s (replicas on %s), temperature %g", self.job_id,
                    config.adapter_name, device, ", ".join(placement.replica_devices), temperature)
        if not self._groups_per_step_given:
            logger.warning("GRPO job %s: train_kwargs has no groups_per_step, so each step trains on %d group: "
                           "right for dspy.GRPO's defaults (one example per step, one predictor). It makes "
                           "num_dspy_examples_per_grpo_step x predictors groups per step; when that is more, set "
                           "train_kwargs['groups_per_step'] to it, or the rest are trained in later steps, "
                           "off-policy (sampled by an older version).", self.job_id, config.groups_per_step)
        self.trainer = GRPOTrainer(host.base_model_path, config, temperature=float(temperature),
                                   chat_template_kwargs=host.chat_template_kwargs,
                                   start_from=None if start is None else start.path)
        if start is not None:
            logger.info("GRPO job %s: continuing from %s, which the student serves (%s)", self.job_id, start.adapter,
                        start.path)
            self.adapter, self.version = start.adapter, start.version
            if start.version:  # an earlier run of this name: its versions are this line's
                self._own.add(start.adapter)
        self.output_dir = config.output_dir or _default_dir(config.adapter_name)
        self._issue_batches()
        self._status = "running"
        self.live.add(self)

    def terminate(self) -> None:
        """Publish the steps trained since the last published version (``update_interval`` > 1
        leaves up to ``update_interval - 1`` of them), then free the trainer; the student LM
        keeps serving the last version. If that version cannot be loaded, the previous one
        keeps serving and ``get_status()`` says so (``publish_error``, ``unpublished_steps``)."""
        with self._lock:
            if self.trainer is not None and self._status == "running" and self.steps > self._published_steps:
                try:
                    self._publish()
                except Exception as exc:  # noqa: BLE001 - the job ends either way; the status says why
                    self.publish_error = str(exc)
                    logger.warning("GRPO job %s: the last %d step(s) were not published: %s", self.job_id,
                                   self.steps - self._published_steps, exc)
            self._close("terminated")

    def cancel(self) -> None:
        """Free the trainer without publishing the steps trained since the last version."""
        with self._lock:
            self._close("cancelled")

    def _close(self, status: str) -> None:
        self.live.discard(self)
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
        self._pending = []
        self._retire_waiting(timeout=5.0)
        if self._status == "running":
            self._status = status
        logger.info("GRPO job %s %s after %d step(s); serving %s", self.job_id, status, self.steps,
                    self.adapter or "the base model")

    # ------------------------------------------------------------ status

    def get_status(self) -> dict[str, Any]:
        """DSPy's ``GRPOStatus`` plus ``version``, ``adapter`` (the version serving), ``device``
        (the trainer's), ``steps``, ``unpublished_steps`` (trained since ``adapter`` was
        published), ``publish_error`` (why ``terminate`` could not publish them, or None),
        ``swap_seconds`` and ``last_step`` (loss, kl, reward mean, seconds of the last step)."""
        return {"job_id": self.job_id, "status": self._status, "current_model": self.lm.model,
                "checkpoints": dict(self.checkpoints), "last_checkpoint": self.last_checkpoint,
                "pending_batch_ids": list(self._pending), "version": self.version, "adapter": self.adapter,
                "device": self.config.device,
                "steps": self.steps, "unpublished_steps": self.steps - self._published_steps,
                "publish_error": self.publish_error, "swap_seconds": list(self.swap_seconds),
                "last_step": None if self.last_step is None else vars(self.last_step)}

    def status(self) -> str:
        return self._status

    def _issue_batches(self) -> None:
        start = self._next_batch
        self._next_batch += self.config.groups_per_step
        self._pending = list(range(start, self._next_batch))

    # ------------------------------------------------------------ a step

    def step(self, train_data: list[dict[str, Any]], train_data_format: TrainDataFormat | str | None = None) -> None:
        fmt = train_data_format.value if isinstance(train_data_format, TrainDataFormat) else train_data_format
        if fmt not in (None, TrainDataFormat.GRPO_CHAT.value):
            raise ConfigurationError(f"GRPO steps take TrainDataFormat.GRPO_CHAT data; got {fmt!r}.")
        if not isinstance(train_data, list) or not all(isinstance(d, dict) and "group" in d for d in train_data):
            raise ConfigurationError("GRPO step: train_data must be [{'batch_id': int, 'group': [...]}, ...] "
                                     "(what dspy.GRPO sends).")
        groups = check_groups([d["group"] for d in train_data])
        self._tell_duplicates(groups)
        with self._lock:
            if self.trainer is None:
                raise ConfigurationError(f"GRPO job {self.job_id} is {self._status}: "
                                         "call lm.reinforce(...) for a new one.")
            try:
                self.last_step = self.trainer.step(groups)
                self.steps += 1
                self._issue_batches()
                if self.steps % self.config.update_interval == 0:
                    self._publish()
            except KeyboardInterrupt:
                self._close("cancelled")
                raise

    def _tell_duplicates(self, groups: list[list[dict[str, Any]]]) -> None:
        """dspy.GRPO fills batch ids beyond the groups it made with copies of them: say so once."""
        if self._told_duplicates:
            return
        keys = [json.dumps(group, sort_keys=True, default=str) for group in groups]
        if len(set(keys)) < len(keys):
            self._told_duplicates = True
            logger.warning("GRPO job %s: dspy.GRPO sent %d copies among %d groups in one step: groups_per_step=%d "
                           "is more than the groups it makes per step (num_dspy_examples_per_grpo_step x "
                           "predictors), so it repeats some. Lower train_kwargs['groups_per_step'].", self.job_id,
                           len(keys) - len(set(keys)), len(keys), self.config.groups_per_step)

    def _publish(self) -> None:
        """Save, load on every replica, switch the student, retire the previous version."""
        config, host = self.config, self.host
        version = self.version + 1
        name, folder = f"{config.adapter_name}-v{version}", os.path.join(self.output_dir, f"v{version}")
        self.trainer.write(folder)
        started = time.monotonic()
        try:
            host.load_adapter(name, folder, timeout=config.swap_timeout)
        except Exception as exc:
            raise TrainingStepError(f"GRPO step {self.steps}: version {version} could not be loaded on the replicas "
                                    f"({exc}); {self.adapter or 'the base model'} keeps serving.") from exc
        self.lm.switch_adapter(name)
        self.trainer.mark_served()
        self._published_steps = self.steps
        loaded = time.monotonic() - started
        old, self.adapter, self.version = self.adapter, name, version
        self._own.add(name)
        if old in self._own:  # a user's adapter the run started from stays loaded
            self._retiring.append(old)
        self._retire_waiting(timeout=config.swap_timeout)
        self.swap_seconds.append(loaded)
        logger.info("GRPO job %s: %s serving after step %d (loaded on every replica in %.2f s)", self.job_id, name,
                    self.steps, loaded)

    def _retire_waiting(self, timeout: float) -> None:
        still = []
        for old in self._retiring:
            if old == self.adapter:
                continue
            try:
                if not self.host.retire_adapter(old, timeout=timeout):
                    logger.warning("GRPO: %s still held by requests after %g s; unloaded later", old, timeout)
                    still.append(old)
            except Exception as exc:  # noqa: BLE001 - unloading is cleanup; the new version serves already
                logger.warning("GRPO: unloading %s failed: %s", old, exc)
        self._retiring = still

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, checkpoint_name: str) -> str:
        """Write the trainer's current adapter to ``<output_dir>/checkpoints/<name>`` (a PEFT
        folder: ``lm.load_adapter(name, folder)`` serves it later); returns the folder."""
        check_adapter_name(checkpoint_name)
        with self._lock:
            if self.trainer is None:
                raise ConfigurationError(f"GRPO job {self.job_id} is {self._status}: nothing to checkpoint.")
            folder = os.path.join(self.output_dir, "checkpoints", checkpoint_name)
            self.trainer.write(folder)
        self.checkpoints[checkpoint_name] = folder
        self.last_checkpoint = checkpoint_name
        return folder


def _default_dir(name: str) -> str:
    """``$DSPY_FINETUNEDIR/lora/<name>`` (DSPy's fine-tuning folder)."""
    from dspy.clients.utils_finetune import get_finetune_directory

    return os.path.join(get_finetune_directory(), "lora", name)
