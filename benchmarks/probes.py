"""What a measured run's processes and GPU did while it ran (W5: where one engine's time goes).

- ``GpuBusy``: samples ``nvidia-smi``'s utilization.gpu (the share of time a kernel was
  running) every 200 ms; its mean says whether the GPU or the CPU side is the limit.
- ``Profile``: ``py-spy record`` (if installed) on this process and every child process
  (the adapter's replica workers, vLLM's engine-core processes) for ``--profile-s``
  seconds; raw collapsed stacks go to ``OUT/profiles/``, and ``python -m
  benchmarks.probes FILE...`` prints where each process spent its samples.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import threading
from typing import Any


class GpuBusy:
    def __init__(self, on_gpu: bool, interval_ms: int = 200):
        self.on_gpu = on_gpu and shutil.which("nvidia-smi") is not None
        self.interval_ms = interval_ms
        self.samples: list[float] = []
        self.mean: float | None = None

    def __enter__(self) -> GpuBusy:
        if self.on_gpu:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          f"-lms={self.interval_ms}"], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc: Any) -> None:
        if not self.on_gpu:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.reader.join(timeout=5)
        if self.samples:
            self.mean = round(sum(self.samples) / len(self.samples), 1)


class Profile:
    """py-spy on this process and its children for ``settings.profile_s`` seconds."""

    def __init__(self, settings, name: str, enabled: bool | None):
        self.seconds = settings.profile_s if enabled else 0
        self.folder = os.path.join(settings.out, "profiles")
        self.name = "".join(c if c.isalnum() or c in "-." else "_" for c in name)
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Profile:
        spy = shutil.which("py-spy")
        if not self.seconds:
            return self
        if spy is None:
            print("profile skipped: py-spy is not installed", flush=True)
            return self
        import psutil

        os.makedirs(self.folder, exist_ok=True)
        me = psutil.Process()
        targets = [me] + [c for c in me.children(recursive=True) if c.is_running()]
        for p in targets:
            try:
                label = "driver" if p.pid == me.pid else _role(p)
            except psutil.Error:
                continue
            out = os.path.join(self.folder, f"{self.name}-{label}-{p.pid}.txt")
            self.procs.append(subprocess.Popen(
                [spy, "record", "--pid", str(p.pid), "--duration", str(int(self.seconds)), "--rate", "100",
                 "--format", "raw", "--nonblocking", "--output", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        print(f"profiling {len(self.procs)} processes for {self.seconds:.0f} s", flush=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _role(p) -> str:
    text = " ".join(p.cmdline())[:300] + " " + p.name()
    for key, role in (("EngineCore", "enginecore"), ("worker", "worker"), ("resource_tracker", "tracker")):
        if key in text:
            return role
    return p.name().replace(" ", "_")[:20] or "child"


def summarize(path: str, top: int = 25) -> str:
    """Where one process's samples went: self time by function and inclusive time by
    function, from py-spy's raw (collapsed) output."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [f.split(" (")[0] for f in stack.split(";")]
            if frames:
                own[frames[-1]] += n
            for f in set(frames):
                incl[f] += n
    lines = [f"{path}: {total} samples"]
    for title, counter in (("self", own), ("inclusive", incl)):
        lines.append(f"  {title}:")
        lines += [f"    {100 * c / max(total, 1):5.1f}%  {f}" for f, c in counter.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(summarize(path))
