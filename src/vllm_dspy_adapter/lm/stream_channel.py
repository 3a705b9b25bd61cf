"""A streamed request's pieces, from the thread that reads them off a replica to its
one consumer (sync or async): ``StreamChannel`` and the ``StreamTimeout`` of a wait.

``get``/``aget`` wait with a deadline and return every piece that is ready, so a slow
consumer reads many pieces at once instead of one wake-up per token.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

from ..protocol import Generation, StreamPiece

__all__ = ["StreamChannel", "StreamTimeout"]


class StreamTimeout(TimeoutError):
    """No piece arrived within the wait's deadline."""


_END = object()


class StreamChannel:
    """One streamed request's pieces, from a producer thread to one consumer.

    The producer calls ``put`` for each piece and then ``finish(generation)`` or
    ``fail(error)`` exactly once (later calls are ignored: a stream fails or ends
    once). ``first_piece_sent`` tells whether any text reached the channel, which
    decides whether a request whose replica died may be resubmitted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._items: collections.deque = collections.deque()
        self._closed = False
        self._result: Generation | None = None
        self._error: BaseException | None = None
        self._async_wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.first_piece_sent = False
        self.cancelled = False

    # ------------------------------------------------------------- producer

    def put(self, piece: StreamPiece) -> None:
        if not piece.text and not piece.num_tokens:
            return
        with self._lock:
            if self._closed:
                return
            self._items.append(piece)
            if piece.text:
                self.first_piece_sent = True
            self._wake()

    def finish(self, generation: Generation) -> None:
        self._close(result=generation)

    def fail(self, error: BaseException) -> None:
        self._close(error=error)

    @property
    def done(self) -> bool:
        return self._closed

    def _close(self, result: Generation | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._result, self._error = result, error
            self._items.append(_END)
            self._wake()

    def _wake(self) -> None:  # under the lock
        self._ready.notify_all()
        for loop, event in self._async_wakers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody to wake
                pass

    # ------------------------------------------------------------- consumer

    def _drain(self) -> list[Any]:  # under the lock
        items = list(self._items)
        self._items.clear()
        return items

    def get(self, timeout: float | None) -> list[Any]:
        """Every item ready (``StreamPiece``s, then possibly the end marker read
        through ``outcome``), waiting up to ``timeout`` seconds for the first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._items:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise StreamTimeout(f"no output for {timeout:g} s")
                self._ready.wait(left)
            return self._drain()

    async def aget(self, timeout: float | None) -> list[Any]:
        """``get`` for a coroutine: waits on the caller's event loop, no thread."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            if self._items:
                return self._drain()
            self._async_wakers.append((loop, event))
        try:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                raise StreamTimeout(f"no output for {timeout:g} s") from None
            with self._lock:
                return self._drain()
        finally:
            with self._lock:
                self._async_wakers.remove((loop, event))

    def outcome(self) -> Generation:
        """After the end marker: the finished generation, or the stream's error."""
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    @staticmethod
    def is_end(item: Any) -> bool:
        return item is _END
