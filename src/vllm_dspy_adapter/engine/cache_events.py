"""One engine's KV-cache events, read from the ZMQ socket its engine core publishes on.

With ``ModelSpec.cache_events`` the engine starts with vLLM's ``kv_events_config``
publishing on an ``ipc://`` endpoint of its own (``endpoint()``); a ``CacheEventReader``
thread subscribes to it, decodes each batch into ``protocol`` cache events
(``vllm_api.cache_event_decoder``) and hands them to ``deliver``. A gap in vLLM's
sequence numbers is delivered as ``CacheEventsLost``; so is the reader's own failure,
logged as an error: the router then stops trusting what it knew of this engine and
routes to it as the approximate policy would, never on a silently stale picture.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable

from .. import vllm_api
from ..protocol import BlocksRemoved, BlocksStored, CacheCleared, CacheEventsLost

__all__ = ["CacheEventReader", "endpoint", "to_cache_events"]

logger = logging.getLogger(__name__)

POLL_MS = 200


def endpoint() -> str:
    """A fresh ``ipc://`` endpoint, unique to one engine of this process."""
    return f"ipc://{tempfile.gettempdir()}/vllm-dspy-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def to_cache_events(decoded: list[tuple]) -> list:
    """``vllm_api.cache_event_decoder``'s tuples as ``protocol`` cache events."""
    out: list = []
    for item in decoded:
        if item[0] == "stored":
            _, hashes, parent, token_ids, block_size, adapter = item
            out.append(BlocksStored(hashes, parent, token_ids, block_size, adapter))
        elif item[0] == "removed":
            out.append(BlocksRemoved(item[1]))
        else:
            out.append(CacheCleared())
    return out


class CacheEventReader:
    """A daemon thread: subscribe to ``address``, decode, ``deliver(events)``; ``stop()`` ends it."""

    def __init__(self, address: str, deliver: Callable[[list], None], name: str = "engine"):
        self.address = address
        self.name = name
        self.batches = 0  # event batches received
        self.failure: str | None = None
        self._deliver = deliver
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-kv-events", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)  # subscribed (or failed) before the first request can run

    def _run(self) -> None:
        sock = None
        try:
            import zmq

            decode = vllm_api.cache_event_decoder()
            sock = zmq.Context.instance().socket(zmq.SUB)
            sock.setsockopt(zmq.RCVHWM, 0)  # never drop here: a dropped removal would leave a stale block
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(self.address)
            self._ready.set()
            last = None
            while not self._stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                frames = sock.recv_multipart()
                if len(frames) != 3:
                    raise ValueError(f"a KV-event message of {len(frames)} frames (expected topic, seq, payload)")
                seq = int.from_bytes(frames[1], "big", signed=True)
                if last is not None and seq != last + 1:
                    self._deliver([CacheEventsLost(f"KV-cache events {last + 1}..{seq - 1} never arrived")])
                last = seq
                self.batches += 1
                self._deliver(to_cache_events(decode(frames[2])))
        except BaseException as exc:  # noqa: BLE001 - reported below: loudly, and to the router
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.error("%s: the KV-cache event reader failed (%s); routing to this engine falls back to "
                         "what was sent to it", self.name, self.failure, exc_info=True)
            self._deliver([CacheEventsLost(f"the event reader failed: {self.failure}")])
        finally:
            self._ready.set()
            if sock is not None:
                sock.close(linger=0)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        path = self.address.removeprefix("ipc://")
        try:
            os.unlink(path)  # the engine core bound it; it is gone once the core is
        except OSError:
            pass
