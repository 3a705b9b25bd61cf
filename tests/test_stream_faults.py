"""Streams through the replica layer, in seconds: the real pool and ProcessReplica
(and its reader) against fake workers on real pipes, and the worker's real
PieceBatcher. No vLLM; the end-to-end checks are in test_features_engine.py."""

import threading

import pytest

from fakes import FakeLauncher
from test_faults import _shutdown_pools, request, start, wait_until  # noqa: F401  (the fixture shuts the pools down)
from vllm_dspy_adapter.backends.worker import PieceBatcher
from vllm_dspy_adapter.errors import StreamInterruptedError
from vllm_dspy_adapter.lm.stream_channel import StreamChannel
from vllm_dspy_adapter.backends.wire import Done, Pieces
from vllm_dspy_adapter.protocol import StreamPiece


def _texts(channel: StreamChannel) -> str:
    out = ""
    while True:
        for item in channel.get(timeout=5):
            if StreamChannel.is_end(item):
                return out
            out += item.text


def _settle(channel, future):
    future.add_done_callback(lambda f: channel.fail(f.exception()) if f.exception() else channel.finish(f.result()))


def test_pieces_reach_the_channel_in_order_before_the_result():
    pool, launcher = start(1, launcher=FakeLauncher(mode="hold"))
    channel = StreamChannel()
    future = pool.submit(request(0), sink=channel)
    _settle(channel, future)
    worker = launcher.current(0)
    assert wait_until(lambda: worker.streamed)
    rid = worker.streamed[0]
    worker.send_pieces((rid, "Hel"))
    worker.send_pieces((rid, "lo"), ("someone-else", "dropped"))
    worker.release()
    assert _texts(channel) == "Hello"
    assert future.result(timeout=5).text == "echo:prompt 0"
    plain = pool.submit(request(1))  # a non-streamed request is sent as before
    assert wait_until(lambda: len(worker.received) == 2)
    assert worker.streamed == [rid]
    worker.release()
    plain.result(timeout=5)


def test_a_stream_cut_before_its_first_token_is_resubmitted():
    pool, launcher = start(2, launcher=FakeLauncher(mode="hold"))
    channel = StreamChannel()
    future = pool.submit(request(0), sink=channel)
    _settle(channel, future)
    first = next(i for i in (0, 1) if wait_until(lambda i=i: launcher.current(i).streamed, timeout=0.5))
    other = 1 - first
    launcher.current(first).stop("crashed")  # no piece was sent
    assert wait_until(lambda: launcher.current(other).streamed)
    worker = launcher.current(other)
    worker.send_pieces((worker.streamed[0], "fresh"))
    worker.release()
    assert _texts(channel) == "fresh"
    assert future.result(timeout=5).replica == other


def test_a_stream_cut_after_its_first_token_fails_clearly():
    pool, launcher = start(2, launcher=FakeLauncher(mode="hold"))
    channel = StreamChannel()
    future = pool.submit(request(0), sink=channel)
    _settle(channel, future)
    first = next(i for i in (0, 1) if wait_until(lambda i=i: launcher.current(i).streamed, timeout=0.5))
    worker = launcher.current(first)
    worker.send_pieces((worker.streamed[0], "half an ans"))
    assert wait_until(lambda: channel.first_piece_sent)
    worker.stop("crashed")
    with pytest.raises(StreamInterruptedError, match="cannot be replayed"):
        future.result(timeout=5)
    assert _texts(channel) == "half an ans"  # what was shown stays shown; then the stream ends in the error
    with pytest.raises(StreamInterruptedError):
        channel.outcome()
    assert not launcher.current(1 - first).streamed  # never sent again


def test_the_worker_batches_pieces_and_sends_them_before_the_result():
    sent = []
    lock = threading.Lock()

    def send(message):
        with lock:
            sent.append(message)

    batcher = PieceBatcher(send)
    sinks = [batcher.sink(f"r{i}") for i in range(100)]
    for step in range(3):  # three engine steps, one token each for 100 streams
        for sink in sinks:
            sink.put(StreamPiece(f"t{step}", 1))
    batcher.send_after_pieces(Done("r0", None))
    assert wait_until(lambda: sum(len(m.items) for m in sent if isinstance(m, Pieces)) == 300)
    messages = [m for m in sent if isinstance(m, Pieces)]
    assert len(messages) <= 4  # not 300: one message carries many streams' pieces
    done_at = next(i for i, m in enumerate(sent) if isinstance(m, Done))
    r0_pieces = [i for i, m in enumerate(sent) if isinstance(m, Pieces) and any(p[0] == "r0" for p in m.items)]
    assert max(r0_pieces) < done_at  # r0's pieces went out before its result
    batcher.stop()
