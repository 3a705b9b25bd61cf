"""Where a GRPO run starts: from the adapter the student serves when ``lm.reinforce`` is
called, or from the base model (a fresh LoRA) when it serves none.

A run continues what the student serves: the trainer loads that adapter's weights (its
folder, ``lm.adapters()``), and takes its shape (rank, alpha, target modules) unless
``train_kwargs`` names another one, which is refused (a LoRA of another shape cannot
start from those weights). A student serving ``<adapter_name>-vN`` (an earlier run of
the same name) continues the numbering: the next version is ``-v(N+1)``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from .grpo import GRPOConfig
from .grpo_kwargs import translate

__all__ = ["Start", "choose_start"]


@dataclass(frozen=True)
class Start:
    """The adapter a run starts from: its name, folder, and the version number it counts
    as (N for ``<adapter_name>-vN``, else 0: a version line of its own)."""

    adapter: str
    path: str
    version: int = 0


def choose_start(lm: Any, config: GRPOConfig, train_kwargs: dict[str, Any] | None) -> Start | None:
    """The adapter the student ``lm`` serves (None: the base model, a fresh LoRA). Sets
    ``config``'s LoRA shape to that adapter's; ``ConfigurationError`` if ``train_kwargs``
    asks for another one, naming both and the fixes."""
    name = getattr(lm, "adapter", None)
    if name is None:
        return None
    entry = next((a for a in lm.adapters() if a["name"] == name), None)
    if entry is None:
        raise ConfigurationError(f"GRPO: the student LM serves adapter {name!r}, which is not loaded: load it "
                                 "(lm.load_adapter) or move the student to the base model (lm.switch_adapter(None)).")
    path = entry["path"]
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"GRPO: cannot read the config of adapter {name!r}, which the student serves and "
                                 f"the run would continue from ({path}): {exc}") from exc
    modules = saved.get("target_modules")
    shape = {"rank": int(saved.get("r") or entry["rank"]), "alpha": saved.get("lora_alpha", config.alpha),
             "target_modules": sorted(modules) if isinstance(modules, (list, tuple, set)) else None}
    given, _ = translate(train_kwargs)
    for key, value in shape.items():
        if value is None:
            continue
        asked = sorted(given[key]) if key == "target_modules" and key in given else given.get(key)
        if key in given and asked != value:
            raise ConfigurationError(
                f"GRPO: the student LM serves adapter {name!r} ({key} {value!r}) and the run continues from its "
                f"weights, but train_kwargs asks for {key} {asked!r}. Drop {key!r} from train_kwargs (the run takes "
                f"the adapter's), pass {key}={value!r}, or start a fresh LoRA from the base model: "
                "lm.switch_adapter(None) before lm.reinforce(...).")
        setattr(config, key, tuple(value) if key == "target_modules" else value)
    match = re.fullmatch(re.escape(config.adapter_name) + r"-v(\d+)", name)
    return Start(name, path, int(match.group(1)) if match else 0)
