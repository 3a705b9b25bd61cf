"""The line runner (no engine): one thread and one deadline per line, PASS/FAIL lines, the
stacks of a hung line; ``check`` for the lines' own assertions."""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Line:
    """One path: ``fn()`` returns a detail string (PASS) or raises (FAIL); past
    ``deadline_s`` seconds it is a FAIL and the run goes on without it. A line with
    ``report=False`` (a shutdown between layouts) runs the same way but prints
    nothing and is not counted: a later line reports on it."""

    name: str
    fn: Callable[[], Any]
    deadline_s: float
    report: bool = True


@dataclasses.dataclass
class Result:
    name: str
    ok: bool
    detail: str
    seconds: float
    hung: bool = False
    report: bool = True

    def text(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name} {self.detail} [{self.seconds:.1f} s]"


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_text(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}")


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidates = [os.path.join(os.path.dirname(sys.executable), "py-spy")]
    candidates += [os.path.join(p, "bin", "py-spy") for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def _children() -> list:
    """Live child processes of this one (recursive), except Python's resource tracker."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(child.cmdline()):
                continue
            out.append(child)
        except psutil.Error:
            pass
    return out


def dump_stacks(path: str, *, py_spy: bool = True) -> str:
    """Every thread of this process (faulthandler) and, with py-spy installed, every
    child process (workers, engine cores) into ``path``; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as out:
        out.write(f"===== pid {os.getpid()} (this process; faulthandler, every thread)\n")
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
        out.flush()
        try:
            children = _children()
        except Exception as exc:  # psutil missing: this process only
            out.write(f"(child processes not listed: {_error_text(exc)})\n")
            return path
        spy = _py_spy() if py_spy else None
        if children and spy is None:
            out.write("(py-spy not found: child processes not dumped: "
                      f"{', '.join(str(c.pid) for c in children)})\n")
            return path
        for child in children:
            try:
                name = " ".join(child.cmdline())[:160]
            except Exception:
                continue
            out.write(f"===== pid {child.pid} {name}\n")
            out.flush()
            try:
                subprocess.run([spy, "dump", "--pid", str(child.pid)], stdout=out, stderr=subprocess.STDOUT,
                               timeout=30, check=False)
            except subprocess.TimeoutExpired:
                out.write("(py-spy dump timed out after 30 s)\n")
            out.flush()
    return path


def run_lines(lines: list[Line], *, emit: Callable[[str], None] = print, stacks_dir: str | None = None,
              py_spy: bool = True, results: list[Result] | None = None) -> int:
    """Run ``lines`` one after another, each in its own thread under its own deadline;
    emit one ``PASS``/``FAIL`` line per reported line, then ``SMOKE: n passed, m failed``.
    Returns the exit code: 0 only when every reported line passed (and every unreported
    one finished). A line past its deadline is left running (a daemon thread); its
    stacks go to ``<stacks_dir>/stacks-<name>.txt`` when ``stacks_dir`` is given.
    ``results`` (a list) receives every line's :class:`Result` as it ends."""
    results = [] if results is None else results
    for line in lines:
        box: dict[str, Any] = {}
        done = threading.Event()

        def target(line=line, box=box, done=done):
            try:
                box["detail"] = line.fn()
            except BaseException as exc:  # noqa: BLE001 - a line's failure is data
                box["error"] = exc
                box["traceback"] = traceback.format_exc()
            finally:
                done.set()

        started = time.monotonic()
        threading.Thread(target=target, name=f"smoke-{line.name}", daemon=True).start()
        finished = done.wait(line.deadline_s)
        seconds = time.monotonic() - started
        if not finished:
            where = ""
            if stacks_dir is not None:
                try:
                    where = "; stacks in " + dump_stacks(os.path.join(stacks_dir, f"stacks-{line.name}.txt"),
                                                         py_spy=py_spy)
                except Exception as exc:  # the dump must not end the run
                    where = f"; stack dump failed: {_error_text(exc)}"
            result = Result(line.name, False, f"no result after {line.deadline_s:g} s (deadline){where}", seconds,
                            hung=True, report=line.report)
        elif "error" in box:
            sys.stderr.write(f"---- {line.name} failed:\n{box['traceback']}\n")
            sys.stderr.flush()
            result = Result(line.name, False, _error_text(box["error"]), seconds, report=line.report)
        else:
            detail = box.get("detail")
            result = Result(line.name, True, _one_line("" if detail is None else detail, 600), seconds,
                            report=line.report)
        results.append(result)
        if line.report or not result.ok:
            if not line.report:  # an unreported step that failed: said on stderr, reported by a later line
                sys.stderr.write(f"---- step {result.text()}\n")
            else:
                emit(result.text())
    reported = [r for r in results if r.report]
    passed = sum(r.ok for r in reported)
    emit(f"SMOKE: {passed} passed, {len(reported) - passed} failed")
    return 0 if passed == len(reported) and all(r.ok for r in results) else 1


class Check(AssertionError):
    """A line's check did not hold."""


def check(condition: Any, message: str) -> None:
    if not condition:
        raise Check(message)
