"""DSPy 3.4's ``Engine.stream`` / ``AsyncEngine.stream`` over the pool: real token streaming.

A streamed request carries a ``stream_channel.StreamChannel`` to its replica, which runs
it with vLLM's DELTA outputs and puts each new piece of text on the channel (an
in-process engine directly; a worker process in per-step batches over its pipe).
Here the pieces become lm15 stream events (``stream_events.EventAssembler``): one start
event at once, thinking and text deltas as they are decoded, one end event with
finish reason and usage. DSPy's stream guard, ``dspy.streamify`` and its
``StreamListener``s read them as they would a hosted provider's stream.

Every wait on the channel has a deadline (``POLL_S``); between waits the stream
checks the request itself, which the pool always ends: with its result, an error,
or, for a replica that stalls, the pool's stall check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from collections.abc import Callable
from typing import Any

from ..errors import VllmDspyAdapterError, LMClosedError
from .stream_channel import StreamChannel, StreamTimeout
from .stream_events import EventAssembler

__all__ = ["stream_events", "astream_events", "POLL_S"]

POLL_S = 1.0  # the longest one wait for a piece lasts before the stream looks at its request again


def _settle(channel: StreamChannel, future: concurrent.futures.Future) -> None:
    """The pool's verdict on the request ends the channel (after its last piece)."""
    if future.cancelled():
        channel.fail(LMClosedError("the streamed request was cancelled"))
    elif future.exception() is not None:
        channel.fail(future.exception())
    else:
        channel.finish(future.result())


def _open(engine, request, future_prepared) -> tuple[StreamChannel, Any, EventAssembler]:
    channel, (future, prepared) = future_prepared
    future.add_done_callback(lambda f: _settle(channel, f))
    assembler = EventAssembler(model=prepared.label or engine.label, starts_in_thinking=prepared.starts_in_thinking,
                               hold_text=prepared.plan is not None)
    return channel, prepared, assembler


def _consume(items: list[Any], channel: StreamChannel, prepared, assembler: EventAssembler, runtime,
             as_lm15: Callable[[VllmDspyAdapterError], BaseException]) -> tuple[list[Any], bool]:
    """Events for a batch of channel items; True once the stream has ended."""
    events: list[Any] = []
    for item in items:
        if StreamChannel.is_end(item):
            try:
                generation = channel.outcome()
            except VllmDspyAdapterError as exc:
                raise as_lm15(exc) from exc
            parse = runtime.renderer.parse_tools(prepared.plan) if prepared.plan is not None else None
            events += assembler.end(generation, parse_tools=parse)
            return events, True
        events += assembler.feed(item.text)
    return events, False


def stream_events(engine, request, as_lm15: Callable[[VllmDspyAdapterError], BaseException]):
    """The synchronous stream of one DSPy request (a generator of lm15 events)."""
    channel = StreamChannel()
    submitted = engine._submit(request, sink=channel)
    channel, prepared, assembler = _open(engine, request, (channel, submitted))
    try:
        yield assembler.start()
        while True:
            try:
                items = channel.get(timeout=POLL_S)
            except StreamTimeout:
                continue  # nothing decoded for a while (a long prefill, a queue): the pool still owns the request
            events, done = _consume(items, channel, prepared, assembler, engine.runtime, as_lm15)
            yield from events
            if done:
                return
    finally:  # a consumer that stopped reading (generator closed, Ctrl-C): abort the request
        submitted[0].cancel()


async def astream_events(engine, request, as_lm15: Callable[[VllmDspyAdapterError], BaseException]):
    """The async stream of one DSPy request: waits on the caller's loop, no thread per stream."""
    channel = StreamChannel()
    submitted = await submit_off_loop(engine._submit, request, channel)  # rendering off the event loop
    channel, prepared, assembler = _open(engine, request, (channel, submitted))
    try:
        yield assembler.start()
        while True:
            try:
                items = await channel.aget(timeout=POLL_S)
            except StreamTimeout:
                continue
            events, done = _consume(items, channel, prepared, assembler, engine.runtime, as_lm15)
            for event in events:
                yield event
            if done:
                return
    finally:  # the consumer stopped (aclose, a cancelled task): abort the request
        submitted[0].cancel()


async def submit_off_loop(submit, *args):
    """``submit(*args)`` (rendering, then the pool's submit) in a worker thread with the
    caller's context (DSPy's settings), awaited on the caller's loop. A caller cancelled
    while the thread still runs gets ``CancelledError`` at once, and the request the
    thread submits after that is cancelled as it arrives: nothing runs unawaited."""
    loop = asyncio.get_running_loop()
    submitted = loop.run_in_executor(None, functools.partial(contextvars.copy_context().run, submit, *args))
    try:
        return await asyncio.shield(submitted)
    except asyncio.CancelledError:
        def abandon(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result()[0].cancel()
        submitted.add_done_callback(abandon)
        raise
