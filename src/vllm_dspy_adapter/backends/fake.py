"""Replicas with no engine: the seam for testing a DSPy program, the LM classes or the
pool with no model and no vLLM (as httpx ships ``MockTransport(handler)`` beside its
transport contract, and DSPy ``DummyLM``)::

    def handler(request):                    # a GenerationRequest: the rendered prompt, sampling, adapter
        return "[[ ## answer ## ]]\\n4\\n\\n[[ ## completed ## ]]"

    lm = vLLMOffline(backend=FakeBackend(handler))
    dspy.configure(lm=lm)

``handler(request)`` returns one of

- a ``str``: the whole answer (``finish_reason="stop"``);
- a ``Generation``: taken as it is (its ``request_id`` and ``replica`` are filled in);
- an iterable of ``str`` / ``StreamPiece``: the answer in pieces; a streamed request
  receives each piece as the handler yields it, and the answer is their concatenation;
- an exception (returned or raised): the request fails with it, as an engine's error would
  (``PromptTooLongError``, ``UnsupportedInputError``, ``ReplicaDeadError``, ...).

Every answer names the adapter the request carried (``Generation.adapter``) unless the
handler's own ``Generation`` says otherwise. Requests run on the replica's own threads,
several at once (a handler may block, as an engine batches); a cancelled request's
late answer is dropped and ``aborted`` lists it. ``handler=None``: requests are held until
the test answers them (``finish_all``, ``reply_from``, ``crash``), for tests of the pool.

``FakeReplica`` runs the real ``ReplicaHandle`` (ids, incarnations, the one death path,
cancellation): ``crash``, ``come_back``, ``report_cache_events``; ``progressing`` decides
whether ``last_progress`` moves (the stall check); LoRA adapters load and unload as on an
engine (``adapters``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import zlib
from collections.abc import Callable, Iterable
from typing import Any, Union

from ..protocol import Generation, GenerationRequest, ModelFacts, ReplicaInfo, StreamPiece
from .base import ReplicaHandle

__all__ = ["FakeReplica", "FakeBackend", "FakeTokenizer", "Handler", "echo"]

Handler = Callable[[GenerationRequest], Union[str, Generation, Iterable[Any], BaseException]]

# The embedded default model's (SmolLM2-Instruct's) chat format: ChatML.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def echo(request: GenerationRequest, request_id: str = "") -> Generation:
    """The held fake's answer: ``echo:<prompt>``."""
    text = request.prompt if isinstance(request.prompt, str) else " ".join(map(str, request.prompt))
    return Generation(text=f"echo:{text}", finish_reason="stop", num_prompt_tokens=len(text.split()),
                      num_output_tokens=1, request_id=request_id, adapter=request.adapter)


