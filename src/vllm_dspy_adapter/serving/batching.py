"""Cache-friendly order for a batch: prompts that share a prefix, grouped.

``batch_generate`` submits each group together (``ReplicaPool.submit_group``): its
first prompt first, the others right after on the same replica, so the shared blocks
are computed once and the rest hit them while they are still cached, instead of
being spread over the batch (and over replicas) where a tight KV cache evicts them
between two of the group. Results still come back in input order.

Sorting the prompts puts every run that shares a prefix side by side (a trie's
order), so one pass over neighbours finds the groups. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["group_by_prefix", "MIN_SHARED_CHARS", "MIN_SHARED_TOKENS"]

MIN_SHARED_CHARS = 256  # what the "prefix" policy calls a block
MIN_SHARED_TOKENS = 64


def _shared(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def group_by_prefix(prompts: Sequence[str | Sequence[int]], *, min_chars: int = MIN_SHARED_CHARS,
                    min_tokens: int = MIN_SHARED_TOKENS) -> list[list[int]]:
    """Indices of ``prompts`` in groups that share at least ``min_chars`` leading characters
    (text) or ``min_tokens`` leading token ids; each group in input order, the groups
    in the order of their first prompt. A prompt sharing nothing is a group of one."""
    keyed = [(0, p, i) if isinstance(p, str) else (1, tuple(p), i) for i, p in enumerate(prompts)]
    keyed.sort(key=lambda item: (item[0], item[1]))
    groups: list[list[int]] = []
    previous = None
    for kind, key, index in keyed:
        least = min_chars if kind == 0 else min_tokens
        if previous is not None and previous[0] == kind and _shared(previous[1], key) >= least:
            groups[-1].append(index)
        else:
            groups.append([index])
        previous = (kind, key)
    for group in groups:
        group.sort()
    groups.sort(key=lambda group: group[0])
    return groups
