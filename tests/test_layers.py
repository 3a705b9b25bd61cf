"""The layer rule of docs/ARCHITECTURE.md, read off the import graph (pure, no engine).

Every import of the package counts, inside functions too. Arrows point down only:
lm -> serving -> backends -> engine, with lora beside (imported by lm and serving) and
the shared modules at the bottom; the command-line modules sit on top.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vllm_dspy_adapter"

SHARED = {"config", "errors", "protocol", "vllm_api", "chat_template", "models", "logs"}
TOP = {"__init__", "__main__", "cli", "doctor", "vllm_check"}
# What each layer may import (besides itself).
ALLOWED = {
    "lm": {"serving", "backends", "lora", *SHARED},
    "serving": {"backends", "lora", *SHARED},
    "backends": {"engine", *SHARED},
    "engine": {"config", "errors", "protocol", "vllm_api"},
    "lora": {"errors", "chat_template", "config"},
    "shared": set(SHARED),
}


def _unit(module: str) -> str:
    """'lm.offline' -> 'lm'; 'config' -> 'config' (a shared or top module)."""
    return module.split(".")[0]


def _layer(module: str) -> str:
    unit = _unit(module)
    if unit in SHARED:
        return "shared"
    return unit


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(text: str, module: str, is_package: bool) -> set[str]:
    """Modules of the package a file imports (resolved, relative to the package)."""
    here = module.split(".")
    package = here if is_package else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
                if node.module:
                    found.add(".".join(target))
                else:
                    found.update(".".join([*target, alias.name]) for alias in node.names)
            elif node.module and node.module.startswith("vllm_dspy_adapter"):
                rest = node.module.split(".")[1:]
                found.update([".".join(rest)] if rest else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".", 1)[1] for alias in node.names
                         if alias.name.startswith("vllm_dspy_adapter."))
    return {m for m in found if m}


def _violations(module: str, imports: set[str]) -> list[str]:
    layer = _layer(module)
    if layer == "shared":  # a shared module imports only other shared modules
        return sorted(m for m in imports if _unit(m) not in SHARED)
    allowed = ALLOWED[layer] | {_unit(module)}
    return sorted(m for m in imports if _unit(m) not in allowed)


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down_only(path):
    name = _module_name(path)
    if _unit(name) in TOP:
        return  # the command line and the public API may import anything
    bad = _violations(name, _imports(path.read_text(), name, path.name == "__init__.py"))
    assert not bad, f"{name} ({_layer(name)} layer) imports {bad}; see the layer rule in docs/ARCHITECTURE.md"


def test_every_folder_says_its_job_and_what_it_may_import():
    for folder in ("lm", "serving", "backends", "engine", "lora"):
        doc = ast.get_docstring(ast.parse((SRC / folder / "__init__.py").read_text())) or ""
        assert "May import" in doc, folder


@pytest.mark.parametrize("module, text", [
    ("engine.engine", "def f():\n    from ..lm.render import split_reasoning\n"),  # inside a function too
    ("backends.process", "from ..serving.pool import ReplicaPool\n"),
    ("lora.training", "from vllm_dspy_adapter.lm import render\n"),
    ("config", "from .engine import engine\n"),
])
def test_a_planted_upward_import_is_caught(module, text):
    assert _violations(module, _imports(text, module, False))
