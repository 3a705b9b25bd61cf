"""Fakes for the fast fault suite: logic only, never an end-to-end claim.

- ``FakeWorker``: a thread that speaks the worker's pipe protocol on a real
  ``multiprocessing`` pipe, scripted by the test (answer, hold, duplicate,
  reply late, stop beating, freeze, die, send garbage). The real
  ``ProcessReplica`` (and its reader thread) drives it through ``launch=``.
- ``FakeReplica``: the package's public fake (``backends/fake.py``), an in-memory
  replica on the real ``ReplicaHandle`` base, for the pool's own logic.
"""

from __future__ import annotations

import json
import multiprocessing
import threading

from vllm_dspy_adapter.backends.fake import FakeReplica, echo  # noqa: F401 - the public fake, re-exported
from vllm_dspy_adapter.config import ModelSpec
from vllm_dspy_adapter.backends.placement import Placement
from vllm_dspy_adapter.backends.wire import (TO_WORKER, AdapterCall, AdapterReply, AskStats, Beat, Cancel, Done,
                                             Failed, Pieces, Ready, Shutdown, StatsReply, Submit, checked)
from vllm_dspy_adapter.protocol import GenerationRequest, ReplicaInfo

SPEC = ModelSpec(model="/nonexistent/fake-model")


generation = echo  # the answer every fake gives


def adapter_folder(root, name: str) -> str:
    """A folder that passes the adapter checks (config, rank, weights file); fakes never read the weights."""
    folder = root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (folder / "adapter_model.safetensors").write_bytes(name.encode())
    return str(folder)


class FakeProcess:
    """Stands in for ``multiprocessing.Process``: the worker is a thread. ``pid``: None,
    or a number no real process has (above Linux's largest pid) when the launcher gives one."""

    def __init__(self, worker: FakeWorker, pid: int | None = None):
        self.worker = worker
        self.exitcode = None
        self.pid = pid
        self.joins = 0  # join() calls on this process

    def is_alive(self) -> bool:
        return self.worker.thread.is_alive() and not (self.worker.killed and self.worker.linger_s)

    def join(self, timeout=None) -> None:
        self.joins += 1
        if self.worker.killed and self.worker.linger_s:  # killed: gone, though its pipe's end comes later
            self.exitcode = -9
            return
        self.worker.thread.join(timeout)
        if not self.worker.thread.is_alive() and self.exitcode is None:
            self.exitcode = self.worker.exit_code

    def kill(self) -> None:
        self.worker.killed = True
        if self.worker.linger_s:
            # The driver's reader sees the pipe's end a moment later (a busy machine schedules
            # it after the pool has already launched the restart).
            threading.Timer(self.worker.linger_s, self.worker.stop, args=("killed",)).start()
        else:
            self.worker.stop("killed")


