"""The processes one vLLM engine launched (its engine core and, under tensor
parallelism, that core's workers): found, measured and killed.

An ``Engine`` takes a snapshot of this process's children before it starts vLLM;
whatever child appears during the start is the engine's. Kept apart from the
``Engine`` so that the rule "which processes are this engine's" exists once: the
watchdog, the CPU pulse, ``kill`` and the clean-up of a failed start all use it.
"""

from __future__ import annotations

import logging

__all__ = ["EngineProcesses"]

logger = logging.getLogger(__name__)


class EngineProcesses:
    """Call ``EngineProcesses()`` before vLLM starts, ``settle()`` once it has."""

    def __init__(self) -> None:
        import psutil

        self._before = {p.pid for p in psutil.Process().children()}
        self.roots: list = []  # psutil.Process objects of the engine cores, set by settle()

    def launched(self) -> list:
        """The children started since this object was made, less Python's
        multiprocessing helpers."""
        import psutil

        return [p for p in psutil.Process().children() if p.pid not in self._before and _is_engine_process(p)]

    def settle(self) -> list:
        """The start finished: remember its processes (the watchdog waits on them)."""
        self.roots = self.launched()
        return self.roots

    def tree(self) -> list:
        """The engine's processes and their children (tensor-parallel workers)."""
        import psutil

        procs = []
        for process in self.roots:
            try:
                procs += [process] + process.children(recursive=True)
            except psutil.Error:  # already gone
                pass
        return procs

    def cpu_seconds(self) -> float:
        """CPU time of the engine's processes; -1 while any of them is stopped."""
        import psutil

        total = 0.0
        for proc in self.tree():
            try:
                if proc.status() == psutil.STATUS_STOPPED:
                    return -1.0  # a stopped process makes no progress, whatever the others do
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:  # gone: the watchdog reports it
                pass
        return total

    def kill(self) -> None:
        """Kill the engine's processes at once, in any state (a stopped one too)."""
        _kill(self.tree())

    def kill_launched(self, name: str) -> None:
        """Kill what a failed or abandoned start launched, with its children."""
        import psutil

        procs = []
        for child in self.launched():
            try:
                procs += child.children(recursive=True)  # tensor-parallel workers
            except psutil.Error:
                pass
            procs.append(child)
        if procs:
            logger.warning("%s: stopped %d engine process(es) of a failed start", name, len(procs))
        _kill(procs)


def _kill(procs: list) -> None:
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    if procs:
        psutil.wait_procs(procs, timeout=10)


def _is_engine_process(process) -> bool:
    """Children started with the engine, less Python's multiprocessing helpers."""
    try:
        return "resource_tracker" not in " ".join(process.cmdline())
    except Exception:
        return False
