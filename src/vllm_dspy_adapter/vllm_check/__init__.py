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

One module per job (stdlib only; they import nothing of the package but ``vllm_api``)::

    sources.py    a release's files: FolderSource, WheelSource, installed_source, the wheel cache
    bindings.py   what a module or class body binds, read off its syntax tree
    resolve.py    dotted names resolved through imports, lazy maps and classes (_Resolver)
    checker.py    check / check_name / due_names / default_names of vllm_api.USED and OPTIONAL
    scanner.py    the heuristic scan of the attribute names accessed under src
    cli.py        the command line (__main__.py runs it)

This module re-exports their public names: ``vllm_check.check(...)`` and the rest.
"""

from __future__ import annotations

from .checker import Missing, check, check_name, default_names, due_names
from .cli import main
from .resolve import MAX_DEPTH
from .scanner import Flag, accessed_attributes, class_members, scan
from .sources import (WHEEL_CACHE_ENV, FolderSource, Source, WheelSource, WheelUnavailable, cached_wheel,
                      ensure_wheel, installed_source, release_sources, wheel_cache_dir)

__all__ = [
    "Missing", "Source", "FolderSource", "WheelSource", "installed_source", "check", "due_names", "default_names",
    "Flag", "scan", "accessed_attributes", "class_members", "wheel_cache_dir", "cached_wheel", "ensure_wheel",
    "WheelUnavailable", "release_sources", "main", "check_name", "MAX_DEPTH", "WHEEL_CACHE_ENV",
]
