"""The pool's LoRA adapters (a mixin of ``ReplicaPool``): load on every live replica or
on none, unload, retire once no request holds an adapter (``retire_adapter``, for
live adapter versions: GRPO; a request holds its version from the moment it is chosen,
``hold_chosen``, until its answer), and load them again on a restarted replica.

``ReplicaPool`` sets the state used here: ``replicas``, ``router``, ``adapters`` (the
registry), ``_lock`` and ``_users_changed`` (a condition on it), ``_adapter_lock``,
``_adapter_users``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import NoHealthyReplicaError, ReplicaDeadError
from ..lora.registry import AdapterSpec
from ..protocol import Replica

__all__ = ["AdapterHold", "PoolAdapters"]

logger = logging.getLogger(__name__)


class AdapterHold:
    """One request's claim on its adapter version: ``retire_adapter`` does not unload the
    version while a hold on it is not released. Released once (later calls do nothing)."""

    def __init__(self, pool: PoolAdapters, name: str):
        self.name = name
        self._pool: PoolAdapters | None = pool

    def release(self, _future=None) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        with pool._users_changed:
            pool._adapter_users[self.name] -= 1
            if not pool._adapter_users[self.name]:
                del pool._adapter_users[self.name]
                pool._users_changed.notify_all()


class PoolAdapters:
    """Adapter methods of ``ReplicaPool`` (see the module docstring)."""

    def hold_chosen(self, choose: Callable[[], tuple]) -> tuple[tuple, AdapterHold | None]:
        """Call ``choose()`` (a tuple whose first item is the adapter a request will carry,
        or None) and hold that adapter, in one step under the lock ``retire_adapter`` takes:
        a version read this way is held before any retirement can see it idle, however long
        the request takes to reach ``submit`` (``DSPyEngine`` reads its LM's adapter so,
        while a GRPO swap may switch it and retire the old one). Returns ``(chosen, hold)``;
        ``hold`` is None for the base model or an adapter not loaded (its request fails fast
        in routing). Pass ``hold`` to ``submit``, which releases it with the request's
        answer; release it yourself if the request is not submitted."""
        with self._lock:
            chosen = choose()
            return chosen, self._count_user(chosen[0])

    def _count_user(self, name: str | None) -> AdapterHold | None:
        """A hold on ``name`` (the lock held by the caller); None for the base model or an
        adapter not loaded."""
        if name is None or name not in self.adapters:
            return None
        self._adapter_users[name] = self._adapter_users.get(name, 0) + 1
        return AdapterHold(self, name)

    def _hold_adapter(self, job, hold: AdapterHold | None = None) -> None:
        """Count the request as a user of its adapter until its future is done, so that
        ``retire_adapter`` unloads the adapter only when no request holds it: ``hold``
        (taken when its version was chosen, ``hold_chosen``), else counted now, under the
        lock ``retire_adapter`` takes: a request either holds the adapter before it is
        retired, or finds it gone and fails fast in ``_route``."""
        if hold is None:
            with self._lock:
                hold = self._count_user(job.request.adapter)
        if hold is not None:
            job.future.add_done_callback(hold.release)

    def adapter_users(self, name: str) -> int:
        """Requests for adapter ``name`` submitted and not yet answered."""
        with self._lock:
            return self._adapter_users.get(name, 0)

    def retire_adapter(self, name: str, timeout: float = 60.0) -> bool:
        """Unload adapter ``name`` once no request holds it (waiting at most ``timeout``
        seconds). From the moment it is idle, new requests for it fail fast. Returns
        False, leaving it loaded, if requests still held it at the deadline."""
        deadline = time.monotonic() + timeout
        with self._users_changed:
            while self._adapter_users.get(name, 0) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._users_changed.wait(min(left, 1.0))
            if self.adapters.pop(name) is None:
                return True  # unloaded meanwhile
        with self._adapter_lock:
            self._remove_everywhere(name, timeout=max(1.0, deadline - time.monotonic()))
        return True

    def load_adapter(self, adapter: AdapterSpec, timeout: float = 300.0) -> None:
        """Load ``adapter`` on every live replica (in parallel), or on none: if one
        refuses it, it is unloaded from the others and the error raised."""
        with self._adapter_lock:
            old = self.adapters.put(adapter)  # first, so a replica restarting now loads it too
            targets = [r for r in self.replicas if r.alive]
            if not targets:
                self._restore(adapter, old)
                raise NoHealthyReplicaError("No live replica to load the adapter on.")
            errors = self._on_each(targets, lambda r: r.add_adapter(adapter, timeout=timeout), timeout)
            if errors:
                for replica in targets:  # back to what the others held before: nothing, or the old version
                    if replica.index not in errors:
                        if old is None:
                            self._quietly(replica.remove_adapter, adapter.name)
                        else:
                            self._quietly(replica.add_adapter, old)
                self._restore(adapter, old)
                first = next(iter(errors.values()))
                raise type(first)(f"Adapter {adapter.name!r} was not loaded (on no replica): " + "; ".join(
                    f"{self.replicas[i].name}: {e}" for i, e in errors.items())) from first

    def unload_adapter(self, name: str, timeout: float = 60.0) -> None:
        with self._adapter_lock:
            self.adapters.get(name)  # unknown: ConfigurationError
            self.adapters.pop(name)
            self._remove_everywhere(name, timeout)

    def _remove_everywhere(self, name: str, timeout: float) -> None:
        self._on_each([r for r in self.replicas if r.alive], lambda r: r.remove_adapter(name, timeout=timeout),
                      timeout, log_only=True)
        with self._lock:
            self.router.drop(name)

    def _restore(self, adapter: AdapterSpec, old: AdapterSpec | None) -> None:
        if old is None:
            self.adapters.pop(adapter.name)
        else:
            self.adapters.put(old)

    @staticmethod
    def _quietly(call, *args) -> None:
        try:
            call(*args)
        except Exception:  # best effort: the replica may have died meanwhile
            logger.debug("adapter cleanup failed", exc_info=True)

    def _on_each(self, replicas, call, timeout: float, *, log_only: bool = False) -> dict[int, BaseException]:
        """``call(replica)`` on every replica at once; the errors by replica index."""
        errors: dict[int, BaseException] = {}

        def run(replica) -> None:
            try:
                call(replica)
            except Exception as exc:  # noqa: BLE001 - collected and raised by the caller
                errors[replica.index] = exc

        threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in replicas]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout + 5
        for thread, replica in zip(threads, replicas):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                errors.setdefault(replica.index, ReplicaDeadError(f"{replica.name}: no answer within {timeout:g} s"))
        if log_only:
            for index, exc in errors.items():
                logger.warning("%s: %s", self.replicas[index].name, exc)
        return errors

    def _sync_adapters(self, replica: Replica) -> None:
        """Load every registered adapter on a replica that just restarted."""
        for adapter in self.adapters.all():
            if adapter.name in replica.adapters or not replica.alive:
                continue
            try:
                replica.add_adapter(adapter)
            except Exception as exc:  # it keeps serving the base model and the other adapters
                logger.error("%s: could not load adapter %r again after its restart: %s", replica.name,
                             adapter.name, exc)
