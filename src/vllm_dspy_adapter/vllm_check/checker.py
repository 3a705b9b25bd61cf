"""The check: which names of ``vllm_api.USED`` (and ``OPTIONAL``, where due) a release lacks."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .. import vllm_api
from .resolve import _NotFound, _resolver, _Resolver
from .sources import Source

_KEYWORD = re.compile(r"^(?P<name>[\w.]+)\((?P<keyword>\w+)\)$")


@dataclass(frozen=True)
class Missing:
    """A name a release lacks: the release, the name, and the deepest part that was found."""

    release: str
    name: str
    found: str

    def __str__(self) -> str:
        return f"{self.release}: {self.name}: {self.found}"


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
