"""How an ``Engine`` stays honest about being alive, and how it stops (a mixin of
``engine.Engine``, which sets the state used here: ``name``, ``processes``, ``async_llm``,
``on_cpu``, ``ticks``, ``_dead``, ``_closing``, ``_on_dead``, ``_abandoned``, ``_tasks``,
``_loop``, ``_thread``, ``_event_reader``).

- the watchdog (``_watch``): fails every request in flight the moment an engine process dies;
- the pulse (``_probe``, ``Engine.ticks``): moves while the engine makes progress, which the
  pool's stall detection reads;
- the lifetime: ``kill``, ``shutdown``, and ``_abandon`` for a start that failed or was given up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

from .. import vllm_api
from ..errors import ReplicaDeadError

__all__ = ["EngineLifetime", "PROBE_S", "CPU_BUSY"]

# The engine's pulse (``Engine.ticks``) moves while the engine makes progress:
# - once a second the engine core is asked a trivial question (``is_sleeping``),
#   which it answers between two steps: a frozen or stuck core stops answering,
#   while a long generation, however slow, keeps it going;
# - on a CPU engine, whose single step (a large prefill on a few cores) can last
#   longer than any sensible stall deadline, each second in which its processes
#   computed (CPU time above CPU_BUSY of a core, none of them stopped) counts
#   too. Not on GPUs: a process waiting on a hung GPU may spin on a core.
PROBE_S = 1.0
CPU_BUSY = 0.05

logger = logging.getLogger(__name__)


class EngineLifetime:
    """Liveness and lifetime methods of ``Engine`` (see the module docstring)."""

    def _watch(self, processes) -> None:
        """Fail every request in flight the moment an engine process dies.

        vLLM notices a dead engine core only on some paths (a request already
        in flight); one killed between requests can leave new requests waiting
        forever. Watching the processes ourselves means nothing ever hangs.
        """
        import psutil

        gone: list = []
        cpu = self.processes.cpu_seconds() if self.on_cpu else 0.0
        try:
            while not gone and not self._closing:
                gone, _ = psutil.wait_procs(processes, timeout=PROBE_S)  # returns as soon as one exits
                if self.on_cpu and not gone:
                    cpu, before = self.processes.cpu_seconds(), cpu
                    if cpu - before >= CPU_BUSY * PROBE_S:
                        self.ticks += 1
            if self._closing:
                return
            cause = "the vLLM engine process died (" + ", ".join(
                f"pid {p.pid} exit code {p.returncode}" for p in gone) + ")"
        except Exception as exc:  # the watchdog itself failed: the engine can no longer be trusted
            cause = f"the engine watchdog failed: {type(exc).__name__}: {exc}"
        self._mark_dead(ReplicaDeadError(f"{self.name}: {cause}"))

    def _mark_dead(self, error: ReplicaDeadError) -> None:
        if self._dead is not None and self._closing:
            return
        self._dead = error
        logger.error("%s", error)
        if self._on_dead is not None:  # the replica fails what it holds first, then the tasks end
            self._on_dead(error)
        self._cancel_tasks()

    async def _probe(self) -> None:
        """The engine's pulse: ask the engine core a trivial question, once a second."""
        llm = self.async_llm
        try:
            while not self._closing:
                await vllm_api.is_sleeping(llm)
                self.ticks += 1
                await asyncio.sleep(PROBE_S)
        except Exception:  # the engine died: the watchdog reports it
            logger.debug("%s: probe stopped", self.name, exc_info=True)

    def kill(self) -> None:
        """Kill the engine's processes at once, in any state (a stopped one too);
        the watchdog then fails every request in flight and calls ``on_dead``."""
        self.processes.kill()

    def shutdown(self) -> None:
        self._closing = True
        if self._event_reader is not None:
            self._event_reader.stop()
        llm = self.async_llm
        if llm is not None:
            self._cancel_output_handler(llm)
            try:
                vllm_api.shutdown(llm)
            except Exception:  # already dead: nothing left to stop
                logger.debug("%s: shutdown raised", self.name, exc_info=True)
            # Dropped now: left to the interpreter's exit, AsyncLLM.__del__ would run its
            # shutdown again when the modules it needs are already gone.
            self.async_llm = None
            self._dead = self._dead or ReplicaDeadError(f"{self.name}: shut down")
        # What the stopped engine did not finish fails now (no caller waits forever),
        # then the loop stops.
        self._cancel_tasks()
        self._stop_loop()

    def _cancel_tasks(self) -> None:
        """End every request in flight (each then fails with ``ReplicaDeadError``)."""

        def cancel() -> None:
            for task in list(self._tasks.values()):
                task.cancel()

        if self._loop.is_running():
            self._loop.call_soon_threadsafe(cancel)

    def _abandon(self, start: concurrent.futures.Future) -> None:
        """Stop a start that failed or that the caller gave up on, with every engine
        process it launched (vLLM's own cleanup can hang behind a crashed worker)."""
        self._abandoned = True
        deadline = time.monotonic() + 60
        while not start.done() and time.monotonic() < deadline:
            # Killing the engine core makes vLLM's startup wait raise, which frees the loop.
            self.processes.kill_launched(self.name)
            try:
                start.result(timeout=1.0)
            except BaseException:
                pass
        self.processes.kill_launched(self.name)
        self._stop_loop()

    def _cancel_output_handler(self, llm) -> None:
        """vLLM stops its engine core before it cancels its output handler, which then
        reports the stop as an engine failure (an ERROR traceback in the log) whenever
        a request is in flight. Cancelling the handler first keeps a shutdown quiet;
        the requests it would have ended are failed by ``shutdown``."""
        handler = vllm_api.output_handler(llm)
        if handler is None or not self._loop.is_running():
            return

        async def cancel() -> None:
            handler.cancel()
            try:
                await handler
            except BaseException:  # CancelledError, or whatever it was already failing with
                pass

        try:
            asyncio.run_coroutine_threadsafe(cancel(), self._loop).result(timeout=5)
        except Exception:
            logger.debug("%s: could not cancel the output handler", self.name, exc_info=True)

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            try:  # end the loop's tasks first, so none is destroyed while pending
                asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(timeout=5)
            except Exception:
                logger.debug("%s: cancelling the loop's tasks failed", self.name, exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
