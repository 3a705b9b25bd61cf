"""What a module or a class body binds, read off its syntax tree (no resolution, no imports).

``_collect_bindings`` fills a :class:`_Module` with the names its top level binds at run time
(definitions, assignments, imports, star imports, a lazy ``__getattr__`` map);
``_class_body_members`` lists what one class body defines, ``self.X = ...`` in its methods included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass, field


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
