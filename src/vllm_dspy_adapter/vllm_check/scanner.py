"""The heuristic scan: attribute names the adapter's code accesses that are members of a class
(``AsyncLLM``) in one supported release but not in another, and not declared in ``vllm_api.OPTIONAL``."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import vllm_api
from .checker import _KEYWORD
from .resolve import _Found, _resolver
from .sources import Source


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
