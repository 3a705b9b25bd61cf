"""Benchmark harness for vllm-dspy-adapter.

Run from the repository root: ``python -m benchmarks.run --help``. The parent
(``run.py``) plans one job per (system, GPU count), runs each job in its own
process (``child.py``) so GPU memory is freed between systems and a crash in one
loses nothing else, collects their result rows and writes the table, JSON and
plot (``report.py``). ``systems.py`` holds the systems under test,
``reference.py`` the reference multi-GPU design, ``workloads.py`` the request
generators.
"""
