"""Waits of the caller's thread on the pool's futures, in slices of ``WAKE_S``.

A blocking ``future.result()`` sleeps in a lock that only a real signal wakes. An interrupt
set without one (``_thread.interrupt_main``, some notebook front ends, a debugger) would be
seen only when the answer came, minutes later for a long generation; waking every
``WAKE_S`` lets Python raise ``KeyboardInterrupt`` at once, and the caller aborts the work."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable
from typing import Any

__all__ = ["WAKE_S", "first_completed", "result"]

WAKE_S = 0.25  # the longest a caller's thread waits without looking at the interrupt flag


def result(future: concurrent.futures.Future) -> Any:
    """``future.result()``, seeing an interrupt within ``WAKE_S``."""
    while True:
        try:
            return future.result(timeout=WAKE_S)
        except concurrent.futures.TimeoutError:
            if future.done():  # the request's own TimeoutError, not the slice's
                raise


def first_completed(pending: Iterable[concurrent.futures.Future]):
    """``(done, pending)`` once one or more of ``pending`` is done, or after ``WAKE_S``."""
    return concurrent.futures.wait(pending, timeout=WAKE_S, return_when=concurrent.futures.FIRST_COMPLETED)
