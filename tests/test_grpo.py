"""GRPO without an engine: the loss and its parts (pure), the trainer's placement
(pure), and the real trainer and job on the default model (PEFT on the CPU) with a
fake host standing in for the replicas. The real loop, dspy.GRPO on the real
engine, is in test_grpo_engine.py.
"""

from __future__ import annotations

import math
import os

import pytest

dspy = pytest.importorskip("dspy")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from dspy.clients.utils_finetune import TrainDataFormat  # noqa: E402

from vllm_dspy_adapter.errors import ConfigurationError, TrainingStepError  # noqa: E402
from vllm_dspy_adapter.lora.grpo import (  # noqa: E402
    GRPOConfig,
    aggregate_loss,
    check_groups,
    group_advantages,
    grpo_loss,
)
from vllm_dspy_adapter.lora.reinforce import GRPOJob  # noqa: E402
from vllm_dspy_adapter.lora.trainer_device import ServingPlacement, check_room, choose_trainer_device  # noqa: E402

GIB = 1 << 30


# ------------------------------------------------------------------ pure parts


def test_advantages_are_group_relative():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert adv[0] > 0 > adv[1] and math.isclose(sum(adv), 0.0, abs_tol=1e-9)
    assert math.isclose(adv[0], 0.5 / math.sqrt(1 / 3), rel_tol=1e-3)  # (1 - 0.5) / the sample std, as TRL
    assert math.isclose(group_advantages([1.0, 0.0], std=2.0)[0], 0.5 / 2.0, rel_tol=1e-3)  # the step's std
    assert group_advantages([2.0, 2.0]) == [0.0, 0.0]  # no spread: nothing to learn
    assert group_advantages([3.0, 1.0], scale=False) == [1.0, -1.0]


def test_loss_is_the_clipped_surrogate_plus_beta_k3_kl():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0]])
    adv = torch.tensor([2.0])
    # On-policy and at the reference: ratio 1, KL 0, loss = -A.
    loss, kl = grpo_loss(logp, logp, logp, adv, mask, beta=0.04, epsilon=0.2, epsilon_high=0.2)
    assert torch.allclose(loss, torch.tensor([-2.0])) and torch.allclose(kl, torch.tensor([0.0]))
    # A ratio of e (far above 1 + epsilon) with A > 0 is clipped to 1.2.
    loss, _ = grpo_loss(logp, logp - 1.0, logp, adv, mask, beta=0.0, epsilon=0.2, epsilon_high=0.2)
    assert torch.allclose(loss, torch.tensor([-2.4]))
    # k3 KL: exp(d) - d - 1 with d = ref - logp = 0.5 on each token.
    _, kl = grpo_loss(logp, logp, logp + 0.5, adv, mask, beta=1.0, epsilon=0.2, epsilon_high=0.2)
    assert torch.allclose(kl, torch.tensor([math.exp(0.5) - 1.5]))
    # Padding (mask 0) does not count.
    loss, _ = grpo_loss(logp, logp, logp, adv, torch.tensor([[1.0, 0.0]]), beta=0.0, epsilon=0.2, epsilon_high=0.2)
    assert torch.allclose(loss, torch.tensor([-2.0]))


def test_trl_loss_types_aggregate_as_trl_over_an_accumulation_window():
    # Two forward passes in one window: completions of 1 and 3 tokens, then one of 2 tokens.
    per_token = [torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), torch.tensor([[3.0, 3.0, 0.0]])]
    masks = [torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 0.0]])]
    window = {"window_completions": 3, "window_tokens": 6, "window_batches": 2, "max_completion_length": 4}

    def total(loss_type):
        return round(sum(float(aggregate_loss(p, m, loss_type, **window)) for p, m in zip(per_token, masks)), 5)

    assert math.isclose(total("grpo"), round((2.0 + 1.0 + 3.0) / 3, 5))  # each completion's mean, then the mean
    assert math.isclose(total("dapo"), round((2.0 + 3.0 + 6.0) / 6, 5))  # every token of the window alike
    assert math.isclose(total("bnpo"), round(((2.0 + 3.0) / 4 + 6.0 / 2) / 2, 5))  # per pass, then over passes
    assert math.isclose(total("dr_grpo"), round((2.0 + 3.0 + 6.0) / (3 * 4), 5))  # a constant length


