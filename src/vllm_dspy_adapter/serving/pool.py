"""The pool: routes every request to a replica and keeps every result through
replica deaths and stalls.

- A request goes to the replica the router picks among the alive ones.
- A replica that dies (or is declared stalled) fails what it held with
  ``ReplicaDeadError``; the pool resubmits each such request to the others,
  once per death and at most ``max_attempts`` times in all, so each result is
  delivered exactly once. The dead replica is restarted in the background
  (``max_restarts`` times); when none is left, calls fail at once with
  ``NoHealthyReplicaError``.
- Stall check (``health_timeout`` seconds, None: off): a replica with requests
  in flight and no sign of progress for that long (``Replica.last_progress``: a
  tick of its engine or a reply) is declared dead: killed, its requests
  resubmitted, restarted like a crashed one.
- Several replicas on one GPU (devices ``cuda:0#0``, ``cuda:0#1``, ...): the
  router chooses among ``open_replicas`` (routing.py) only, so a GPU's next replica
  takes requests once its first holds ``spill_at`` in flight.
- After ``close()`` every call fails with ``LMClosedError``.
- LoRA adapters (``load_adapter``): loaded on every live replica or on none; a
  restarted replica gets them again before it serves them; a request for an
  adapter goes only to replicas that hold it (the router, ``AdapterRouter``
  by default with adapters, then prefers those where it is resident), and one
  for an adapter not loaded fails at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, LMClosedError, NoHealthyReplicaError, ReplicaDeadError, StreamInterruptedError
from ..lora.registry import AdapterRegistry
from ..config import ModelSpec
from ..protocol import Backend, Generation, GenerationRequest, Replica
from .pool_adapters import PoolAdapters
from .routing import SPILL_AT, ReplicaLoad, Router, open_replicas

__all__ = ["ReplicaPool", "DEFAULT_HEALTH_TIMEOUT"]

logger = logging.getLogger(__name__)

DEFAULT_HEALTH_TIMEOUT = 120.0


_job_ids = itertools.count()


@dataclass
class _Job:
    request: GenerationRequest
    future: concurrent.futures.Future
    cost: int
    attempts: int = 0
    stream: Any = None  # a lm.stream_channel.StreamChannel for a streamed request
    replica: int | None = None  # where the current attempt runs
    pin: int | None = None  # submit_group: the replica its group's first request went to (first attempt only)
    attempt_id: str = ""  # the current attempt's request id on that replica


class ReplicaPool(PoolAdapters):
    """Routes requests over replicas (see the module docstring).

    ``restart(replica)`` brings a dead replica back in place or raises; None
    means a dead replica stays dead and the pool shrinks.
    """

    def __init__(self, replicas: Sequence[Replica], router: Router, *,
                 restart: Callable[[Replica], None] | None = None, max_restarts: int = 3, max_attempts: int = 3,
                 health_timeout: float | None = DEFAULT_HEALTH_TIMEOUT, spill_at: int = SPILL_AT,
                 tokenize: Callable[[str, bool], list[int]] | None = None):
        self.replicas = list(replicas)
        self.router = _usable(router, self.replicas, tokenize)
        self._tokenize = tokenize
        self.spill_at = spill_at
        self._restart = restart
        self.max_restarts = max_restarts
        self.max_attempts = max_attempts
        self.health_timeout = health_timeout
        self._lock = threading.Lock()
        n = len(self.replicas)
        self._outstanding = [0] * n
        self._in_flight = [0] * n
        self._busy_since = [0.0] * n
        self._routed = [0] * n
        self._resubmitted = [0] * n  # requests taken from each replica by its deaths and sent again
        self._last_death = ""
        self._closed = threading.Event()
        self.adapters = AdapterRegistry()
        self._adapter_lock = threading.Lock()  # one load or unload at a time
        self._adapter_users: dict[str, int] = {}  # requests not yet answered, by adapter (retire_adapter)
        self._users_changed = threading.Condition(self._lock)
        if health_timeout is not None:
            threading.Thread(target=self._watch_stalls, name="pool-stall-check", daemon=True).start()

    @classmethod
    def start(cls, backend: Backend, spec: ModelSpec, router: Router, *, max_restarts: int = 3,
              max_attempts: int = 3, health_timeout: float | None = DEFAULT_HEALTH_TIMEOUT,
              spill_at: int = SPILL_AT, tokenizer=None) -> ReplicaPool:
        """The one start wiring: the backend starts every replica (all ready, or none left
        running), each replica's deaths go to the pool, and a pool that cannot be built
        leaves no replica behind. ``max_restarts=0``: a dead replica stays dead.
        ``tokenizer``: what cache-aware routing counts prompt tokens with (the backend's
        ``ModelFacts.tokenizer``; None: the spec's own)."""
        pools: list[ReplicaPool] = []

        def on_death(replica: Replica, cause: str) -> None:
            if pools:  # a death before the pool exists is handled by the start's error path
                pools[0].replica_died(replica, cause)

        replicas = backend.start(spec, on_death)
        try:
            logger.info("%d replica(s) ready: %s", len(replicas),
                        ", ".join(f"{r.name} in {r.info.start_seconds:.0f} s" for r in replicas))
            pools.append(cls(replicas, router, restart=backend.restart if max_restarts else None,
                             max_restarts=max_restarts, max_attempts=max_attempts, health_timeout=health_timeout,
                             spill_at=spill_at, tokenize=lambda text, chat: spec.tokenize(text, chat=chat, tokenizer=tokenizer)))
            return pools[0]
        except BaseException:  # Ctrl-C here: no replica may outlive a failed start
            for replica in replicas:
                replica.shutdown()
            raise

    # ---------------------------------------------------------------- serving

    def loads(self) -> list[ReplicaLoad]:
        with self._lock:
            return [ReplicaLoad(r.index, r.alive, self._outstanding[i], self._in_flight[i], r.share)
                    for i, r in enumerate(self.replicas)]

    def submit(self, request: GenerationRequest, sink=None, hold=None) -> concurrent.futures.Future:
        """Route one request; the future resolves to its ``Generation``. With
        ``stream`` (a ``lm.stream_channel.StreamChannel``) the replica also puts each new
        piece of text on it. A streamed request whose replica dies before its
        first piece is resubmitted like any other; after it, it fails with
        ``StreamInterruptedError`` (what was shown cannot be taken back). ``hold``: the
        ``AdapterHold`` taken when the request's adapter was chosen (``hold_chosen``),
        released with the answer."""
        return self._submit_job(request, sink, hold=hold).future

    def submit_group(self, requests: Sequence[GenerationRequest]) -> list[concurrent.futures.Future]:
        """Requests that share a prefix (``batching.group_by_prefix``): the first is routed
        by the policy, the others go to the same replica right after it (where it is
        alive and may take them), so vLLM computes the shared blocks once and the rest
        hit them. A request resubmitted after a death is routed like any other."""
        futures: list[concurrent.futures.Future] = []
        home = None
        for request in requests:
            job = self._submit_job(request, None, pin=home)
            home = job.replica if home is None else home
            futures.append(job.future)
        return futures

    def _submit_job(self, request: GenerationRequest, sink, pin: int | None = None, hold=None) -> _Job:
        job = _Job(request, concurrent.futures.Future(), 0, stream=sink, pin=pin)
        self._hold_adapter(job, hold)  # first: every way out below settles the future, which releases it
        if (self.router.wants_token_ids and request.token_ids is None and isinstance(request.prompt, str)
                and not request.images):
            try:  # here, in the caller's thread: the engine then uses these ids as they are
                request.token_ids = self._tokenize(request.prompt, request.chat)
            except Exception as exc:  # noqa: BLE001 - the caller gets it through the future
                _settle(job.future, error=exc)
                return job
        job.cost = request.estimated_output_tokens() + request.estimated_prompt_tokens() // 8
        job.future.add_done_callback(lambda f: self._caller_gave_up(job) if f.cancelled() else None)
        self._dispatch(job)
        return job

    def _caller_gave_up(self, job: _Job) -> None:
        """The caller cancelled its future (``asyncio`` cancellation of ``acall``, a stream
        closed, Ctrl-C in ``batch_generate``): abort the attempt where it runs, so no GPU
        time goes on an answer nobody waits for."""
        index, attempt_id = job.replica, job.attempt_id
        if index is None:
            return
        try:
            self.replicas[index].cancel(attempt_id)
        except Exception:  # noqa: BLE001 - cancelling is best effort; the reply is dropped anyway
            logger.debug("cancelling %s on replica %d failed", attempt_id, index, exc_info=True)

    def _dispatch(self, job: _Job) -> None:
        """Route and send one attempt of ``job``. Runs in the caller's thread and,
        for a resubmission, in whatever thread reported the death: whatever goes
        wrong fails the job's future with the error, never a callback's silent end."""
        job.attempts += 1
        try:
            self._route(job)
        except Exception as exc:  # noqa: BLE001 - the caller gets it through the future
            if isinstance(exc, (ConfigurationError, NoHealthyReplicaError, LMClosedError)):
                logger.debug("request refused: %s", exc)  # the caller's answer, not a fault of ours
            else:
                logger.exception("routing a request failed")
            _settle(job.future, error=exc)

    def _route(self, job: _Job) -> None:
        if self._closed.is_set():
            raise LMClosedError("This LM was shut down; create a new one.")
        loads = self.loads()
        if not any(load.alive for load in loads):
            raise NoHealthyReplicaError(self._no_replica_text())
        adapter = job.request.adapter
        if adapter is not None:
            loads = self._holders(adapter, loads)
        request = job.request
        prompt = request.token_ids if self.router.wants_token_ids and request.token_ids is not None else request.prompt
        with self._lock:  # routing decisions update the router's tables: one at a time
            if self.router.wants_cache_events:
                for replica in self.replicas:
                    events = replica.take_cache_events()
                    if events:
                        self.router.observe(replica.index, events)
            candidates = open_replicas(loads, self.spill_at)
            if job.pin is not None and any(load.index == job.pin for load in candidates):
                index = job.pin  # its group's first request is there: the shared blocks are too
            else:
                index = self.router.choose(prompt, candidates, adapter=adapter)
            job.pin = None
            self._outstanding[index] += job.cost
            if self._in_flight[index] == 0:
                self._busy_since[index] = time.monotonic()
            self._in_flight[index] += 1
            self._routed[index] += 1
        replica = self.replicas[index]
        job.replica, job.attempt_id = index, f"r{next(_job_ids)}"
        try:
            inner = replica.submit(job.request, job.attempt_id, sink=job.stream)
        except Exception as exc:  # a handle that raises instead of failing the future: same outcome
            inner = concurrent.futures.Future()
            inner.set_exception(exc)
        inner.add_done_callback(lambda f, i=index: self._finished(job, i, f))
        if job.future.cancelled():  # the caller gave up while this attempt was being sent
            self._caller_gave_up(job)

    def _holders(self, adapter: str, loads: list[ReplicaLoad]) -> list[ReplicaLoad]:
        """The loads with every replica that does not hold ``adapter`` marked not alive."""
        self.adapters.get(adapter)  # an adapter never loaded: ConfigurationError naming the loaded ones
        held = [dataclasses.replace(load, alive=load.alive and adapter in self.replicas[load.index].adapters)
                for load in loads]
        if not any(load.alive for load in held):
            raise NoHealthyReplicaError(f"No live replica holds adapter {adapter!r} now (a restarted replica "
                                        "loads it again before serving it); retry shortly.")
        return held

    def _no_replica_text(self) -> str:
        if len(self.replicas) == 1 and self._restart is None:
            return (f"The engine is dead ({self._last_death or 'it stopped'}); this LM cannot serve any more "
                    "calls: create a new one.")
        return f"No replica can serve this request: every replica is dead (last cause: {self._last_death})."

    def _finished(self, job: _Job, index: int, inner: concurrent.futures.Future) -> None:
        """The replica's answer to one attempt (called in the thread that delivered it)."""
        with self._lock:
            self._outstanding[index] -= job.cost
            self._in_flight[index] -= 1
        try:
            self._conclude(job, index, inner)
        except Exception as exc:  # noqa: BLE001 - never lose the request in a callback
            logger.exception("handling a replica's answer failed")
            _settle(job.future, error=exc)

    def _conclude(self, job: _Job, index: int, inner: concurrent.futures.Future) -> None:
        if inner.cancelled():
            job.future.cancel()
            return
        exc = inner.exception()
        if exc is None:
            generation: Generation = inner.result()
            generation.replica = index
            if generation.adapter != job.request.adapter:  # never hand back another model's answer
                _settle(job.future, error=ConfigurationError(
                    f"{self.replicas[index].name} ran a request for adapter {job.request.adapter!r} with "
                    f"{generation.adapter!r}; its answer was dropped."))
                return
            _settle(job.future, result=generation)
        elif not isinstance(exc, ReplicaDeadError):
            _settle(job.future, error=exc)  # the request's own fault: no other replica would do better
        elif self._closed.is_set():
            _settle(job.future, error=LMClosedError("This LM was shut down with the request in flight."))
        elif job.stream is not None and job.stream.first_piece_sent:
            _settle(job.future, error=StreamInterruptedError(
                f"The stream was cut: {exc}. Its first tokens were already delivered and a stream cannot be "
                "replayed, so it was not resubmitted; call again for a new answer."))
        elif job.future.done():
            return  # cancelled by its caller meanwhile: nothing to resubmit
        elif job.attempts < self.max_attempts:
            with self._lock:
                self._resubmitted[index] += 1
            self._dispatch(job)  # to a healthy replica: the dead one is no longer alive
        elif not any(r.alive for r in self.replicas):
            _settle(job.future, error=NoHealthyReplicaError(self._no_replica_text()))
        else:
            _settle(job.future, error=exc)

    # ------------------------------------------------------- deaths and stalls

    def replica_died(self, replica: Replica, cause: str) -> None:
        """The replicas' ``on_death``: log, forget its prefixes, restart it."""
        self._last_death = f"{replica.name}: {cause}"
        alive = sum(r.alive for r in self.replicas)
        with self._lock:
            self.router.forget(replica.index)
        if self._closed.is_set():
            return
        if self._restart is None or replica.restarts >= self.max_restarts:
            logger.error("%s died: %s. %d of %d replica(s) left.", replica.name, cause, alive, len(self.replicas))
            return
        logger.error("%s died: %s. Its requests go to the %d healthy replica(s); restarting it in the background.",
                     replica.name, cause, alive)
        threading.Thread(target=self._restart_replica, args=(replica,), daemon=True,
                         name=f"restart-{replica.index}").start()

    def _restart_replica(self, replica: Replica) -> None:
        replica.restarts += 1
        try:
            self._restart(replica)
            self._sync_adapters(replica)
            logger.warning("%s restarted (restart %d of at most %d).", replica.name, replica.restarts,
                           self.max_restarts)
        except Exception as exc:  # the replica stays dead; the pool goes on without it
            if self._closed.is_set():
                return  # shut down while restarting: nothing to report
            logger.error("%s could not be restarted: %s. %d of %d replica(s) left.", replica.name, exc,
                         sum(r.alive for r in self.replicas), len(self.replicas))

    def _watch_stalls(self) -> None:
        period = min(1.0, self.health_timeout / 4)
        while not self._closed.wait(period):
            try:
                self.check_stalls()
            except Exception:  # never let the check die: log and look again next period
                logger.exception("stall check failed")

    def check_stalls(self, now: float | None = None) -> list[int]:
        """Declare dead every alive replica with requests in flight and no
        progress for ``health_timeout`` seconds; returns their indices."""
        now = time.monotonic() if now is None else now
        stalled = []
        for i, replica in enumerate(self.replicas):
            with self._lock:
                busy, since = self._in_flight[i], self._busy_since[i]
            if not busy or not replica.alive:
                continue
            quiet = now - max(replica.last_progress(), since)
            if quiet > self.health_timeout:
                stalled.append(i)
                replica.declare_dead(f"stalled: no progress for {quiet:.0f} s with {busy} request(s) in flight "
                                     f"(health_timeout={self.health_timeout:g})")
        return stalled

    # ----------------------------------------------------------------- the rest

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for replica, load in zip(self.replicas, self.loads()):
            out.append({"replica": replica.index, "device": replica.device, "routing": self.router.name,
                        "routed": self._routed[replica.index],
                        "resubmitted": self._resubmitted[replica.index], "outstanding_tokens": load.outstanding,
                        **replica.stats()})
        return out

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Refuse new requests from now on (they fail with ``LMClosedError``)."""
        self._closed.set()


def _usable(router: Router, replicas: list[Replica], tokenize) -> Router:
    """``router``, or its fallback where it cannot work here: a policy that needs KV-cache
    events on a replica that does not report them (a Ray actor), or token ids with no
    tokeniser. The choice is logged once, here."""
    if not router.wants_cache_events and not router.wants_token_ids:
        return router
    blind = [r.name for r in replicas if router.wants_cache_events and not r.cache_events]
    if blind or (router.wants_token_ids and tokenize is None):
        fallback = router.fallback()
        why = (f"{', '.join(blind)} cannot report KV-cache events (only in-process and worker-process "
               "replicas do)" if blind else "no tokeniser was given to the pool")
        logger.warning("routing %r: %s; using %r instead", router.name, why, fallback.name)
        return fallback
    logger.info("routing %r: exact, from the KV-cache events of %d replica(s)", router.name, len(replicas))
    return router


def _settle(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a caller's future unless it is already done (its caller may cancel
    it, as ``asyncio.wrap_future`` does when the awaiting task is cancelled)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
