"""LoRA adapters as plain data: what an adapter is, the checks made before any
engine sees it, and the driver's registry of loaded adapters. No vLLM here.

Why every check happens here, before a request: vLLM's CPU build (0.32) refuses
an adapter whose rank exceeds ``max_lora_rank`` cleanly in ``add_lora``, but a
*request* carrying that adapter kills the engine core (``EngineDeadError``). So
an adapter reaches requests only after it was read from disk, checked against
the LM's limits and added to every replica; a request naming any other adapter
is refused by the pool at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import threading
from dataclasses import dataclass

from ..errors import ConfigurationError

__all__ = ["AdapterSpec", "check_adapter_name", "read_adapter", "AdapterRegistry", "LORA_ENGINE_ARGS"]

# vLLM engine arguments about LoRA: they set capacity, not what the base model answers.
LORA_ENGINE_ARGS = frozenset({"enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "fully_sharded_loras",
                              "lora_dtype"})

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter as every replica loads it (crosses processes)."""

    name: str
    path: str
    lora_id: int  # vLLM's int id, unique per LM for the life of the LM
    rank: int
    digest: str  # of the weights file: a retrained adapter gets a new cache label

    def label(self, base_label: str) -> str:
        """The model string DSPy caches the adapter's answers under."""
        return f"{base_label}+lora:{self.name}@{self.digest[:10]}"


def check_adapter_name(name: str) -> str:
    """``ConfigurationError`` unless ``name`` is a valid adapter name."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(f"Adapter name {name!r} is not valid: use letters, digits, '.', '_' or '-' "
                                 "(at most 100 characters, starting with a letter or digit).")
    return name


def read_adapter(name: str, path: str, *, max_lora_rank: int | None, lora_id: int = 1) -> AdapterSpec:
    """Check a PEFT adapter folder against the LM's limits; raise ``ConfigurationError``
    naming the problem and the fix."""
    if max_lora_rank is None:
        raise ConfigurationError("This LM was built without LoRA support: construct it with enable_lora=True "
                                 "(and max_lora_rank >= your adapters' rank, max_loras = adapters served at once).")
    check_adapter_name(name)
    path = os.path.abspath(os.path.expanduser(str(path)))
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise ConfigurationError(f"Adapter {name!r}: no folder {path}. Pass the folder PEFT's save_pretrained "
                                 "wrote (it holds adapter_config.json and adapter_model.safetensors).")
    if not os.path.isfile(config_file):
        raise ConfigurationError(f"Adapter {name!r}: {path} has no adapter_config.json, so it is not a PEFT "
                                 "adapter folder (save it with model.save_pretrained(folder)).")
    try:
        with open(config_file, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"Adapter {name!r}: cannot read {config_file}: {exc}") from exc
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigurationError(f"Adapter {name!r} is a {config.get('peft_type')} adapter; vLLM serves LoRA only.")
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigurationError(f"Adapter {name!r}: adapter_config.json has no valid rank 'r' ({rank!r}).")
    if rank > max_lora_rank:
        raise ConfigurationError(f"Adapter {name!r} has rank {rank}, above this LM's max_lora_rank={max_lora_rank}: "
                                 f"build the LM with max_lora_rank={rank} (vLLM accepts 8, 16, 32, 64, ...) or "
                                 "train the adapter with a smaller rank.")
    weights = next((os.path.join(path, w) for w in _WEIGHTS if os.path.isfile(os.path.join(path, w))), None)
    if weights is None:
        raise ConfigurationError(f"Adapter {name!r}: {path} has no adapter_model.safetensors (or .bin).")
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return AdapterSpec(name=name, path=path, lora_id=lora_id, rank=rank, digest=digest.hexdigest())


class AdapterRegistry:
    """The adapters an LM serves, by name; thread-safe. Ids are never reused, so
    an adapter loaded again under the same name is a new adapter to vLLM."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._adapters: dict[str, AdapterSpec] = {}

    def next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def put(self, spec: AdapterSpec) -> AdapterSpec | None:
        """Register ``spec``; returns the adapter it replaces, if any."""
        with self._lock:
            old = self._adapters.get(spec.name)
            self._adapters[spec.name] = spec
            return old

    def pop(self, name: str) -> AdapterSpec | None:
        with self._lock:
            return self._adapters.pop(name, None)

    def get(self, name: str) -> AdapterSpec:
        with self._lock:
            spec = self._adapters.get(name)
            known = sorted(self._adapters)
        if spec is None:
            raise ConfigurationError(f"No adapter named {name!r} is loaded (loaded: {known or 'none'}); "
                                     "load it first with lm.load_adapter(name, path).")
        return spec

    def all(self) -> list[AdapterSpec]:
        with self._lock:
            return list(self._adapters.values())

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._adapters