DSPY_TUTORIAL = {  # dspy docs/tutorials/rl_multihop, verbatim
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "temperature": 0.7, "beta": 0.04,
    "learning_rate": 2e-5, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "bf16": True, "lr_scheduler_type": "constant_with_warmup", "max_prompt_length": None,
    "max_completion_length": None, "scale_rewards": True, "max_grad_norm": 0.5, "lora": True,
}
ARBOR_EXAMPLE = {  # Ziems/arbor examples/multihop_dev.py, verbatim
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 24 / 6, "temperature": 1.0, "top_k": -1,
    "top_p": 1.0, "repetition_penalty": 1.0, "beta": 0.00, "learning_rate": 1e-6, "gradient_checkpointing": True,
    "bf16": True, "lr_scheduler_type": "constant_with_warmup", "loss_type": "dapo", "max_steps": 1000,
    "report_to": "wandb", "log_completions": True, "logging_steps": 1, "max_prompt_length": None,
    "max_completion_length": None, "scale_rewards": False, "max_grad_norm": 1.0,
    "lora_config": {"lora_alpha": 16, "lora_dropout": 0.05, "r": 8,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]},
    "num_training_gpus": 3, "num_inference_gpus": 1, "weight_decay": 0.001,
}


def test_the_train_kwargs_of_dspy_tutorials_and_arbor_are_taken(caplog):
    config = GRPOConfig.from_kwargs(DSPY_TUTORIAL)
    assert (config.batch_size, config.gradient_accumulation_steps, config.dtype) == (2, 4, "bfloat16")
    assert config.gradient_checkpointing and config.scale_rewards == "group" and config.max_grad_norm == 0.5
    with caplog.at_level("INFO", logger="vllm_dspy_adapter.lora.grpo"):
        config = GRPOConfig.from_kwargs(ARBOR_EXAMPLE)
    assert config.gradient_accumulation_steps == 4 and isinstance(config.gradient_accumulation_steps, int)
    assert (config.loss_type, config.scale_rewards, config.rank, config.alpha, config.dropout) == (
        "dapo", "none", 8, 16, 0.05)
    said = caplog.text
    assert "report_to='wandb' does nothing here" in said and "num_training_gpus=3 does nothing here" in said
    assert "max_steps=1000 does nothing with a constant learning rate" in said
    config = GRPOConfig.from_kwargs({"lr_scheduler_type": "cosine", "max_steps": 100, "warmup_ratio": 0.1})
    assert (config.warmup_steps, config.max_steps) == (10, 100)  # a decaying schedule keeps max_steps


