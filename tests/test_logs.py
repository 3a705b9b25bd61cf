"""A quiet first run (logs.py): the demo and the CLI ask for it; the library never
touches the user's logging. Pure: subprocesses, no engine."""

import os
import subprocess
import sys

from conftest import ROOT


def _run(code: str, env_extra: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env.update(env_extra or {})
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_library_leaves_logging_and_the_environment_alone():
    out = _run(
        "import logging, os, warnings\n"
        "import dspy\nfilters = list(warnings.filters)  # after dspy, which sets its own\n"
        "import vllm_dspy_adapter, vllm_dspy_adapter.lm.offline, vllm_dspy_adapter.lm.tools, vllm_dspy_adapter.lm.stream_events\n"
        "from vllm_dspy_adapter import vLLMOffline\n"
        "print(logging.getLogger().handlers, logging.getLogger().level,\n"
        "      [k for k in ('VLLM_LOGGING_LEVEL', 'TORCH_CPP_LOG_LEVEL', 'PYTHONWARNINGS') if k in os.environ],\n"
        "      warnings.filters == filters)\n"
    )
    assert out == "[] 30 [] True"


def test_quiet_run_sets_defaults_but_keeps_what_the_user_set():
    code = ("from vllm_dspy_adapter.logs import quiet_engine_logs\nimport os\n"
            "print(quiet_engine_logs(verbose={v}), os.environ['VLLM_LOGGING_LEVEL'], "
            "os.environ.get('TORCH_CPP_LOG_LEVEL'))")
    assert _run(code.format(v=False)) == "True ERROR ERROR"
    assert _run(code.format(v=False), {"VLLM_LOGGING_LEVEL": "DEBUG"}) == "True DEBUG ERROR"
    assert _run(code.format(v=True)) == "False INFO None"


def test_cli_verbose_flag_is_documented():
    from vllm_dspy_adapter.cli import build_parser

    text = build_parser().format_help()
    assert "-v, --verbose" in text and "vLLM's own logs" in text
