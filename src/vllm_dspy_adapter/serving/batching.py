"""Cache-friendly order for a batch: prompts that share a prefix, grouped.

``batch_generate`` submits each group together (``ReplicaPool.submit_group``): its
first prompt first, the others right after on the same replica, so the shared blocks
are computed once and the rest hit them while they are still cached, instead of
being spread over the batch (and over replicas) where a tight KV cache evicts them
between two of the group. Results still come back in input order.

Sorting the prompts puts every run that shares a prefix side by side (a trie's
order), so one pass over neighbours finds the groups. A group is cut into pieces of at
most ``max_size`` (``batch_generate`` passes the batch's fair share per replica): a
batch whose every prompt shares one system message would otherwise be pinned whole to
one replica and leave the others idle; each piece's first prompt is routed by the
policy, so the pieces spread and each replica prefills the prefix once. Pure: no I/O.
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
                    min_tokens: int = MIN_SHARED_TOKENS, max_size: int | None = None) -> list[list[int]]:
    """Indices of ``prompts`` in groups that share at least ``min_chars`` leading characters
    (text) or ``min_tokens`` leading token ids; each group in input order, the groups
    in the order of their first prompt. A prompt sharing nothing is a group of one; a
    group longer than ``max_size`` is cut into consecutive pieces of ``max_size``."""
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
    if max_size is not None:
        size = max(1, max_size)
        groups = [group[i:i + size] for group in groups for i in range(0, len(group), size)]
    groups.sort(key=lambda group: group[0])
    return groups
