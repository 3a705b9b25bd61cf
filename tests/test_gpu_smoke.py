"""benchmarks/gpu_smoke/runner.py (the line runner), without engines: a line that raises is a FAIL and
the run goes on, a hung line is bounded by its deadline (its stacks written), the exit code
says whether every line passed. The smoke itself runs on a lent GPU (or `--cpu`, ~6 min)."""

import threading
import time

from benchmarks.gpu_smoke import Line, Smoke, run_lines


def _run(lines, **kwargs):
    emitted = []
    code = run_lines(lines, emit=emitted.append, **kwargs)
    return code, emitted


def test_a_raising_line_fails_and_the_run_goes_on():
    ran = []

    def boom():
        raise ValueError("boom\nsecond line")

    code, emitted = _run([Line("a", lambda: ran.append("a") or "fine", 5), Line("b", boom, 5),
                          Line("c", lambda: ran.append("c"), 5)])
    assert ran == ["a", "c"]
    assert emitted[0].startswith("PASS a fine [")
    assert emitted[1].startswith("FAIL b ValueError: boom second line [")  # one line, whatever the message
    assert emitted[2].startswith("PASS c ")
    assert emitted[-1] == "SMOKE: 2 passed, 1 failed" and len(emitted) == 4
    assert code == 1


def test_a_hung_line_is_bounded_by_its_deadline_and_its_stacks_are_written(tmp_path):
    release = threading.Event()

    def hang_here():
        release.wait(60)

    started = time.monotonic()
    try:
        code, emitted = _run([Line("stuck", hang_here, 0.5), Line("after", lambda: "ok", 5)],
                             stacks_dir=str(tmp_path), py_spy=False)
    finally:
        release.set()
    assert time.monotonic() - started < 15
    assert emitted[0].startswith("FAIL stuck no result after 0.5 s (deadline); stacks in ")
    assert emitted[1].startswith("PASS after ok")
    assert emitted[-1] == "SMOKE: 1 passed, 1 failed" and code == 1
    stacks = (tmp_path / "stacks-stuck.txt").read_text()
    assert "hang_here" in stacks  # the hung thread's own frame, from faulthandler


def test_exit_code_is_zero_only_when_every_line_passes():
    code, emitted = _run([Line("a", lambda: None, 5), Line("b", lambda: "x", 5)])
    assert code == 0 and emitted == [emitted[0], emitted[1], "SMOKE: 2 passed, 0 failed"]
    assert emitted[0].startswith("PASS a  [")  # no detail: an empty one


def test_an_unreported_step_is_not_a_line_but_its_failure_fails_the_run():
    def broken_shutdown():
        raise RuntimeError("left a process")

    code, emitted = _run([Line("a", lambda: "ok", 5), Line("shutdown:x", broken_shutdown, 5, report=False)])
    assert emitted[-1] == "SMOKE: 1 passed, 0 failed" and len(emitted) == 2
    assert code == 1


def test_the_smoke_reports_every_path_of_the_brief_once():
    assert Smoke.line_names() == [
        "offline.answer", "offline.batch_generate", "dspy.evaluate64", "jsonadapter.typed", "streamify",
        "tool_call", "lora.with_adapter", "lora.unload_refused", "lora.unload_predict", "grpo.step",
        "multigpu.proc1", "multigpu.rpg2", "stats", "routing.cache_events", "shutdown.clean"]
