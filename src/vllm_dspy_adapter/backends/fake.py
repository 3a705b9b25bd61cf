"""A replica with no engine, for tests of the pool and of anything built on the
``Replica`` contract (as httpx ships ``MockTransport`` beside its transport contract).

``FakeReplica`` runs the real ``ReplicaHandle`` (ids, incarnations, the one death path,
cancellation) and keeps each request until the test answers it: ``finish_all``,
``reply_from`` (a reply of a given incarnation: late replies are dropped), ``crash``,
``come_back``, ``report_cache_events``; ``progressing`` decides whether ``last_progress`` moves (the stall check);
``aborted`` lists what ``cancel`` aborted. Answers echo the prompt (``echo``).
"""

from __future__ import annotations

from ..protocol import Generation, GenerationRequest, ReplicaInfo
from .base import ReplicaHandle

__all__ = ["FakeReplica", "FakeBackend", "echo"]


def echo(request: GenerationRequest, request_id: str) -> Generation:
    """The fake's answer: ``echo:<prompt>``."""
    text = request.prompt if isinstance(request.prompt, str) else " ".join(map(str, request.prompt))
    return Generation(text=f"echo:{text}", finish_reason="stop", num_prompt_tokens=len(text.split()),
                      num_output_tokens=1, request_id=request_id, adapter=request.adapter)


class FakeReplica(ReplicaHandle):
    """An in-memory replica on the real handle base: requests wait until the test
    finishes them; ``progressing`` decides whether ``last_progress`` moves."""

    def __init__(self, index: int, on_death):
        super().__init__(index, f"fake:{index}", on_death)
        self.requests: dict[str, GenerationRequest] = {}
        self.killed = 0
        self.aborted: list[str] = []  # ids cancel() aborted
        self.progressing = True
        self.incarnation = self._became_ready(ReplicaInfo(max_model_len=2048))

    def submit(self, request, request_id=None, *, sink=None):
        request_id, future, incarnation = self._admit(request_id)
        if incarnation is not None:
            self.requests[request_id] = request
        return future

    def last_progress(self) -> float:
        if self.progressing:
            self._touch()
        return super().last_progress()

    def finish_all(self) -> int:
        requests, self.requests = self.requests, {}
        for request_id, request in requests.items():
            self._complete(self.incarnation, request_id, result=echo(request, request_id))
        return len(requests)

    def reply_from(self, incarnation: int, request_id: str, request: GenerationRequest) -> None:
        self._complete(incarnation, request_id, result=echo(request, request_id))

    def report_cache_events(self, events) -> None:
        """The engine's KV-cache events, as a real replica reports them (sets ``cache_events``)."""
        self.reports_cache_events = True
        self._add_cache_events(self.incarnation, list(events))

    def crash(self, cause: str = "crashed") -> None:
        self._died(self.incarnation, cause)

    def come_back(self) -> None:
        """A new incarnation, as a restart makes one (refused once shut down, as every backend's)."""
        with self._launching():
            self.requests = {}
            self.incarnation = self._became_ready(ReplicaInfo(max_model_len=2048))

    def stats(self, timeout: float = 5.0):
        return {**self.base_stats(), "held": len(self.requests)}

    def _kill(self) -> None:
        self.killed += 1

    def _abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.requests.pop(request_id, None)

    def _stop(self, timeout: float) -> None:
        """Nothing runs it."""


class FakeBackend:
    """The ``Backend`` contract over ``FakeReplica``s: ``start`` makes ``n`` of them,
    ``restart`` brings one back (a new incarnation), ``restarts`` counts those calls."""

    def __init__(self, n: int = 2):
        self.n = n
        self.replicas: list[FakeReplica] = []
        self.restarts = 0

    def start(self, spec, on_death) -> list[FakeReplica]:
        self.replicas = [FakeReplica(i, on_death) for i in range(self.n)]
        return list(self.replicas)

    def restart(self, replica: FakeReplica) -> None:
        self.restarts += 1
        replica.come_back()

    def shutdown(self) -> None:
        """Nothing of its own to release."""
