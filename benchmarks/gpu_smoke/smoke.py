"""The smoke's lines, as methods over shared state (the LMs they use, shutdown records): the
helpers, the shutdowns and ``shutdown.clean`` here, the lines of each layout in its own file."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

from .lora_lines import LoraLines
from .machine import _gpu_apps, _gpu_memory_used_mib, _torch_held
from .offline_lines import OfflineLines
from .plan import Plan
from .runner import Line, _children, _error_text, check
from .serving_lines import ServingLines


class Smoke(OfflineLines, LoraLines, ServingLines):
    """The lines, as methods over shared state (the LMs they use, shutdown records)."""

    ADAPTER = "smoke"

    def __init__(self, plan: Plan):
        self.plan = plan
        self.lms: dict[str, Any] = {}
        self.start_errors: dict[str, str] = {}
        self.shutdowns: dict[str, dict[str, Any]] = {}
        self.rng = random.Random(0)
        self.salt = f"{time.time_ns() % 10**8:08d}"
        self.tuned = None
        self.asked: dict[str, Any] = {}
        self.layouts_run: list[str] = []
        self.gpu_baseline_mib = None if plan.cpu else _gpu_memory_used_mib()
        self.cache_router = None  # the rpg2 layout's routing policy (routing.cache_events)

    # ------------------------------------------------------------ helpers

    def _lm(self, key: str):
        lm = self.lms.get(key)
        if lm is None:
            raise RuntimeError(f"no {key} LM: {self.start_errors.get(key, 'it was not started')}")
        return lm

    def _start(self, key: str, factory: Callable[[], Any]):
        started = time.monotonic()
        self.start_errors[key] = "its start has not finished"
        try:
            self.lms[key] = factory()
        except BaseException as exc:
            self.start_errors[key] = f"its start failed: {_error_text(exc)}"
            raise
        del self.start_errors[key]
        return time.monotonic() - started

    def _token_prompts(self, n: int, length: int) -> list[dict]:
        hi = max(200, min(self.plan.vocab_size - 100, 100_000))
        return [{"prompt_token_ids": [self.rng.randrange(100, hi) for _ in range(length)]} for _ in range(n)]

    def _prompt(self, text: str) -> str:
        """A fresh user message: ``lm(prompt)`` sends it as the one user message (DSPy 3.4
        deprecates ``lm(messages=[...])``, 3.5 removes it)."""
        return f"{text} ({self.salt}-{self.rng.randrange(10**6)})"

    # ------------------------------------------------------------ shutdowns

    def shutdown_step(self, key: str) -> Callable[[], str]:
        def fn() -> str:
            record = self.shutdowns.setdefault(key, {"state": "started"})
            lm = self.lms.pop(key, None)
            if lm is None:
                note = self.start_errors.get(key, "not started")
                if note == "its start has not finished":  # a hung start: its engine may still come up
                    record.update(state="error", error="its start never finished (the line hung)")
                    raise RuntimeError(record["error"])
                record.update(state="skipped", note=note)
                return "not started"
            t0 = time.monotonic()
            try:
                lm.shutdown()
            except BaseException as exc:
                record.update(state="error", error=_error_text(exc))
                raise
            record["seconds"] = round(time.monotonic() - t0, 1)
            record.update(self._leftovers())
            record["state"] = "done"
            return json.dumps(record)

        return fn

    def _leftovers(self, wait_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        while True:
            children = _children()
            gpu = None if self.plan.cpu else self._gpu_leftovers()
            if (not children and not (gpu and gpu["problem"])) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        out: dict[str, Any] = {"children": [f"{c.pid}:{' '.join(c.cmdline())[:80]}" for c in children]}
        if gpu is not None:
            out["gpu"] = gpu
        return out

    def _gpu_leftovers(self) -> dict[str, Any]:
        apps = _gpu_apps()
        used = _gpu_memory_used_mib()
        me = os.getpid()
        others = [(pid, mem) for pid, mem in apps or [] if pid != me]
        mine = [mem for pid, mem in apps or [] if pid == me]
        problem = []
        if others:
            problem.append(f"compute apps left: {others}")
        if mine and mine[0] > 1024:
            problem.append(f"this process holds {mine[0]} MiB of GPU memory{_torch_held()}")
        if used is not None and self.gpu_baseline_mib is not None and used > self.gpu_baseline_mib + 1024:
            problem.append(f"GPU memory used {used} MiB, {self.gpu_baseline_mib} MiB before the first start")
        return {"apps": apps, "used_mib": used, "problem": "; ".join(problem)}

    def shutdown_clean(self) -> str:
        problems, parts = [], []
        for key in self.layouts_run:
            record = self.shutdowns.get(key)
            if record is None or record["state"] == "started":
                problems.append(f"{key}: shutdown {'never ran' if record is None else 'did not finish'}")
                continue
            if record["state"] == "skipped":
                parts.append(f"{key}: not started")
                continue
            if record["state"] == "error":
                problems.append(f"{key}: shutdown raised {record['error']}")
                continue
            if record["children"]:
                problems.append(f"{key}: child processes left {record['children']}")
            gpu = record.get("gpu")
            if gpu and gpu["problem"]:
                problems.append(f"{key}: {gpu['problem']}")
            parts.append(f"{key} {record['seconds']} s")
        left = _children()
        if left:
            problems.append(f"child processes alive now: {[c.pid for c in left]}")
        check(not problems, "; ".join(problems))
        gpu_note = "" if self.plan.cpu else f"; GPU {_gpu_memory_used_mib()} MiB used (before: {self.gpu_baseline_mib})"
        return f"no process left after each shutdown: {', '.join(parts)}{gpu_note}"

    # ------------------------------------------------------------ the plan of lines

    # Each layout's lines: the first starts it; its shutdown (unreported) follows the last.
    LAYOUTS: tuple[tuple[str, tuple[tuple[str, str, float], ...]], ...] = (
        ("offline", (("offline.answer", "offline_answer", 300),  # the start included
                     ("offline.batch_generate", "offline_batch_generate", 60),
                     ("dspy.evaluate64", "dspy_evaluate", 150),
                     ("jsonadapter.typed", "jsonadapter_typed", 120),
                     ("streamify", "streamify", 90),
                     ("tool_call", "tool_call", 120),
                     ("lora.with_adapter", "lora_with_adapter", 120),
                     ("lora.unload_refused", "lora_unload_refused", 30),
                     ("lora.unload_predict", "lora_unload_predict", 30),
                     ("grpo.step", "grpo_step", 240))),
        ("proc1", (("multigpu.proc1", "multigpu_proc1", 300),)),
        ("rpg2", (("multigpu.rpg2", "multigpu_rpg2", 420),  # two starts, one after the other
                  ("stats", "stats", 30),
                  ("routing.cache_events", "routing_cache_events", 60))),
    )

    @classmethod
    def line_names(cls) -> list[str]:
        """Every reported line, in run order."""
        return [name for _, group in cls.LAYOUTS for name, _, _ in group] + ["shutdown.clean"]

    def lines(self, only: set[str] | None = None) -> list[Line]:
        """Every line in order; with ``only``, those lines and what they need (their
        layout's start line and shutdown; ``shutdown.clean`` checks the layouts run)."""
        unknown = sorted((only or set()) - set(self.line_names()))
        if unknown:
            raise SystemExit(f"unknown line(s) {unknown}; lines: {', '.join(self.line_names())}")
        s = self.plan.scale
        out = []
        for key, group in self.LAYOUTS:
            if only is not None and not (only & {name for name, _, _ in group}) and "shutdown.clean" not in only:
                continue
            self.layouts_run.append(key)
            for i, (name, method, deadline) in enumerate(group):
                if only is None or i == 0 or name in only:
                    out.append(Line(name, getattr(self, method), deadline * s))
            out.append(Line(f"shutdown:{key}", self.shutdown_step(key), 120 * s, report=False))
        out.append(Line("shutdown.clean", self.shutdown_clean, 30 * s))
        return out
