"""Stream pieces to DSPy 3.4's lm15 stream events: ``EventAssembler`` emits
``StreamStartEvent``, ``ThinkingDelta``/``TextDelta`` events (a ``<think>`` block is split
off as it streams, as ``render.split_reasoning`` splits it off a whole answer) and one
``StreamEndEvent`` with finish reason and usage, as ``dspy.clients.engines.stream_guard``
requires.
"""

from __future__ import annotations

from typing import Any

from ..protocol import Generation
from .render import THINK_CLOSE, THINK_OPEN, to_finish_reason

__all__ = ["EventAssembler"]


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
                if stripped.startswith(THINK_OPEN):
                    self._held = stripped[len(THINK_OPEN):]
                    self._mode = "thinking"
                    self._lstrip = True
                    continue
                if THINK_OPEN.startswith(stripped):
                    return out  # could still become "<think>"
                self._mode = "text"
                continue
            if self._lstrip:  # the start of the thinking, or of the answer after it, as split_reasoning strips it
                self._held = self._held.lstrip()
                if not self._held:
                    return out
                self._lstrip = False
            if self._mode == "thinking":
                close = self._held.find(THINK_CLOSE)
                if close >= 0:
                    out += self._emit("thinking", self._held[:close].rstrip())
                    self._held = self._held[close + len(THINK_CLOSE):]
                    self._mode = "text"
                    self._lstrip = True
                    continue
                # Hold back what may be the start of "</think>", and trailing
                # whitespace (the block's end is stripped, as in split_reasoning).
                body = self._held[:len(self._held) - _partial_suffix(self._held, THINK_CLOSE)]
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
                                  provider_data={"replica": generation.replica, "adapter": generation.adapter}))
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