class FakeTokenizer:
    """A tokenizer with no files: one id per whitespace-separated word (stable across
    processes), and the embedded model's chat format (ChatML). What ``FakeBackend``
    renders with when no ``tokenizer`` and no model folder is given."""

    chat_template = CHATML

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [zlib.crc32(word.encode()) % 50_000 for word in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(f"<{i}>" for i in ids)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True,
                            tools=None, **kwargs: Any) -> str:
        def text(content) -> str:
            if isinstance(content, str):
                return content
            return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))

        out = "".join(f"<|im_start|>{m['role']}\n{text(m.get('content'))}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class FakeReplica(ReplicaHandle):
    """An in-memory replica on the real handle base: with a handler, requests are
    answered on its threads; without, they wait until the test finishes them."""

    def __init__(self, index: int, on_death, handler: Handler | None = None, *, max_model_len: int = 2048,
                 modalities: tuple[str, ...] | None = None, device: str | None = None):
        super().__init__(index, device or f"fake:{index}", on_death)
        self.handler = handler
        self.max_model_len = max_model_len
        self.modalities = modalities
        self.requests: dict[str, GenerationRequest] = {}  # held (handler=None) or running
        self.served: list[GenerationRequest] = []  # every request a handler answered, in order
        self.killed = 0
        self.aborted: list[str] = []  # ids cancel() aborted
        self.progressing = True
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix=f"fake-{index}")
        self.incarnation = self._became_ready(self._info())

    def _info(self) -> ReplicaInfo:
        return ReplicaInfo(max_model_len=self.max_model_len, modalities=self.modalities)

    def submit(self, request, request_id=None, *, sink=None):
        request_id, future, incarnation = self._admit(request_id)
        if incarnation is None:
            return future
        self.requests[request_id] = request
        if self.handler is not None:
            self._pool.submit(self._run, incarnation, request_id, request, sink)
        return future

    def _run(self, incarnation: int, request_id: str, request: GenerationRequest, sink) -> None:
        try:
            result = self.handler(request)
            if isinstance(result, BaseException):
                raise result
            generation = self._answer(request_id, request, result, sink)
        except BaseException as exc:  # noqa: BLE001 - the request's own failure, delivered to its caller
            self.requests.pop(request_id, None)
            self._complete(incarnation, request_id, error=exc)
            return
        self.requests.pop(request_id, None)
        self.served.append(request)
        self._complete(incarnation, request_id, result=generation)

    def _answer(self, request_id: str, request: GenerationRequest, result, sink) -> Generation:
        if isinstance(result, Generation):
            return dataclasses.replace(result, request_id=request_id, replica=self.index)
        if isinstance(result, str):
            pieces = [result]
        else:
            pieces = [p if isinstance(p, StreamPiece) else StreamPiece(str(p), 1) for p in result]
            if sink is not None:
                for piece in pieces:
                    if request_id in self.aborted:
                        break
                    sink.put(piece)
                    self._touch()
            pieces = [p.text for p in pieces]
        text = "".join(pieces)
        prompt = request.token_ids or request.prompt
        return Generation(text=text, finish_reason="stop",
                          num_prompt_tokens=len(prompt) if isinstance(prompt, list) else len(prompt.split()),
                          num_output_tokens=max(len(pieces), len(text.split())), request_id=request_id,
                          replica=self.index, adapter=request.adapter)

    def last_progress(self) -> float:
        if self.progressing:
            self._touch()
        return super().last_progress()

    def finish_all(self) -> int:
        """Answer every held request (``echo``); returns how many."""
        requests, self.requests = self.requests, {}
        for request_id, request in requests.items():
            self._complete(self.incarnation, request_id, result=dataclasses.replace(
                echo(request, request_id), replica=self.index))
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
            self.incarnation = self._became_ready(self._info())

    def stats(self, timeout: float = 5.0):
        return {**self.base_stats(), "held": len(self.requests)}

    def _adapter_call(self, op: str, payload, timeout: float) -> None:
        """An engine's adapter load or unload: nothing to do (``adapters`` tracks it)."""

    def _kill(self) -> None:
        self.killed += 1

    def _abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.requests.pop(request_id, None)

    def _stop(self, timeout: float) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class FakeBackend:
    """The ``Backend`` contract over ``FakeReplica``s, for the LM classes' ``backend=``.

    ``handler``: see the module's docstring (None: requests are held for the test).
    ``replicas``: how many. ``tokenizer``: what prompts are rendered and counted with;
    by default the model folder's own tokenizer when ``model=`` names a local folder
    (the embedded model's files: ``resolve_model(None)``; needs ``transformers``), else
    a ``FakeTokenizer`` (the embedded model's chat format, no files, no vLLM).
    ``max_model_len`` and ``modalities`` are what the replicas report, as an engine's
    ``ReplicaInfo``. ``restarts`` counts the pool's restarts of a crashed replica."""

    def __init__(self, handler: Handler | None = None, *, replicas: int = 1, tokenizer: Any = None,
                 max_model_len: int = 2048, modalities: tuple[str, ...] | None = None):
        if isinstance(handler, int) or (handler is not None and not callable(handler)):
            raise TypeError(f"FakeBackend(handler): a callable taking a GenerationRequest, or None; got {handler!r} "
                            "(the number of replicas is replicas=N)")
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
        self.handler = handler
        self.n = replicas
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.modalities = modalities
        self.replicas: list[FakeReplica] = []
        self.restarts = 0

    def model_facts(self, model: str | None, engine_kwargs: dict[str, Any], sampling: dict[str, Any]) -> ModelFacts:
        tokenizer = self.tokenizer
        if tokenizer is None and model is not None and os.path.isdir(model):
            from ..config import ModelSpec

            tokenizer = ModelSpec(model=model, engine_kwargs=engine_kwargs).load_tokenizer()
        return ModelFacts(model=model or "fake-model", tokenizer=tokenizer or FakeTokenizer())

    def start(self, spec, on_death) -> list[FakeReplica]:
        self.replicas = [FakeReplica(i, on_death, self.handler, max_model_len=self.max_model_len,
                                     modalities=self.modalities) for i in range(self.n)]
        return list(self.replicas)

    def restart(self, replica: FakeReplica) -> None:
        self.restarts += 1
        replica.come_back()

    def shutdown(self) -> None:
        """Nothing of its own to release."""
