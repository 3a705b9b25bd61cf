"""The entry point of a replica's worker process.

Each replica runs in its own process with its own GPUs (its environment is set
when it is spawned) and hosts one ``Engine``. The driver talks to it over one
duplex pipe; every reply names what it answers:

The messages are the frozen dataclasses of ``wire.py`` (``Submit``, ``Cancel``, ``AskStats``,
``AdapterCall``, ``Shutdown`` in; ``Ready``, ``Failed``, ``Done``, ``Error``, ``Pieces``,
``StatsReply``, ``Beat``, ``Dead``, ``AdapterReply`` out); anything else is a ``ProtocolError``.

A streamed request's new text goes back as ``Pieces``: one message carries the
pieces of every streamed request ready at that moment (an engine step decodes
one token for all of them at once), so a thousand concurrent streams cost one
message per step, not a thousand. A request's pieces always precede its ``Done``.

A heartbeat (``Beat(ticks, in_flight, cache_events)``) goes out every ``heartbeat_s``
seconds with the engine's pulse (``Engine.ticks``), the number of requests the engine
holds and its KV-cache events since the last beat (for ``"cache"`` routing): a frozen worker stops beating, a frozen engine stops ticking, and a worker
whose requests never reach its engine (a main thread stuck while the engine idles)
beats with nothing in flight; the driver's stall check sees all three.

While its engine starts, a worker reads nothing from the pipe, so a driver killed then
(SIGKILL, an OOM kill) would go unnoticed until the engine is up, minutes for a big model
holding its GPU: a watcher takes the worker's process group (the worker and its engine's
processes) down as soon as the driver is gone. Once ``Ready``, the pipe's EOF says it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from .wire import (TO_WORKER, AdapterCall, AdapterReply, AskStats, Beat, Cancel, Dead, Done, Error, Failed,
                   Pieces, Ready, Shutdown, Start, StatsReply, Submit, checked)

__all__ = ["serve", "PieceBatcher"]

# How long the sender waits for the rest of an engine step's pieces after the first.
_COALESCE_S = 0.002


class PieceBatcher:
    """Streamed pieces of every request, sent over the pipe in batches.

    ``sink(request_id)`` is what the engine's ``submit(sink=...)`` takes. A
    sender thread sends whatever is ready as one "pieces" message;
    ``send_after_pieces`` sends a request's last pieces before its result, under
    the same lock, so the order on the pipe is always pieces, then "done".
    """

    def __init__(self, send, name: str = "worker"):
        self._send = send
        self._lock = threading.Lock()
        self._ready = threading.Condition(threading.Lock())
        self._pending: list[tuple[str, str, int]] = []
        self._stopped = False
        self.messages = 0  # "pieces" messages sent (the batching shows as pieces per message)
        threading.Thread(target=self._run, name=f"{name}-pieces", daemon=True).start()

    class _Sink:
        def __init__(self, batcher: PieceBatcher, request_id: str):
            self.batcher, self.request_id = batcher, request_id

        def put(self, piece) -> None:
            self.batcher.add(self.request_id, piece.text, piece.num_tokens)

    def sink(self, request_id: str) -> PieceBatcher._Sink:
        return PieceBatcher._Sink(self, request_id)

    def add(self, request_id: str, text: str, num_tokens: int) -> None:
        with self._ready:
            self._pending.append((request_id, text, num_tokens))
            self._ready.notify()

    def _flush(self) -> None:  # under self._lock
        with self._ready:
            batch, self._pending = self._pending, []
        if batch:
            self.messages += 1
            self._send(Pieces(tuple(batch)))

    def send_after_pieces(self, message) -> None:
        with self._lock:
            self._flush()
            self._send(message)

    def _run(self) -> None:
        while not self._stopped:
            with self._ready:
                while not self._pending and not self._stopped:
                    self._ready.wait(1.0)
            time.sleep(_COALESCE_S)  # the rest of this engine step's pieces
            with self._lock:
                self._flush()

    def stop(self) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify()


def _orphan_watch(driver: int, started: threading.Event, name: str, poll_s: float = 0.5) -> None:
    """Until ``started``: if the driver is gone (this process re-parented), kill this
    worker's process group, the engine's processes with it."""
    while not started.wait(poll_s):
        if os.getppid() != driver:
            logging.getLogger(__name__).error("%s: the driver (pid %d) is gone while the engine starts; "
                                              "stopping the worker and its engine", name, driver)
            os.killpg(0, signal.SIGKILL)


def serve(conn, spec, name: str, log_level: int, heartbeat_s: float = 1.0) -> None:
    """Host one engine for the driver at the pipe's other end. ``spec`` None: a worker
    spawned ahead of its spec imports vLLM, then waits for ``Start`` (the driver checks
    the arguments meanwhile); an EOF instead (the check failed, the driver is gone) ends it."""
    # A process group of our own: the driver can then kill this worker together
    # with the engine processes it starts, whatever state they are in (a SIGKILLed
    # worker cannot take its children down itself). It also keeps the terminal's
    # Ctrl-C away from the engines; the driver shuts them down in order.
    driver = os.getppid()
    os.setsid()
    started = threading.Event()
    threading.Thread(target=_orphan_watch, args=(driver, started, name), name=f"{name}-orphan-watch",
                     daemon=True).start()
    if spec is None:
        from .. import vllm_api

        try:
            vllm_api.preload()
        except Exception:  # the engine's start below raises it again, with the driver listening
            pass
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if not isinstance(message, Start):
            conn.send(Failed(f"expected Start first, got {type(message).__name__}"))
            return
        spec, name, heartbeat_s = message.spec, message.name, message.heartbeat_s
    logging.basicConfig(level=log_level, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    from ..engine.engine import Engine
    from ..errors import ReplicaDeadError

    send_lock = threading.Lock()
    dying = threading.Event()

    def send(message) -> None:
        try:
            with send_lock:
                conn.send(message)
        except (BrokenPipeError, EOFError, OSError):
            dying.set()  # the driver is gone; nothing to report to

    def die(cause: str) -> None:
        # The engine core is gone: exit so the driver sees the death, resubmits
        # what we held and restarts us, whether or not a request was in flight.
        if not dying.is_set():
            dying.set()
            send(Dead(cause))
            os._exit(3)

    try:
        engine = Engine(spec, name=name, on_dead=lambda exc: die(str(exc)))
    except BaseException as exc:  # report, then exit: the driver decides what to do
        send(Failed(str(exc)))
        return

    pieces = PieceBatcher(send, name)

    def finished(request_id: str, future) -> None:
        if future.cancelled():  # the driver's caller gave up (Cancel): it waits for nothing
            return
        exc = future.exception()
        if exc is None:
            pieces.send_after_pieces(Done(request_id, future.result()))
            return
        if isinstance(exc, ReplicaDeadError) and not dying.is_set():
            # The engine died: no Error for this request. The driver would resubmit it at once,
            # maybe back here (this replica still looks alive to it until the pipe ends), and a
            # request bounced that way runs out of attempts. The pipe's end fails every request
            # the driver sent here, this one included, after the replica is marked dead.
            die(str(exc))
            return
        pieces.send_after_pieces(Error(request_id, exc))

    def adapter_call(call: AdapterCall) -> None:
        try:
            (engine.add_adapter if call.op == "add" else engine.remove_adapter)(call.payload)
            send(AdapterReply(call.call_id))
        except Exception as exc:  # noqa: BLE001 - the driver raises it to the caller
            send(AdapterReply(call.call_id, exc))

    def beat() -> None:
        try:
            while not dying.wait(heartbeat_s):
                send(Beat(engine.ticks, engine.in_flight, tuple(engine.take_cache_events())))
        except BaseException as exc:  # no heartbeat means a stall: say why and go, not silently
            die(f"the worker's heartbeat failed: {type(exc).__name__}: {exc}")

    send(Ready(engine.info()))
    started.set()  # from here on, a driver's death is the pipe's EOF
    threading.Thread(target=beat, name=f"{name}-heartbeat", daemon=True).start()
    while not dying.is_set():
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        match checked(message, TO_WORKER):  # anything else: ProtocolError, and the worker exits
            case Submit(request_id, request, streamed):
                stream = pieces.sink(request_id) if streamed else None
                engine.submit(request, request_id, sink=stream).add_done_callback(
                    lambda f, rid=request_id: finished(rid, f))
            case Cancel(request_id):
                engine.cancel(request_id)
            case AskStats(call_id):
                send(StatsReply(call_id, engine.stats()))
            case AdapterCall():  # in a thread: loading an adapter must not hold up the requests
                threading.Thread(target=adapter_call, args=(message,), daemon=True).start()
            case Shutdown():
                break
    # From here on, requests failing because the engine stops are expected: report
    # them as errors, but do not exit as for a death (the shutdown runs in order).
    dying.set()
    engine.shutdown()
    pieces.stop()
