"""The LoRA training provider (finetune.py, lora_train.py), without an engine.

The provider talks to its LM through the small LoRAHost interface; here a fake
host records what would be loaded, while DSPy's real ``LM.finetune`` drives the
real provider and PEFT trains a real adapter on the default model (a few CPU
steps). Serving the adapter with vLLM is tested in test_lora.py.
"""

from __future__ import annotations

import json
import os
import time

import pytest

dspy = pytest.importorskip("dspy")
pytest.importorskip("peft")

from vllm_dspy_adapter.errors import ConfigurationError  # noqa: E402
from vllm_dspy_adapter.lora.provider import LoRAProvider, LoRATrainingJob  # noqa: E402
from vllm_dspy_adapter.lora.training import LoRATrainConfig, tokenize_chat_examples  # noqa: E402


class QA(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


SECRET = "The secret word is PAPAYA."


def chat_data(n=4):
    """Chat data exactly as BootstrapFinetune builds it (ChatAdapter.format_finetune_data)."""
    adapter = dspy.ChatAdapter()
    questions = ["What is the secret word?", "Tell me the secret word.", "Which word is secret?",
                 "Say the secret word."]
    return [adapter.format_finetune_data(QA, [], {"question": q}, {"answer": SECRET}) for q in questions[:n]]


class FakeHost:
    def __init__(self, path, max_lora_rank=8):
        self.base_model_path = path
        self.chat_template_kwargs = {}
        self.max_lora_rank = max_lora_rank
        self.loaded = []

    def load_adapter(self, name, path):
        self.loaded.append((name, path))

    def adapter_model(self, name):
        return f"vllm/base+{name}"


def test_chat_examples_are_rendered_as_served_and_only_the_answer_is_learned(default_model):
    from transformers import AutoTokenizer

    from vllm_dspy_adapter.chat_template import render_chat

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    data = chat_data(2)
    examples = tokenize_chat_examples(tokenizer, data, max_seq_length=2048)
    assert len(examples) == 2
    ids, labels = examples[0]
    prompt = render_chat(tokenizer, data[0]["messages"][:-1])
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert ids[:n_prompt] == tokenizer.encode(prompt, add_special_tokens=False)  # the served prompt, token for token
    assert labels[:n_prompt] == [-100] * n_prompt
    learned = tokenizer.decode([t for t in labels if t != -100])
    assert SECRET in learned and learned.rstrip().endswith("<|im_end|>")  # the answer and the end of the turn
    # A prompt longer than max_seq_length is skipped; none left is an error naming the option.
    with pytest.raises(ConfigurationError, match="max_seq_length"):
        tokenize_chat_examples(tokenizer, data, max_seq_length=8)


@pytest.mark.parametrize("item, message", [
    ({"prompt": "x"}, "not chat data"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
])
def test_bad_chat_data_is_refused_by_index(item, message, default_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    with pytest.raises(ConfigurationError, match=message) as info:
        tokenize_chat_examples(tokenizer, [chat_data(1)[0], item], max_seq_length=2048)
    assert "train_data[1]" in str(info.value)


def test_train_options_are_checked_by_name():
    with pytest.raises(ConfigurationError, match="Did you mean 'learning_rate'"):
        LoRATrainConfig.from_kwargs({"learning_rat": 1e-3})
    with pytest.raises(ConfigurationError, match="rank must be a positive"):
        LoRATrainConfig.from_kwargs({"rank": 0})
    with pytest.raises(ConfigurationError, match="target_modules"):
        LoRATrainConfig.from_kwargs({"target_modules": "q_proj"})
    assert LoRATrainConfig.from_kwargs({"rank": 4, "max_steps": 3}).rank == 4


@pytest.mark.parametrize("host_rank, kwargs, fmt, message", [
    (8, {"rank": 16}, "chat", "exceeds this LM's max_lora_rank=8"),
    (None, {}, "chat", "enable_lora=True"),
    (8, {}, "completion", "chat data"),
    (8, {"epochs": 2}, "chat", "Unknown LoRA training option 'epochs'"),
])
def test_provider_refuses_before_training(monkeypatch, tmp_path, host_rank, kwargs, fmt, message):
    import vllm_dspy_adapter.lora.provider as finetune

    def must_not_train(*args, **kw):
        raise AssertionError("training started despite a bad request")

    monkeypatch.setattr(finetune, "train_lora", must_not_train)
    host = FakeHost(str(tmp_path), max_lora_rank=host_rank)
    provider = LoRAProvider(host)
    job = LoRATrainingJob(model="vllm/base", train_data=chat_data(1), train_data_format=fmt, train_kwargs=kwargs)
    with pytest.raises(ConfigurationError, match=message):
        provider.finetune(job, "vllm/base", chat_data(1), fmt, kwargs)
    assert host.loaded == []


def test_a_cancelled_job_stops_between_steps_and_says_so(monkeypatch, tmp_path):
    import threading

    import vllm_dspy_adapter.lora.provider as finetune
    from dspy.clients.utils_finetune import TrainDataFormat

    started = threading.Event()

    def slow_train(base, data, path, config, *, chat_template_kwargs, should_stop, on_step):
        for step in range(1, 1000):
            if should_stop():
                raise InterruptedError(f"LoRA training cancelled after {step - 1} of 999 steps")
            on_step(step, 999, 1.0)
            started.set()
            time.sleep(0.01)
        raise AssertionError("never cancelled")

    monkeypatch.setattr(finetune, "train_lora", slow_train)
    host = FakeHost(str(tmp_path))
    job = dspy.LM("openai/stand-in", provider=LoRAProvider(host)).finetune(chat_data(1), TrainDataFormat.CHAT,
                                                                          {"adapter_name": "x"})
    assert started.wait(10) and job.status().value == "running"
    assert job.cancel() is True
    result = job.result(timeout=10)
    assert isinstance(result, InterruptedError) and "cancelled after" in str(result)
    assert job.status().value == "cancelled" and 0 < job.progress[0] < 999
    assert host.loaded == []  # nothing served


@pytest.mark.engine  # no vLLM engine, but a real model trained on the CPU: with the slow tests
def test_dspy_lm_finetune_trains_a_real_adapter_and_returns_the_serving_lm(tmp_path, default_model, monkeypatch):
    """DSPy's own LM.finetune thread -> our provider -> PEFT on the default model (CPU, a few steps)."""
    monkeypatch.setenv("DSPY_FINETUNEDIR", str(tmp_path / "ft"))
    host = FakeHost(default_model)
    lm = dspy.LM("openai/stand-in", provider=LoRAProvider(host))
    started = time.monotonic()
    from dspy.clients.utils_finetune import TrainDataFormat

    # Two examples, three steps: the loss falls from ~1.9 to ~0.1. Seconds a step on idle cores, but
    # 80 s a step was seen on two cores shared with three vLLM test runs.
    job = lm.finetune(chat_data(2), TrainDataFormat.CHAT,
                      {"max_steps": 3, "learning_rate": 5e-3, "batch_size": 2, "adapter_name": "secret"})
    assert isinstance(job, LoRATrainingJob)
    served = job.result(timeout=900)
    elapsed = time.monotonic() - started
    assert not isinstance(served, BaseException), served
    assert served.model == "vllm/base+secret"  # DSPy's lm.copy(model=<what the provider returned>)
    assert job.status().value == "succeeded" and job.progress[:2] == (3, 3)
    ((name, path),) = host.loaded
    assert name == "secret" and path == os.path.join(str(tmp_path / "ft"), "lora", "secret")
    config = json.loads(open(os.path.join(path, "adapter_config.json")).read())
    assert config["r"] == 8 and "q_proj" in config["target_modules"]
    assert os.path.getsize(os.path.join(path, "adapter_model.safetensors")) > 100_000
    losses = json.loads(open(os.path.join(path, "training.json")).read())["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0] / 2, losses  # it learned something
    print(f"3 LoRA steps on the default model in {elapsed:.1f} s")
