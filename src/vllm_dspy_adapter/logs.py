"""A quiet run for the demo and the command line: the program's output, not vLLM's.

vLLM logs every step of an engine's start and stop at INFO, its engine
processes add their own warnings, and PyTorch prints C++ notices. A first run
should show the program's answers. ``quiet_engine_logs`` is what the demo and
the CLI call (the user asked for a quiet run by running them); the library
itself never calls it and never changes the user's logging.

Everything here works through environment variables read by vLLM and PyTorch
when they start, so it must run before vLLM is imported, and it reaches the
engine processes (they inherit the environment). A variable the user has set
already is left as it is: ``VLLM_LOGGING_LEVEL=INFO python examples/demo.py``
shows vLLM's logs, as does ``-v``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["QUIET_ENV", "quiet_engine_logs"]

# What a quiet run sets, unless already set: vLLM's own logger and PyTorch's C++ log.
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    # Engine processes start with this filter: deprecation notices of vLLM's
    # dependencies and multiprocessing's shared-memory note at exit.
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
}


def quiet_engine_logs(verbose: bool = False) -> bool:
    """Keep vLLM's and PyTorch's logs out of a run, unless ``verbose``.

    Returns whether the run is quiet. Call it first thing, before vLLM is
    imported (vLLM reads ``VLLM_LOGGING_LEVEL`` when its logger is set up). With
    ``verbose``, vLLM's INFO logs are shown and this process logs at INFO.
    """
    if "vllm" in sys.modules:
        logging.getLogger(__name__).debug("quiet_engine_logs called after vLLM was imported; "
                                          "vLLM's own logger keeps its level")
    if verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return False
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    return True
