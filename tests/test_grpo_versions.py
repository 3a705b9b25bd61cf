"""Which weights a GRPO run serves (issue 35), with the real trainer (PEFT on the CPU, the
default model) and test_grpo.py's fake host standing in for the replicas:

- the steps trained after the last multiple of ``update_interval`` are published by
  ``terminate()`` (before: trained and thrown away), and a version that cannot be loaded
  then is reported by ``get_status()``;
- a run on a student that serves an adapter starts from that adapter's weights (before: a
  fresh LoRA, the base model), in its shape, or is refused when ``train_kwargs`` asks for
  another rank.
"""

from __future__ import annotations

import os

import pytest

dspy = pytest.importorskip("dspy")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from dspy.clients.utils_finetune import TrainDataFormat  # noqa: E402

from test_grpo import FakeHost, FakeStudent, _group, _job  # noqa: E402
from vllm_dspy_adapter.lora.reinforce import GRPOJob  # noqa: E402
from vllm_dspy_adapter.errors import ConfigurationError  # noqa: E402


def served_weights(folder: str) -> dict:
    """The LoRA tensors of a PEFT folder, as the replicas load them."""
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def trainer_weights(job) -> dict:
    """The trainer's LoRA tensors now, under the names PEFT saves them with."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(job.trainer.model).items()}


def step(job, batch_id: int) -> None:
    job.step([{"batch_id": batch_id, "group": _group()}], TrainDataFormat.GRPO_CHAT)


def test_terminate_publishes_the_steps_after_the_last_update_interval(default_model, tmp_path):
    host = FakeHost(default_model)
    job = _job(host, output_dir=str(tmp_path), update_interval=2, adapter_name="t")
    try:
        for batch_id in range(3):
            step(job, batch_id)
        status = job.get_status()
        assert (job.lm.adapter, status["version"], status["unpublished_steps"]) == ("t-v1", 1, 1)
        final = trainer_weights(job)  # step 3's weights: trained, not served
    finally:
        job.terminate()
    status = job.get_status()
    assert job.lm.adapter == "t-v2" and list(host.loaded) == ["t-v2"] and host.retired == ["t-v1"]
    assert (status["status"], status["version"], status["unpublished_steps"], status["publish_error"]) == (
        "terminated", 2, 0, None)
    served = served_weights(host.loaded["t-v2"])
    assert served.keys() == final.keys()
    assert all(torch.equal(served[k], final[k]) for k in final)  # the replicas got step 3's weights
    assert not all(torch.equal(served[k], served_weights(os.path.join(str(tmp_path), "v1"))[k]) for k in final)
    job.terminate()  # again: nothing more to publish
    assert list(host.loaded) == ["t-v2"] and job.get_status()["version"] == 2


def test_terminate_after_a_published_step_publishes_nothing_more(default_model, tmp_path):
    host = FakeHost(default_model)
    job = _job(host, output_dir=str(tmp_path), update_interval=2)
    for batch_id in range(2):
        step(job, batch_id)
    job.terminate()
    assert list(host.loaded) == ["grpo-v1"] and job.get_status()["unpublished_steps"] == 0


def test_a_final_version_the_replicas_refuse_is_reported_and_the_last_one_keeps_serving(default_model, tmp_path):
    host = FakeHost(default_model)
    job = _job(host, output_dir=str(tmp_path), update_interval=2)
    for batch_id in range(3):
        step(job, batch_id)
    host.refuse_loads = True
    job.terminate()
    status = job.get_status()
    assert job.lm.adapter == "grpo-v1" and list(host.loaded) == ["grpo-v1"]
    assert (status["status"], status["version"], status["unpublished_steps"]) == ("terminated", 1, 1)
    assert "version 2 could not be loaded" in status["publish_error"] and "grpo-v1 keeps serving" in \
        status["publish_error"]


def test_cancel_frees_the_trainer_without_publishing(default_model, tmp_path):
    host = FakeHost(default_model)
    job = _job(host, output_dir=str(tmp_path), update_interval=2)
    step(job, 0)
    job.cancel()
    assert not host.loaded and job.lm.adapter is None
    assert job.get_status()["status"] == "cancelled" and job.get_status()["unpublished_steps"] == 1
    with pytest.raises(ConfigurationError, match="cancelled"):
        step(job, 1)


# ------------------------------------------------ a run continues from what the student serves

class ServingStudent(FakeStudent):
    """A student that serves an adapter of the host (``lm.adapters()``: name, folder, rank)."""

    def __init__(self, host, adapter):
        super().__init__()
        self.host, self.adapter, self.model = host, adapter, f"base+{adapter}"

    def adapters(self):
        import json

        def rank(path):
            with open(os.path.join(path, "adapter_config.json")) as fh:
                return json.load(fh)["r"]

        return [{"name": n, "path": p, "rank": rank(p)} for n, p in self.host.loaded.items()]


def _start(host, student, **train_kwargs):
    job = GRPOJob.bound(host)(lm=student, train_kwargs={"learning_rate": 2e-4, "beta": 0.0, **train_kwargs})
    job.initialize()
    return job


def test_a_run_starts_from_the_adapter_the_student_serves_in_its_shape(default_model, tmp_path):
    host = FakeHost(default_model)
    first = _job(host, output_dir=str(tmp_path / "first"), adapter_name="t", rank=4, alpha=8)
    step(first, 0)
    first.terminate()
    served = served_weights(host.loaded["t-v1"])  # what the replicas serve: rank 4

    # Another name, no rank given: the adapter's shape and weights; the user's adapter is not retired.
    job = _start(host, ServingStudent(host, "t-v1"), output_dir=str(tmp_path / "second"), adapter_name="u")
    try:
        assert (job.config.rank, job.config.alpha) == (4, 8)
        start = trainer_weights(job)
        assert start.keys() == served.keys() and all(torch.equal(start[k], served[k]) for k in served)
        assert job.get_status()["adapter"] == "t-v1" and job.get_status()["version"] == 0
        step(job, 0)
        assert job.lm.adapter == "u-v1" and sorted(host.loaded) == ["t-v1", "u-v1"] and host.retired == []
    finally:
        job.terminate()

    # The same name: the numbering goes on, and the version it replaces is retired as any of the run's.
    job = _start(host, ServingStudent(host, "t-v1"), output_dir=str(tmp_path / "first"), adapter_name="t")
    try:
        assert job.get_status()["version"] == 1
        step(job, 0)
        assert job.lm.adapter == "t-v2" and "t-v1" in host.retired and "t-v2" in host.loaded
    finally:
        job.terminate()


def test_a_rank_unlike_the_served_adapters_is_refused_with_the_fix(default_model, tmp_path):
    host = FakeHost(default_model)
    first = _job(host, output_dir=str(tmp_path / "first"), adapter_name="t", rank=4)
    step(first, 0)
    first.terminate()
    with pytest.raises(ConfigurationError, match=r"serves adapter 't-v1' \(rank 4\).*asks for rank 8.*"
                                                  r"Drop 'rank'.*lm.switch_adapter\(None\)"):
        _start(host, ServingStudent(host, "t-v1"), output_dir=str(tmp_path / "second"), rank=8)
    with pytest.raises(ConfigurationError, match=r"asks for rank 8"):  # TRL's lora_config names it too
        _start(host, ServingStudent(host, "t-v1"), output_dir=str(tmp_path / "second"), lora_config={"r": 8})