class FakeWorker:
    """One incarnation of a worker. ``mode`` decides what it does with requests:
    "answer" (at once), "hold" (keep them; ``release()`` answers), "duplicate"
    (answer twice), "lose" (receive them, never answer: a worker whose engine
    idles while its requests are stuck). ``beating`` / ``ticking`` drive the heartbeat."""

    def __init__(self, conn, heartbeat_s: float, *, mode: str = "answer", fail_start: str | None = None,
                 stats_delay: float = 0.0, start_gate: threading.Event | None = None, linger_s: float = 0.0):
        self.conn = conn
        self.linger_s = linger_s  # killed: the pipe closes this much later
        self.heartbeat_s = heartbeat_s
        self.mode = mode
        self.fail_start = fail_start
        self.stats_delay = stats_delay
        self.start_gate = start_gate  # set: the engine has started (until then: no Ready, no reading)
        self.beating = True
        self.ticking = True
        self.ticks = 0
        self.held: list[tuple[str, GenerationRequest]] = []
        self.received: list[str] = []
        self.streamed: list[str] = []  # ids of the requests submitted as streams
        self.adapter_calls: list[tuple] = []  # (op, payload) of each AdapterCall
        self.cancelled: list[str] = []  # ids of the Cancel messages received
        self.adapter_error: BaseException | None = None  # what an adapter call answers
        self.killed = False
        self.exit_code = 0
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def send(self, message) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, EOFError, BrokenPipeError):
            self.stop("the driver closed the pipe")

    def _serve(self) -> None:
        while self.start_gate is not None and not self.start_gate.wait(0.01):
            if self._stop.is_set():  # killed while its engine started
                return
        if self.fail_start:
            self.send(Failed(self.fail_start))
            self.conn.close()
            self.exit_code = 1
            return
        self.send(Ready(ReplicaInfo(max_model_len=2048, engine_pids=[])))
        threading.Thread(target=self._beat, daemon=True).start()
        while not self._stop.is_set():
            if not self.conn.poll(0.02):
                continue
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            match checked(message, TO_WORKER):
                case Submit(request_id, request, streamed):
                    if streamed:
                        self.streamed.append(request_id)
                    self.received.append(request_id)
                    if self.mode == "hold":
                        self.held.append((request_id, request))
                    elif self.mode == "lose":  # received, never handed to the engine
                        pass
                    else:
                        self.send(Done(request_id, generation(request, request_id)))
                        if self.mode == "duplicate":
                            self.send(Done(request_id, generation(request, request_id)))
                case Cancel(request_id):
                    self.cancelled.append(request_id)
                    self.held = [(rid, req) for rid, req in self.held if rid != request_id]
                case AskStats(stats_id):
                    reply = StatsReply(stats_id, {"requests": len(self.received)})
                    if self.stats_delay:
                        threading.Timer(self.stats_delay, self._send_quietly, args=(reply,)).start()
                    else:
                        self.send(reply)
                case AdapterCall(call_id, op, payload):
                    self.adapter_calls.append((op, payload))
                    if self.mode != "hold":
                        self.send(AdapterReply(call_id, self.adapter_error))
                case Shutdown():
                    break
        self.stop("exited")

    def _send_quietly(self, message) -> None:
        self.send(message)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.ticking:
                self.ticks += 1
            if self.beating:
                self._send_quietly(Beat(self.ticks, len(self.held)))

    def release(self) -> None:
        held, self.held = self.held, []
        for request_id, request in held:
            self.send(Done(request_id, generation(request, request_id)))

    def send_pieces(self, *pieces: tuple[str, str]) -> None:
        """One ``Pieces`` message, as worker.PieceBatcher sends a step's worth: (request id, text) pairs."""
        self.send(Pieces(tuple((request_id, text, 1) for request_id, text in pieces)))

    def freeze(self) -> None:
        """Like SIGSTOP of the worker: no beat, no reply, pipe still open."""
        self.beating = False
        self.mode = "hold"

    def stop(self, why: str) -> None:
        if not self._stop.is_set():
            self._stop.set()
            try:
                self.conn.close()  # the driver's reader sees EOF: the worker is gone
            except OSError:
                pass


class FakeLauncher:
    """``launch=`` for ``ProcessReplica``: every (re)start makes a new ``FakeWorker``
    with the settings the test set for that replica's next start."""

    def __init__(self, *, pid_base: int | None = None, **defaults):
        self.defaults = defaults
        self.pid_base = pid_base  # set: each worker gets pid_base + its launch number
        self.launched = 0
        self.next: dict[int, dict] = {}
        self.workers: dict[int, list[FakeWorker]] = {}
        self.lock = threading.Lock()

    def __call__(self, spec, placement: Placement, name: str, heartbeat_s: float):
        parent, child = multiprocessing.Pipe(duplex=True)
        with self.lock:
            settings = {**self.defaults, **self.next.pop(placement.index, {})}
            worker = FakeWorker(child, heartbeat_s, **settings)
            self.workers.setdefault(placement.index, []).append(worker)
            self.launched += 1
            pid = None if self.pid_base is None else self.pid_base + self.launched
            worker.process = FakeProcess(worker, pid)
        return worker.process, parent

    def current(self, index: int) -> FakeWorker:
        return self.workers[index][-1]


def placements(n: int) -> list[Placement]:
    return [Placement(i, f"fake:{i}") for i in range(n)]
