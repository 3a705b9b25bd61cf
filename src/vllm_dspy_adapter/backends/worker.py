"""The entry point of a replica's worker process.

Each replica runs in its own process with its own GPUs (its environment is set
when it is spawned) and hosts one ``Engine``. The driver talks to it over one
duplex pipe; every reply names what it answers:

driver -> worker: ("submit", id, GenerationRequest) | ("stats", stats_id) | ("shutdown",)
worker -> driver: ("ready", ReplicaInfo) | ("failed", message)
                | ("done", id, Generation) | ("error", id, exception)
                | ("stats", stats_id, dict) | ("beat", engine_ticks) | ("dead", message)

A heartbeat ("beat", ticks) goes out every ``heartbeat_s`` seconds with the
engine's pulse (``Engine.ticks``): a frozen worker stops beating, a frozen engine
stops ticking, and the driver's stall check sees either.
"""

from __future__ import annotations

import logging
import os
import threading

__all__ = ["serve"]


def serve(conn, spec, name: str, log_level: int, heartbeat_s: float = 1.0) -> None:
    # A process group of our own: the driver can then kill this worker together
    # with the engine processes it starts, whatever state they are in (a SIGKILLed
    # worker cannot take its children down itself). It also keeps the terminal's
    # Ctrl-C away from the engines; the driver shuts them down in order.
    os.setsid()
    logging.basicConfig(level=log_level, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    from ..engine import Engine
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
            send(("dead", cause))
            os._exit(3)

    try:
        engine = Engine(spec, name=name, on_dead=lambda exc: die(str(exc)))
    except BaseException as exc:  # report, then exit: the driver decides what to do
        send(("failed", str(exc)))
        return

    def finished(request_id: str, future) -> None:
        exc = future.exception()
        if exc is None:
            send(("done", request_id, future.result()))
            return
        send(("error", request_id, exc))
        if isinstance(exc, ReplicaDeadError):
            die(str(exc))  # every request in flight fails the same way

    def beat() -> None:
        try:
            while not dying.wait(heartbeat_s):
                send(("beat", engine.ticks))
        except BaseException as exc:  # no heartbeat means a stall: say why and go, not silently
            die(f"the worker's heartbeat failed: {type(exc).__name__}: {exc}")

    send(("ready", engine.info()))
    threading.Thread(target=beat, name=f"{name}-heartbeat", daemon=True).start()
    while not dying.is_set():
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        kind = message[0]
        if kind == "submit":
            _, request_id, request = message
            engine.submit(request, request_id).add_done_callback(lambda f, rid=request_id: finished(rid, f))
        elif kind == "stats":
            send(("stats", message[1], engine.stats()))
        elif kind == "shutdown":
            break
    # From here on, requests failing because the engine stops are expected: report
    # them as errors, but do not exit as for a death (the shutdown runs in order).
    dying.set()
    engine.shutdown()
