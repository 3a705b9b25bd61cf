"""A tiny Llama-shaped model folder for the CPU smoke run (dummy weights).

It borrows the default model's tokenizer and chat template (so DSPy prompts are
rendered for real) but has 2 small layers with 4 attention heads, so engines
start fast on 2 cores and tensor parallelism over 2 ranks works (SmolLM2's 9
heads cannot be split in two).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json")
_VERSION = 1


def tiny_model_path() -> str:
    from vllm_dspy_adapter.models import default_cache_dir, resolve_model

    target = os.path.join(default_cache_dir(), f"bench-tiny-llama-v{_VERSION}")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    source = resolve_model(None)
    with open(os.path.join(source, "config.json")) as fh:
        config = json.load(fh)
    config.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, dtype="bfloat16")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".bench-tiny-", dir=os.path.dirname(target))
    for name in _TOKENIZER_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), tmp)
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, target)  # atomic: a concurrent builder's folder wins, ours is dropped
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
