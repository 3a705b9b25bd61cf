"""``batch_generate``'s work, apart from the LM class: check every prompt and its sampling
settings before any is submitted, submit prompts that share a prefix together
(``serving.batching``), collect the results in input order behind a progress bar, and
abort the whole batch when the caller gives up (Ctrl-C)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigurationError
from ..serving.batching import group_by_prefix
from .waiting import first_completed

__all__ = ["run_batch"]


def run_batch(runtime, prompts: Sequence[Any], *, adapter: str | None, progress: bool, return_outputs: bool,
              raise_on_error: bool, per_prompt: Sequence[dict[str, Any]] | None,
              sampling: dict[str, Any]) -> list[Any]:
    """``vLLMOffline.batch_generate`` on ``runtime`` (``dspy_engine.Runtime``), whose
    docstring says what it does; ``adapter``: the adapter every prompt runs with, or None."""
    if isinstance(prompts, (str, bytes, dict)):
        raise ConfigurationError(
            f"batch_generate takes a list of prompts, got one {type(prompts).__name__}: "
            f"pass [prompt] for a single prompt, or call the LM itself (lm(prompt)).")
    prompts = list(prompts)
    runtime.renderer.check_sampling(sampling)
    merged = {**runtime.spec.sampling, **sampling}
    if per_prompt is None:
        per_request = [merged] * len(prompts)
    else:
        per_request = _per_prompt_sampling(per_prompt, merged, len(prompts), runtime.renderer.check_sampling)
    # Refuse bad input before submitting any: nothing runs half-done.
    requests = [runtime.renderer.prompt_request(p, s) for p, s in zip(prompts, per_request)]
    if adapter is not None:
        runtime.pool.adapters.get(adapter)  # not loaded: ConfigurationError before any request
        for request in requests:
            request.adapter = adapter
    # Prompts sharing a prefix go together, first one first, to one replica (serving/batching.py),
    # a group at most the batch's fair share of one replica, so a shared system prompt still spreads.
    futures: list[Any] = [None] * len(requests)
    fair_share = -(-len(requests) // max(1, len(runtime.replicas)))
    results: list[Any] = [None] * len(futures)
    bar = None
    try:  # from the first submission: a Ctrl-C while submitting aborts what was submitted too
        for group in group_by_prefix([r.prompt for r in requests], max_size=fair_share):
            for i, future in zip(group, runtime.pool.submit_group([requests[i] for i in group])):
                futures[i] = future
        bar = _progress_bar(len(futures), progress)
        started, out_tokens = time.monotonic(), 0
        index_of = {id(f): i for i, f in enumerate(futures)}
        pending = set(futures)
        while pending:
            done, pending = first_completed(pending)  # an interrupt is seen at once (waiting.py)
            for future in done:
                i = index_of[id(future)]
                exc = future.exception()
                if exc is not None:
                    results[i] = exc
                else:
                    generation = future.result()
                    out_tokens += generation.num_output_tokens
                    results[i] = generation if return_outputs else generation.text
                if bar is not None:
                    elapsed = max(time.monotonic() - started, 1e-9)
                    bar.set_postfix_str(f"{bar.n / elapsed:.1f} req/s, {out_tokens / elapsed:.0f} tok/s",
                                        refresh=False)
                    bar.update(1)
    except BaseException:  # Ctrl-C (a notebook's interrupt) or an error here: abort the whole batch,
        for future in futures:  # so the GPU is free for the next call, which gets none of these results
            if future is not None:
                future.cancel()
        raise
    finally:
        if bar is not None:
            bar.close()
    failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if failures and raise_on_error:
        i, first = failures[0]
        raise type(first)(f"{len(failures)} of {len(results)} prompts failed; first (prompt {i}): "
                          f"{str(first).rstrip('.')}. "
                          "Pass raise_on_error=False to keep the other results.") from first
    return results


def _per_prompt_sampling(per_prompt: Sequence[dict[str, Any]], base: dict[str, Any], n: int,
                         check: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """One merged sampling dict per prompt; ``check`` (the renderer's rule) sees each distinct override once."""
    per_prompt = list(per_prompt)
    if len(per_prompt) != n:
        raise ConfigurationError(
            f"per_prompt has {len(per_prompt)} entries for {n} prompts; give one dict per prompt "
            "(an empty dict keeps the shared settings)."
        )
    checked: set[str] = set()
    out = []
    for i, extra in enumerate(per_prompt):
        if not isinstance(extra, dict):
            raise ConfigurationError(f"per_prompt[{i}] is {type(extra).__name__}; expected a dict of "
                                     "SamplingParams fields such as {'max_tokens': 64}.")
        key = repr(sorted(extra.items()))
        if key not in checked:
            try:
                check(extra)
            except ConfigurationError as exc:
                raise ConfigurationError(f"per_prompt[{i}]: {exc}") from exc
            checked.add(key)
        out.append({**base, **extra} if extra else base)
    return out


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="batch_generate", unit="req", dynamic_ncols=True)
