"""Token streaming, the parts free of engines: a channel that carries one streamed
request's pieces from the thread that reads vLLM to one consumer (sync or async),
and the assembler that turns those pieces into DSPy 3.4's lm15 stream events.

- ``StreamPiece``: new output text of one request (and how many tokens it holds);
- ``StreamChannel``: pieces in order, then the finished ``Generation`` or an error;
  ``get``/``aget`` wait with a deadline and return every piece that is ready, so a
  slow consumer reads many pieces at once instead of one wake-up per token;
- ``EventAssembler``: pieces to ``StreamStartEvent``, ``ThinkingDelta``/``TextDelta``
  events (a ``<think>`` block is split off as it streams, as ``render.split_reasoning``
  splits it off a whole answer) and one ``StreamEndEvent`` with finish reason and
  usage, as ``dspy.clients.engines.stream_guard`` requires.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

from .protocol import Generation
from .render import to_finish_reason

__all__ = ["StreamPiece", "StreamChannel", "StreamTimeout", "EventAssembler", "DeltaCollector"]

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


@dataclass
class StreamPiece:
    """New text of one streamed request since its previous piece."""

    text: str
    num_tokens: int = 0


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


class EventAssembler:
    """Stream pieces to lm15 stream events for one request.

    ``starts_in_thinking``: the prompt already opened a ``<think>`` block (some
    reasoning templates do), so the output is thinking until ``</think>``.
    Otherwise an output that begins with ``<think>`` is thinking until its close.
    A tag split across pieces is held back until it is whole, so neither tag ever
    reaches the answer text.
    """

    def __init__(self, *, model: str, request_id: str | None = None, reasoning: bool = True,
                 starts_in_thinking: bool = False, hold_text: bool = False):
        """``hold_text``: keep the answer text until ``end`` (a request with tools:
        the answer may hold tool calls, which are parsed from the whole text),
        while the thinking still streams."""
        self.model, self.request_id, self.reasoning = model, request_id, reasoning
        self.hold_text = hold_text
        self._text_held: list[str] = []
        self._mode = "thinking" if (reasoning and starts_in_thinking) else ("undecided" if reasoning else "text")
        self._held = ""
        self._lstrip = self._mode == "thinking"
        self._thinking_index: int | None = None
        self._text_index: int | None = None
        self._next_index = 0

    def start(self):
        from dspy.lm15 import StreamStartEvent

        return StreamStartEvent(id=self.request_id or None, model=self.model)

    def feed(self, text: str) -> list[Any]:
        """Events for new output text (possibly none while a tag is incomplete)."""
        self._held += text
        out: list[Any] = []
        while self._held:
            if self._mode == "undecided":
                stripped = self._held.lstrip()
                if not stripped:
                    return out  # only whitespace so far
                if stripped.startswith(_THINK_OPEN):
                    self._held = stripped[len(_THINK_OPEN):]
                    self._mode = "thinking"
                    self._lstrip = True
                    continue
                if _THINK_OPEN.startswith(stripped):
                    return out  # could still become "<think>"
                self._mode = "text"
                continue
            if self._lstrip:  # the start of the thinking, or of the answer after it, as split_reasoning strips it
                self._held = self._held.lstrip()
                if not self._held:
                    return out
                self._lstrip = False
            if self._mode == "thinking":
                close = self._held.find(_THINK_CLOSE)
                if close >= 0:
                    out += self._emit("thinking", self._held[:close].rstrip())
                    self._held = self._held[close + len(_THINK_CLOSE):]
                    self._mode = "text"
                    self._lstrip = True
                    continue
                # Hold back what may be the start of "</think>", and trailing
                # whitespace (the block's end is stripped, as in split_reasoning).
                body = self._held[:len(self._held) - _partial_suffix(self._held, _THINK_CLOSE)]
                body = body.rstrip()
                out += self._emit("thinking", body)
                self._held = self._held[len(body):]
                return out
            # text
            out += self._emit("text", self._held)
            self._held = ""
        return out

    def end(self, generation: Generation, parse_tools=None) -> list[Any]:
        """The rest of the answer, then the end event (finish reason, usage).

        ``parse_tools(text) -> (content, [ToolCallPart])`` reads tool calls out of
        the whole answer text (held back with ``hold_text``); each call becomes a
        ``ToolCallDelta`` after the text, and the finish reason ``tool_call``."""
        import json

        from dspy.lm15 import StreamDeltaEvent, StreamEndEvent, ToolCallDelta, Usage

        out: list[Any] = []
        if self._held:
            mode = "text" if self._mode == "undecided" else self._mode
            held = self._held.strip() if mode == "thinking" else self._held
            if mode == "text" and self._lstrip:
                held = held.lstrip()
            out += self._emit(mode, held)
            self._held = ""
        calls: list[Any] = []
        if self.hold_text:
            content = "".join(self._text_held)
            if parse_tools is not None:
                content, calls = parse_tools(content)
            self.hold_text = False
            out += self._emit("text", content, force=True)
        if self._text_index is None:
            out += self._emit("text", "", force=True)  # every answer has a text part, even an empty one
        for call in calls:
            out.append(StreamDeltaEvent(delta=ToolCallDelta(input=json.dumps(call.input), id=call.id, name=call.name,
                                                            part_index=self.next_part_index())))
        usage = Usage(input_tokens=generation.num_prompt_tokens, output_tokens=generation.num_output_tokens,
                      cache_read_tokens=generation.num_cached_tokens or None)
        finish = to_finish_reason(generation.finish_reason)
        if calls and finish == "stop":
            finish = "tool_call"
        out.append(StreamEndEvent(finish_reason=finish, usage=usage,
                                  provider_data={"replica": generation.replica}))
        return out

    def next_part_index(self) -> int:
        index = self._next_index
        self._next_index += 1
        return index

    def _emit(self, kind: str, text: str, force: bool = False) -> list[Any]:
        from dspy.lm15 import StreamDeltaEvent, TextDelta, ThinkingDelta

        if kind == "thinking":
            if not text:
                return []
            if self._thinking_index is None:
                self._thinking_index = self.next_part_index()
            return [StreamDeltaEvent(delta=ThinkingDelta(text=text, part_index=self._thinking_index))]
        if self.hold_text:
            self._text_held.append(text)
            return []
        if not text and not force:
            return []
        if self._text_index is None:
            self._text_index = self.next_part_index()
        return [StreamDeltaEvent(delta=TextDelta(text=text, part_index=self._text_index))]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class DeltaCollector:
    """A streamed request's vLLM outputs (``RequestOutputKind.DELTA``: each holds
    only what is new) gathered into the one final output the non-streamed path
    gets, so both paths build the same ``Generation``. Each new piece of text is
    also handed to ``sink.put`` as a ``StreamPiece``."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list | None = None
        self.finish_reason: str | None = None
        self.prompt_token_ids = None
        self.num_cached_tokens = 0
        self.count = 0

    def add(self, output) -> None:
        self.count += 1
        completion = output.outputs[0]
        if output.prompt_token_ids:
            self.prompt_token_ids = output.prompt_token_ids
        self.num_cached_tokens = max(self.num_cached_tokens, int(getattr(output, "num_cached_tokens", 0) or 0))
        self.text.append(completion.text)
        self.token_ids.extend(completion.token_ids)
        if completion.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(completion.logprobs)
        self.finish_reason = completion.finish_reason
        self.sink.put(StreamPiece(completion.text, len(completion.token_ids)))

    def final(self):
        """The gathered output, shaped like the ``RequestOutput`` of a FINAL_ONLY request."""
        from types import SimpleNamespace

        completion = SimpleNamespace(text="".join(self.text), token_ids=self.token_ids, logprobs=self.logprobs,
                                     finish_reason=self.finish_reason)
        return SimpleNamespace(outputs=[completion], prompt_token_ids=self.prompt_token_ids,
                               num_cached_tokens=self.num_cached_tokens)
