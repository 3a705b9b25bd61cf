"""``python -m vllm_dspy_adapter.vllm_check``: runs :func:`vllm_check.cli.main`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
