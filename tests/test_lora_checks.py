"""Adapter checks and registry (lora.py): pure, no engine, no PEFT."""

import json

import pytest

from vllm_dspy_adapter.errors import ConfigurationError
from vllm_dspy_adapter.lora.registry import AdapterRegistry, read_adapter


def adapter_folder(path, r=8, weights=b"w" * 64, peft_type="LORA"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": peft_type, "lora_alpha": 16}))
    if weights is not None:
        (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_a_good_adapter_is_read_with_rank_and_digest(tmp_path):
    spec = read_adapter("tone", str(adapter_folder(tmp_path / "a")), max_lora_rank=16, lora_id=3)
    assert (spec.name, spec.rank, spec.lora_id) == ("tone", 8, 3)
    assert spec.label("vllm/base@1").startswith("vllm/base@1+lora:tone@")
    other = read_adapter("tone", str(adapter_folder(tmp_path / "b", weights=b"v" * 64)), max_lora_rank=16)
    assert other.digest != spec.digest  # retrained weights: a new cache label
    assert other.label("x") != spec.label("x")


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda p: p / "missing", {}, "no folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", {}, "no adapter_config.json"),
    (lambda p: adapter_folder(p / "big", r=64), {}, "rank 64, above this LM's max_lora_rank=16"),
    (lambda p: adapter_folder(p / "nw", weights=None), {}, "no adapter_model.safetensors"),
    (lambda p: adapter_folder(p / "ia3", peft_type="IA3"), {}, "vLLM serves LoRA only"),
    (lambda p: adapter_folder(p / "ok"), {"max_lora_rank": None}, "enable_lora=True"),
    (lambda p: adapter_folder(p / "ok2"), {"name": "bad name/.."}, "is not valid"),
])
def test_bad_adapters_are_refused_with_the_fix(tmp_path, make, kwargs, message):
    path = make(tmp_path)
    args = {"name": "a", "max_lora_rank": 16, **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        read_adapter(args["name"], str(path), max_lora_rank=args["max_lora_rank"])


def test_registry_names_what_is_loaded_when_asked_for_an_unknown_adapter(tmp_path):
    registry = AdapterRegistry()
    spec = read_adapter("a", str(adapter_folder(tmp_path / "a")), max_lora_rank=8, lora_id=registry.next_id())
    assert registry.put(spec) is None
    assert "a" in registry and registry.get("a") is spec
    with pytest.raises(ConfigurationError, match=r"No adapter named 'b' is loaded \(loaded: \['a'\]\)"):
        registry.get("b")
    again = read_adapter("a", str(adapter_folder(tmp_path / "a2", weights=b"z" * 8)), max_lora_rank=8,
                         lora_id=registry.next_id())
    assert again.lora_id != spec.lora_id  # ids are never reused
    assert registry.put(again) is spec
    assert registry.pop("a") is again and registry.all() == []


# ------------------------------------------------ max_loras chosen when the user sets none


def test_enable_lora_without_max_loras_gets_sixteen_slots_and_says_why():
    from vllm_dspy_adapter.config import LORA_SLOTS, lora_defaults

    kwargs, message = lora_defaults({"enable_lora": True})
    assert kwargs["max_loras"] == LORA_SLOTS == 16
    assert "max_loras=16" in message and "2.2x" in message and "Pass max_loras" in message


def test_a_users_max_loras_or_no_lora_is_left_alone_and_max_cpu_loras_caps_the_default():
    from vllm_dspy_adapter.config import lora_defaults

    assert lora_defaults({"enable_lora": True, "max_loras": 2}) == ({"enable_lora": True, "max_loras": 2}, None)
    assert lora_defaults({"max_model_len": 512}) == ({"max_model_len": 512}, None)
    assert lora_defaults({"enable_lora": True, "max_cpu_loras": 6})[0]["max_loras"] == 6


def test_more_adapters_than_slots_warns_with_the_measured_cost_and_the_fix():
    from vllm_dspy_adapter.config import lora_slots_warning

    assert lora_slots_warning(4, 4) is None
    warning = lora_slots_warning(16, 4)
    assert "16 LoRA adapters" in warning and "max_loras=4" in warning and "max_loras=16" in warning
    assert "7.07 req/s" in warning
