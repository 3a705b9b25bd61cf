"""The report as text: :func:`render_table` for people, :func:`render_json` for tools."""

from __future__ import annotations

import dataclasses
import json

from .facts import Facts
from .rules import Report

__all__ = ["render_table", "render_json"]


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
