"""The documentation set is executed, not just written.

(a) examples/example_multi_gpu.ipynb runs headless (nbclient, the venv's kernel);
(b) every example script runs to completion and prints its closing line;
(c) every ```python block of README.md, docs/*.md and docs/zh/*.md compiles, and
    every name it imports from vllm_dspy_adapter exists; every
    `python -m vllm_dspy_adapter ...` / `vllm-dspy-adapter ...` command in a
    ```bash block parses with the real CLI parser; every examples/... path named
    in the docs exists.

(a) and (b) start real engines (two CPU replicas of the default model on a
machine without GPU) and are marked ``engine``; (c) is fast.
"""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOC_FILES = sorted([p for p in [ROOT / "README.md"] if p.exists()]
                   + list((ROOT / "docs").glob("*.md")) + list((ROOT / "docs" / "zh").glob("*.md")))

# Every example script, with a line its output must contain. A new script must be added here.
SCRIPTS = {
    "demo.py": "demo finished",
    "evaluate_multi_gpu.py": "evaluate_multi_gpu: done",
    "batch_generate.py": "batch_generate: done",
    "gepa_small.py": "gepa_small: done",
    "streaming_chat.py": "streaming_chat: done",
    "lora_finetune.py": "lora_finetune: done",
    "grpo_small.py": "grpo_small: done",
}
SCRIPT_TIMEOUT = 600
# Smaller workloads than a user's default run, through each script's own options: the same paths,
# minutes less on a 2-core CI machine.
SCRIPT_ARGS = {
    "batch_generate.py": ["--prompts", "40"],
    "evaluate_multi_gpu.py": ["--questions", "8"],
    "gepa_small.py": ["--budget", "12"],
}


