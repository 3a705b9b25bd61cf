"""Streaming pieces (streams.py): the channel's waits and the lm15 events a stream
becomes, checked against the whole-answer path and DSPy's own stream guard. Pure."""

import asyncio
import random
import threading
import time

import pytest
from dspy._vendor.lm15.result import StreamAccumulator
from dspy.clients.engines.stream_guard import checked_stream
from dspy.lm15 import Message, Request

from vllm_dspy_adapter.errors import ReplicaDeadError
from vllm_dspy_adapter.protocol import Generation
from vllm_dspy_adapter.lm.render import generation_to_response
from vllm_dspy_adapter.lm.stream_channel import StreamChannel, StreamTimeout
from vllm_dspy_adapter.lm.stream_events import EventAssembler
from vllm_dspy_adapter.protocol import StreamPiece

ANSWERS = [
    "[[ ## reasoning ## ]]\nParis is the capital.\n\n[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]",
    "<think>\nThe user asks 2+3. That is 5.\n</think>\n\nThe answer is 5.",
    "  <think>short</think>answer right after",
    "<think>\ncut off while still thinking",
    "",
    "<thinker> is not a think tag",
]


def _events(text: str, pieces: list[str], **kwargs) -> list:
    assembler = EventAssembler(model="vllm/m", request_id="r1", **kwargs)
    events = [assembler.start()]
    for piece in pieces:
        events += assembler.feed(piece)
    generation = Generation(text=text, finish_reason="stop", num_prompt_tokens=7, num_output_tokens=11)
    return events + assembler.end(generation)


def _split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("text", ANSWERS)
def test_any_split_streams_the_same_answer_as_the_whole_path(text):
    """Whatever the piece boundaries (tags cut in half included), the assembled
    stream equals the non-streamed Response, and it passes DSPy's stream guard."""
    whole = generation_to_response(Generation(text=text, finish_reason="stop", num_prompt_tokens=7,
                                              num_output_tokens=11), model="vllm/m")
    rng = random.Random(hash(text) & 0xFFFF)
    for _ in range(40):
        events = list(checked_stream(iter(_events(text, _split(text, rng))), provider="vllm"))
        accumulator = StreamAccumulator(Request(model="vllm/m", messages=(Message.user("q"),)))
        for event in events:
            accumulator.push(event)
        streamed = accumulator.response()
        assert [(p.type, p.text) for p in streamed.message.parts] == [(p.type, p.text) for p in whole.message.parts]
        assert streamed.finish_reason == "stop" and streamed.usage.output_tokens == 11
        assert not any("think>" in (getattr(e.delta, "text", "") or "") for e in events if e.type == "delta")


def test_reasoning_arrives_before_the_answer_in_pieces():
    pieces = ["<think>", "\nstep one, ", "step two", "\n</thi", "nk>\n\n", "Five", "."]
    events = _events("".join(pieces), pieces)
    kinds = [(e.delta.type, e.delta.text) for e in events if e.type == "delta"]
    assert kinds == [("thinking", "step one,"), ("thinking", " step two"), ("text", "Five"), ("text", ".")]


def test_template_that_opens_the_think_block_in_the_prompt():
    events = _events("I think.</think>Yes.", ["I think.", "</think>Yes."], starts_in_thinking=True)
    assert [(e.delta.type, e.delta.text) for e in events if e.type == "delta"] == [("thinking", "I think."),
                                                                                    ("text", "Yes.")]


def test_channel_batches_ready_pieces_and_ends_with_the_generation():
    channel = StreamChannel()
    for word in ("a", "b", "c"):
        channel.put(StreamPiece(word, 1))
    assert [p.text for p in channel.get(timeout=1)] == ["a", "b", "c"]  # one wake-up for three pieces
    generation = Generation(text="abc", finish_reason="stop", num_prompt_tokens=1, num_output_tokens=3)
    channel.finish(generation)
    channel.fail(RuntimeError("ignored: the stream already ended"))
    [end] = channel.get(timeout=1)
    assert StreamChannel.is_end(end) and channel.outcome() is generation
    assert channel.first_piece_sent


def test_channel_wait_has_a_deadline_and_errors_reach_the_consumer():
    channel = StreamChannel()
    started = time.monotonic()
    with pytest.raises(StreamTimeout):
        channel.get(timeout=0.2)
    assert time.monotonic() - started < 2
    assert not channel.first_piece_sent
    threading.Timer(0.1, channel.fail, args=(ReplicaDeadError("replica 1 died"),)).start()
    [end] = channel.get(timeout=5)
    with pytest.raises(ReplicaDeadError, match="replica 1 died"):
        channel.outcome()


def test_async_consumers_wait_on_their_loop_without_threads():
    channels = [StreamChannel() for _ in range(32)]

    def produce():
        for step in range(5):
            for channel in channels:
                channel.put(StreamPiece(f"{step},", 1))
            time.sleep(0.01)
        for channel in channels:
            channel.finish(Generation(text="", finish_reason="stop", num_prompt_tokens=1, num_output_tokens=5))

    async def consume(channel):
        text = ""
        while True:
            for item in await channel.aget(timeout=5):
                if StreamChannel.is_end(item):
                    return text
                text += item.text

    async def main():
        threads_before = threading.active_count()
        producer = threading.Thread(target=produce)
        producer.start()
        texts = await asyncio.gather(*(consume(c) for c in channels))
        producer.join()
        return texts, threads_before

    texts, _ = asyncio.run(main())
    assert texts == ["0,1,2,3,4,"] * 32

    async def late():
        with pytest.raises(StreamTimeout):
            await StreamChannel().aget(timeout=0.1)

    asyncio.run(late())
