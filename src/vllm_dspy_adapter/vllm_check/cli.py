"""The command line of ``python -m vllm_dspy_adapter.vllm_check``: one line per release checked."""

from __future__ import annotations

import argparse
import sys
import time

from .checker import Missing, check, default_names, due_names
from .scanner import Flag, accessed_attributes, scan
from .sources import FolderSource, Source, WheelSource, WheelUnavailable, installed_source, release_sources


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
