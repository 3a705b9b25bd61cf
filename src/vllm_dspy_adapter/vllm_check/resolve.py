"""Resolving a dotted name in one release the way Python would at run time.

:class:`_Resolver` finds the longest prefix that is a module, then a top-level name of it
(followed through imports, star imports and lazy ``__getattr__`` maps), then attributes of a
class (its body, ``self.X`` assignments, its bases), and tells whether a function takes a keyword.
:func:`_resolver` keeps one resolver per source, so each module is parsed once per process.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass

from .bindings import _class_body_members, _collect_bindings, _decorator_name, _Module
from .sources import Source

MAX_DEPTH = 32  # import hops followed for one name before giving up


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


_RESOLVERS: dict[tuple[str, str], _Resolver] = {}


def _resolver(source: Source) -> _Resolver:
    """One resolver per source location, so each release's modules are parsed once per process."""
    key = (type(source).__name__, source.location)
    if key not in _RESOLVERS:
        _RESOLVERS[key] = _Resolver(source)
    return _RESOLVERS[key]