@pytest.mark.parametrize("kwargs, message", [
    ({"lora": False}, "full fine-tuning"),
    ({"lora_config": {"r": 8, "bias": "all"}}, r"lora_config\['bias'\]"),
    ({"per_device_train_batch_size": 2, "batch_size": 4}, "set 'batch_size' twice"),
    ({"loss_type": "cispo"}, "loss_type 'cispo' is not supported"),
    ({"lr_scheduler_type": "cosine"}, "give max_steps"),
    ({"lr_scheduler_type": "polynomial", "max_steps": 10}, "not supported"),
    ({"warmup_ratio": 0.1}, "needs max_steps"),
    ({"num_iterations": 2}, "num_iterations=1"),
    ({"scale_rewards": "per-token"}, "scale_rewards"),
    ({"per_device_train_batch_sizes": 2}, "Did you mean 'per_device_train_batch_size'"),
])
def test_trl_names_that_would_change_the_training_are_refused(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        GRPOConfig.from_kwargs(kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"learnig_rate": 1e-4}, "Did you mean 'learning_rate'"),
    ({"beta": -1}, "beta"),
    ({"update_interval": 0}, "update_interval"),
    ({"temperature": 0}, "temperature"),
    ({"cpu_threads": 0}, "cpu_threads"),
    ({"cpu_threads": 1.5}, "cpu_threads must be an integer"),
])
def test_bad_train_kwargs_are_refused_by_name(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        GRPOConfig.from_kwargs(kwargs)


def test_groups_with_a_bad_item_are_refused_before_training():
    good = {"messages": [{"role": "user", "content": "hi"}], "completion": {"role": "assistant", "content": "x"},
            "reward": 1.0}
    assert check_groups([[good]]) == [[good]]
    with pytest.raises(ConfigurationError, match="reward nan is not a finite number"):
        check_groups([[good, {**good, "reward": float("nan")}]])
    with pytest.raises(ConfigurationError, match="completion"):
        check_groups([[{**good, "completion": "x"}]])
    with pytest.raises(ConfigurationError, match="no groups"):
        check_groups([])


def _placement(devices, gpus=1, util=0.9, model_gib=16, gpu_gib=80):
    return ServingPlacement(replica_devices=tuple(devices), gpu_count=gpus, gpu_memory_utilization=util,
                            model_bytes=model_gib * GIB, gpu_bytes=gpu_gib * GIB if gpus else None)


def test_trainer_device_follows_the_replicas():
    assert choose_trainer_device(None, _placement(["cpu:0-1"], gpus=0)) == "cpu"  # the CPU build trains on the CPU
    assert choose_trainer_device(None, _placement(["cuda:0"], gpus=1)) == "cuda:0"  # one GPU: shared
    assert choose_trainer_device(None, _placement(["cuda:0", "cuda:1"], gpus=3)) == "cuda:2"  # a free one
    assert choose_trainer_device("cuda:1", _placement(["cuda:0"], gpus=2)) == "cuda:1"
    with pytest.raises(ConfigurationError, match="sees 2 GPU"):
        choose_trainer_device("cuda:5", _placement(["cuda:0"], gpus=2))
    with pytest.raises(ConfigurationError, match="not a device"):
        choose_trainer_device("gpu1", _placement(["cuda:0"], gpus=2))


def test_vllm_offline_names_the_gpu_it_runs_on_so_the_trainer_shares_it():
    # vLLMOffline's engine was named "local": no GPU index, so on one GPU the trainer
    # went to the CPU (found on a lent H100, 2026-12-05: a step of 4 completions took 9.8 s).
    from vllm_dspy_adapter.backends.inprocess import inprocess_device

    assert inprocess_device(0) == "cpu"
    assert inprocess_device(1) == "cuda:0" and inprocess_device(4, tensor_parallel_size=2) == "cuda:0,1"
    assert choose_trainer_device(None, _placement([inprocess_device(1)], gpus=1)) == "cuda:0"
    assert choose_trainer_device(None, _placement([inprocess_device(2)], gpus=2)) == "cuda:1"
    assert choose_trainer_device(None, _placement([inprocess_device(0)], gpus=0)) == "cpu"


def test_a_shared_gpu_must_leave_the_trainer_room():
    # 8B in bf16 (16 GiB) beside replicas holding 90% of 80 GiB: refused, naming the setting that fits.
    with pytest.raises(ConfigurationError, match=r"gpu_memory_utilization=0\.72 or less"):
        check_room("cuda:0", _placement(["cuda:0"], util=0.9))
    check_room("cuda:0", _placement(["cuda:0"], util=0.7))  # fits
    check_room("cuda:1", _placement(["cuda:0"], gpus=2, util=0.9))  # a GPU of its own
    check_room("cpu", _placement(["cpu:0-1"], gpus=0))
    # Two replicas per GPU at 0.4 each hold 0.8 of it.
    with pytest.raises(ConfigurationError, match="2 replica"):
        check_room("cuda:0", _placement(["cuda:0#0", "cuda:0#1"], util=0.4))


# ------------------------------------------------------ the real trainer and job

QUESTION = [{"role": "user", "content": "Answer with one word: is the sky blue?"}]


def _group(good="yes", bad="no", n=2):
    return [{"messages": QUESTION, "completion": {"role": "assistant", "content": text}, "reward": reward}
            for _ in range(n) for text, reward in ((good, 1.0), (bad, 0.0))]


class FakeHost:
    """The replicas, as the job sees them: records loads and retirements."""

    def __init__(self, path, refuse_loads=False):
        self.base_model_path = path
        self.chat_template_kwargs = {}
        self.max_lora_rank = 8
        self.loaded, self.retired = {}, []
        self.refuse_loads = refuse_loads

    def trainer_placement(self):
        return ServingPlacement(("cpu:0-1",), gpu_count=0, gpu_memory_utilization=None, model_bytes=None,
                                gpu_bytes=None)

    def load_adapter(self, name, path, timeout=300.0):
        if self.refuse_loads:
            raise ConfigurationError("refused")
        assert os.path.isfile(os.path.join(path, "adapter_config.json"))
        self.loaded[name] = path

    def retire_adapter(self, name, timeout=60.0):
        self.retired.append(name)
        self.loaded.pop(name)
        return True

    def adapter_model(self, name):
        return f"base+{name}"


class FakeStudent:
    def __init__(self):
        self.model, self.kwargs, self.adapter = "base", {"temperature": 1.0}, None

    def switch_adapter(self, name):
        self.adapter, self.model = name, f"base+{name}"


def test_a_cpu_trainer_uses_every_core_of_the_process_unless_told():
    from vllm_dspy_adapter.lora.trainer_device import usable_cores

    assert GRPOConfig.from_kwargs({}).cpu_threads is None  # the trainer then takes usable_cores()
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    assert GRPOConfig.from_kwargs({"cpu_threads": 2}).cpu_threads == 2


def _job(host, **train_kwargs):
    job = GRPOJob.bound(host)(lm=FakeStudent(), train_kwargs={"learning_rate": 2e-4, "beta": 0.0, **train_kwargs})
    job.initialize()
    return job


def test_a_step_raises_the_rewarded_completions_log_probability(default_model, tmp_path):
    job = _job(FakeHost(default_model), output_dir=str(tmp_path))
    try:
        groups = [_group()]
        before = job.trainer.mean_completion_logp(groups)
        job.step([{"batch_id": 0, "group": groups[0]}], TrainDataFormat.GRPO_CHAT)
        after = job.trainer.mean_completion_logp(groups)
        rewarded = [a - b for a, b, item in zip(after, before, groups[0]) if item["reward"] == 1.0]
        unrewarded = [a - b for a, b, item in zip(after, before, groups[0]) if item["reward"] == 0.0]
        assert min(rewarded) > 0 > max(unrewarded), (rewarded, unrewarded)
    finally:
        job.terminate()


def test_trl_options_train_a_step(default_model, tmp_path):
    # Gradient checkpointing, DAPO's token-level loss, the step's reward std, a linear schedule with warmup.
    job = _job(FakeHost(default_model), output_dir=str(tmp_path), gradient_checkpointing=True, loss_type="dapo",
               scale_rewards="batch", lr_scheduler_type="linear", warmup_steps=1, max_steps=4,
               per_device_train_batch_size=2)
    try:
        groups = [_group()]
        before = job.trainer.mean_completion_logp(groups)
        job.step([{"batch_id": 0, "group": groups[0]}], TrainDataFormat.GRPO_CHAT)
        after = job.trainer.mean_completion_logp(groups)
        assert job.get_status()["last_step"]["updates"] == 2  # 4 completions, 2 per update
        # transformers' schedule: update 1 at lr 0 (warmup), update 2 at 2e-4, then 2e-4 x (4 - 2) / (4 - 1).
        assert math.isclose(job.trainer.learning_rate, 2e-4 * 2 / 3)
        rewarded = [a - b for a, b, item in zip(after, before, groups[0]) if item["reward"] == 1.0]
        unrewarded = [a - b for a, b, item in zip(after, before, groups[0]) if item["reward"] == 0.0]
        assert min(rewarded) > 0 > max(unrewarded), (rewarded, unrewarded)
        job.step([{"batch_id": 1, "group": groups[0]}], TrainDataFormat.GRPO_CHAT)
        assert job.trainer.learning_rate == 0.0  # max_steps reached
    finally:
        job.terminate()


def test_the_job_says_when_groups_per_step_does_not_match_what_dspy_sends(default_model, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="vllm_dspy_adapter.lora.reinforce"):
        job = _job(FakeHost(default_model), output_dir=str(tmp_path))  # no groups_per_step
        job.terminate()
        assert "train_kwargs has no groups_per_step" in caplog.text
        caplog.clear()
        job = _job(FakeHost(default_model), output_dir=str(tmp_path), groups_per_step=2)
        try:
            assert "groups_per_step" not in caplog.text
            group = _group()
            job.step([{"batch_id": 0, "group": group}, {"batch_id": 1, "group": list(group)}],
                     TrainDataFormat.GRPO_CHAT)  # what dspy.GRPO sends when it made fewer groups than batch ids
            assert "sent 1 copies among 2 groups" in caplog.text
        finally:
            job.terminate()
        greedy = FakeStudent()
        greedy.kwargs["temperature"] = 0.0
        job = GRPOJob.bound(FakeHost(default_model))(lm=greedy, train_kwargs={"groups_per_step": 1})
        job.initialize()
        job.terminate()
        assert "samples at temperature=0" in caplog.text


def test_versions_are_published_switched_and_retired(default_model, tmp_path):
    host = FakeHost(default_model)
    job = _job(host, output_dir=str(tmp_path), update_interval=1, groups_per_step=2, adapter_name="t")
    try:
        assert job.get_status()["pending_batch_ids"] == [0, 1] and job.lm.adapter is None
        job.step([{"batch_id": 0, "group": _group()}, {"batch_id": 1, "group": _group("si", "non")}],
                 TrainDataFormat.GRPO_CHAT)
        status = job.get_status()
        assert status["pending_batch_ids"] == [2, 3] and status["version"] == 1
        assert status["device"] == "cpu"  # FakeHost's replicas are CPU ones
        assert job.lm.adapter == "t-v1" and status["current_model"] == "base+t-v1" and list(host.loaded) == ["t-v1"]
        job.step([{"batch_id": 2, "group": _group()}], TrainDataFormat.GRPO_CHAT)
        assert job.lm.adapter == "t-v2" and list(host.loaded) == ["t-v2"] and host.retired == ["t-v1"]
        folder = job.save_checkpoint("ckpt-a")
        assert os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
        assert job.get_status()["checkpoints"] == {"ckpt-a": folder}
        with pytest.raises(ConfigurationError, match="GRPO_CHAT"):
            job.step([{"batch_id": 4, "group": _group()}], TrainDataFormat.CHAT)
    finally:
        job.terminate()
    assert job.trainer is None and job.get_status()["status"] == "terminated"
    assert job.lm.adapter == "t-v2"  # the last version keeps serving
    with pytest.raises(ConfigurationError, match="terminated"):
        job.step([{"batch_id": 4, "group": _group()}], TrainDataFormat.GRPO_CHAT)


def test_a_non_finite_step_fails_and_the_last_good_version_keeps_serving(default_model, tmp_path):
    # A learning rate this large makes the first update's weights enormous: the next loss is not finite.
    host = FakeHost(default_model)
    job = _job(host, output_dir=str(tmp_path), learning_rate=1e30, max_grad_norm=None)
    try:
        groups = [_group()]
        job.step([{"batch_id": 0, "group": groups[0]}], TrainDataFormat.GRPO_CHAT)  # finite loss, huge update
        assert job.lm.adapter == "grpo-v1"
        before = job.trainer.mean_completion_logp(groups)
        with pytest.raises(TrainingStepError, match="not finite|non-finite"):
            job.step([{"batch_id": 1, "group": groups[0]}], TrainDataFormat.GRPO_CHAT)
        assert job.lm.adapter == "grpo-v1" and list(host.loaded) == ["grpo-v1"] and job.get_status()["version"] == 1
        after = job.trainer.mean_completion_logp(groups)  # the trainer is back where it was
        assert [a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(after, before)] == [True] * len(before)
    finally:
        job.terminate()


def test_a_version_the_replicas_refuse_leaves_the_previous_one(default_model, tmp_path):
    host = FakeHost(default_model, refuse_loads=True)
    job = _job(host, output_dir=str(tmp_path))
    try:
        with pytest.raises(TrainingStepError, match="the base model keeps serving"):
            job.step([{"batch_id": 0, "group": _group()}], TrainDataFormat.GRPO_CHAT)
        assert job.lm.adapter is None and job.get_status()["version"] == 0
    finally:
        job.terminate()


def test_reinforce_refuses_an_lm_without_lora(default_model):
    host = FakeHost(default_model)
    host.max_lora_rank = None
    with pytest.raises(ConfigurationError, match="enable_lora=True"):
        GRPOJob.bound(host)(lm=FakeStudent(), train_kwargs={}).initialize()


def test_a_new_job_on_the_same_lm_frees_the_one_given_up_on(default_model, tmp_path):
    job_class = GRPOJob.bound(FakeHost(default_model))
    first = job_class(lm=FakeStudent(), train_kwargs={"output_dir": str(tmp_path)})
    first.initialize()
    second = job_class(lm=FakeStudent(), train_kwargs={"output_dir": str(tmp_path)})
    second.initialize()
    try:
        assert first.trainer is None and first.get_status()["status"] == "terminated"
        assert second.trainer is not None and second.get_status()["status"] == "running"
    finally:
        second.terminate()


def test_update_interval_publishes_every_nth_step(default_model, tmp_path):
    host = FakeHost(default_model)
    job = _job(host, output_dir=str(tmp_path), update_interval=2)
    try:
        job.step([{"batch_id": 0, "group": _group()}], TrainDataFormat.GRPO_CHAT)
        assert job.lm.adapter is None and not host.loaded and job.get_status()["pending_batch_ids"] == [1]
        job.step([{"batch_id": 1, "group": _group()}], TrainDataFormat.GRPO_CHAT)  # old policy: the served base
        assert job.lm.adapter == "grpo-v1" and list(host.loaded) == ["grpo-v1"]
    finally:
        job.terminate()


# ------------------------------------------- memory: logits kept, passes split on OOM

def _mixed_group():
    # Prompts and completions of different lengths: the padding and the kept logits differ per row.
    short, long_ = QUESTION, [{"role": "user", "content": "Answer with one word, and think first: is the sky, "
                                                           "seen at noon on a clear day, blue?"}]
    return [{"messages": m, "completion": {"role": "assistant", "content": c}, "reward": r}
            for m, c, r in ((short, "yes", 1.0), (long_, "no, it is not blue at all", 0.0),
                            (long_, "yes", 1.0), (short, "no, never", 0.0))]


def _trainer(model, **kwargs):
    from vllm_dspy_adapter.lora.grpo_trainer import GRPOTrainer

    return GRPOTrainer(model, GRPOConfig.from_kwargs({"learning_rate": 2e-4, "device": "cpu", **kwargs}))


def _adapter(trainer):
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


def test_completion_log_probs_equal_the_full_log_softmax_over_every_position(default_model):
    # The trainer makes logits only from the shortest prompt on; the answer must be the textbook one.
    from vllm_dspy_adapter.lora.grpo import tokenize_completion

    trainer = _trainer(default_model, batch_size=4)
    try:
        group = _mixed_group()
        got = trainer.mean_completion_logp([group])
        want = []
        with torch.no_grad():
            for item in group:
                ids, n = tokenize_completion(trainer.tokenizer, item, {}, 2048)
                logits = trainer.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
                want.append(float(logp[n - 1:].mean()))
        assert got == pytest.approx(want, abs=1e-4), (got, want)
    finally:
        trainer.close()


def _out_of_memory_above(trainer, rows):
    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (a test: more than {rows} rows)")
    return trainer.model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_out_of_memory_retries_the_step_with_fewer_completions_per_pass_and_the_same_update(
        default_model, loss_type, caplog):
    plain, squeezed = _trainer(default_model, batch_size=4, loss_type=loss_type), \
        _trainer(default_model, batch_size=4, loss_type=loss_type)
    try:
        _out_of_memory_above(squeezed, 1)
        group = _mixed_group()
        with caplog.at_level("WARNING", logger="vllm_dspy_adapter.lora.grpo_trainer"):
            got = squeezed.step([group])
        assert got.per_pass == 1 and squeezed.per_pass == 1
        warned = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
        assert len(warned) == 2 and "with 2 completions" in warned[0] and "with 1 completions" in warned[1], warned
        want = plain.step([group])
        assert want.per_pass == 4
        assert got.loss == pytest.approx(want.loss, abs=1e-5) and got.tokens == want.tokens
        a, b = _adapter(squeezed), _adapter(plain)
        # Adam's first update is lr * g / (|g| + eps): where g is near zero, float rounding of the
        # differently padded passes can move it; everywhere else the two updates are equal.
        moved = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a)
        assert moved < sum(v.numel() for v in a.values()) / 10_000, moved
        assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # the update happened
        squeezed.step([group])  # the next step starts at one per pass: no more retries
        assert len([r for r in caplog.records if "ran out of memory" in r.getMessage()]) == 2
    finally:
        plain.close()
        squeezed.close()


def test_out_of_memory_at_one_completion_per_pass_fails_the_step_and_restores_the_adapter(default_model):
    trainer = _trainer(default_model, batch_size=2)
    try:
        group = _mixed_group()
        trainer.step([group])
        before = _adapter(trainer)
        handle = _out_of_memory_above(trainer, 0)
        with pytest.raises(TrainingStepError, match="even one completion per forward pass.*gradient_checkpointing"):
            trainer.step([group])
        after = _adapter(trainer)
        assert all(torch.equal(before[k], after[k]) for k in before) and trainer.steps == 1
        handle.remove()
        assert trainer.step([group]).per_pass == 1  # it kept the finest split, and trains again
    finally:
        trainer.close()