def _env(tmp_path: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    env["DSPY_CACHEDIR"] = str(tmp_path / "dspy-cache")  # a fresh DSPy cache: every call reaches an engine
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _cpu_only() -> bool:
    from vllm_dspy_adapter import visible_gpu_count

    return visible_gpu_count() == 0


# --------------------------------------------------------------------------- (a) notebook


@pytest.mark.engine
def test_notebook_runs_headless(tmp_path, default_model):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / "example_multi_gpu.ipynb", as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # A first cell of our own proves the kernel is this venv's interpreter
    # (jupyter_client runs a kernelspec's "python" as sys.executable).
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    client = NotebookClient(nb, kernel_name="python3", timeout=600, allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    started = time.monotonic()
    client.execute(env=_env(tmp_path))
    print(f"notebook ran in {time.monotonic() - started:.0f} s")

    def text(cell):
        return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")

    assert text(nb.cells[0]).split()[-1] == sys.executable
    everything = "\n".join(text(c) for c in nb.cells if c.cell_type == "code")
    assert "notebook: done" in everything
    assert "replicas ready" in everything
    assert "same cache label as the single engine: True" in everything
    if _cpu_only():
        assert "cpu:0" in everything and "cpu:1" in everything


# --------------------------------------------------------------------------- (b) scripts


# Example test files (a user copies them beside their program); tests/test_fake_seam.py runs each.
EXAMPLE_TESTS = ("test_program_with_fake_backend.py",)


def test_every_example_script_is_executed_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in EXAMPLE_TESTS) == sorted(SCRIPTS)
    assert sorted(p.name for p in EXAMPLES.glob("test_*.py")) == sorted(EXAMPLE_TESTS)


@pytest.mark.engine
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_script_runs(script, tmp_path, default_model):
    started = time.monotonic()
    command = [sys.executable, str(EXAMPLES / script), *SCRIPT_ARGS.get(script, [])]
    run = subprocess.run(command, cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    elapsed = time.monotonic() - started
    print(f"{script} ran in {elapsed:.0f} s")
    report = f"exit {run.returncode}\n--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-4000:]}"
    assert run.returncode == 0, report
    assert SCRIPTS[script] in run.stdout, report
    per_replica = re.search(r"^requests per replica: \[([\d, ]*)\]$", run.stdout, re.M)
    if script not in ("demo.py", "lora_finetune.py", "grpo_small.py"):  # one engine: no per-replica line
        assert per_replica, report
        counts = [int(c) for c in per_replica.group(1).split(",")]
        assert all(c > 0 for c in counts), f"a replica served nothing: {counts}\n{report}"
        if _cpu_only():
            assert len(counts) == 2, report


# --------------------------------------------------------------------------- (c) docs

_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(path: pathlib.Path, languages: tuple[str, ...]):
    text = path.read_text(encoding="utf-8")
    for match in _FENCE.finditer(text):
        if match.group(1).lower() in languages:
            line = text.count("\n", 0, match.start()) + 1
            yield line, match.group(2)


def _doc_ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_the_documents_exist():
    names = {str(p.relative_to(ROOT)) for p in DOC_FILES}
    for required in ("docs/VLLM_QUICKSTART.md", "docs/VLLM_OFFLINE_GUIDE.md", "docs/MULTI_GPU_GUIDE.md",
                     "docs/ARCHITECTURE.md", "docs/zh/README.md"):
        assert required in names


@pytest.mark.parametrize("doc", ["README.md", "docs/ARCHITECTURE.md"])
def test_the_layout_named_in_docs_is_the_code(doc):
    # Every file the layout text names exists; README's layout names every source file.
    text = (ROOT / doc).read_text(encoding="utf-8")
    if doc == "README.md":
        text = text[text.index("## Layout"):]
        text = text[:text.index("\n## ", 1)] if "\n## " in text[1:] else text
    package = ROOT / "src" / "vllm_dspy_adapter"
    sources = {p.name for p in package.rglob("*.py")}
    elsewhere = {p.name for folder in ("tests", "examples", "benchmarks") for p in (ROOT / folder).rglob("*.py")}
    named = set(re.findall(r"\b([a-z_]+\.py)\b", text))
    assert not named - sources - elsewhere - {"import_cycles.py"}, named - sources - elsewhere
    if doc == "README.md":
        assert sources - {"__main__.py"} <= named, sources - named


@pytest.mark.parametrize("doc", DOC_FILES, ids=_doc_ids(DOC_FILES))
def test_python_blocks_compile_and_import_real_names(doc):
    problems = []
    for line, code in _blocks(doc, ("python", "py")):
        where = f"{doc.relative_to(ROOT)}:{line}"
        try:
            tree = ast.parse(code, filename=where)
            compile(tree, where, "exec")
        except SyntaxError as exc:
            problems.append(f"{where}: does not compile: {exc}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm_dspy_adapter":
                try:
                    module = importlib.import_module(node.module)
                except ImportError as exc:
                    problems.append(f"{where}: no module {node.module}: {exc}")
                    continue
                for alias in node.names:
                    if alias.name != "*" and not hasattr(module, alias.name):
                        problems.append(f"{where}: {node.module} has no {alias.name!r}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "vllm_dspy_adapter":
                        try:
                            importlib.import_module(alias.name)
                        except ImportError as exc:
                            problems.append(f"{where}: no module {alias.name}: {exc}")
    assert not problems, "\n".join(problems)


def _commands(code: str):
    """Shell lines of a block, with continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", code)
    for raw in joined.splitlines():
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if line and not line.startswith("#"):
            yield line


@pytest.mark.parametrize("doc", DOC_FILES, ids=_doc_ids(DOC_FILES))
def test_cli_commands_in_docs_parse(doc):
    from vllm_dspy_adapter.cli import build_parser

    problems = []
    for line, code in _blocks(doc, ("bash", "sh", "shell", "console")):
        for command in _commands(code):
            words = shlex.split(command, comments=True)
            # Drop leading VAR=value assignments.
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words = words[1:]
            if words[:1] == ["vllm-dspy-adapter"]:
                argv = words[1:]
            elif len(words) >= 3 and words[0].startswith("python") and words[1:3] == ["-m", "vllm_dspy_adapter"]:
                argv = words[3:]
            else:
                continue
            if "--help" in argv or "-h" in argv:
                continue
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                problems.append(f"{doc.relative_to(ROOT)}:{line}: the CLI refuses {command!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOC_FILES, ids=_doc_ids(DOC_FILES))
def test_files_named_in_docs_exist(doc):
    text = doc.read_text(encoding="utf-8")
    named = set(re.findall(r"\bexamples/[\w./-]+\.(?:py|ipynb)\b", text))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{doc.relative_to(ROOT)} names missing files: {missing}"
