"""The reference design from the original multi-GPU guide, implemented faithfully.

N ``vllm.LLM`` instances, each on its own GPU. Because one process cannot host
LLMs on different GPUs reliably, each instance lives in its own process (spawned
with CUDA_VISIBLE_DEVICES set to its GPU) and the driver talks to it over a pipe;
the pipe costs well under a millisecond per call, nothing next to a generation.

- ``batch_generate``: the prompt list is split statically into N equal chunks,
  one thread per instance calls ``generate`` on its chunk, results are
  concatenated. We also record when each chunk finished (the "tail").
- DSPy calls: each call goes round-robin to an instance and runs
  ``generate([prompt])`` there under that instance's lock (``LLM`` is not
  thread-safe), so each instance serves one request at a time.

The guide wrote its LM as a ``dspy.BaseLM`` subclass with ``forward()``, an interface
DSPy 3.4.1 deprecates (removed in 3.5); the same per-call path is written here on DSPy
3.4's engine contract instead: a ``dspy.LM`` whose engine's ``complete(Request)`` renders
the request's messages with the chat template and runs that one generate.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from typing import Any

import dspy


def _worker(conn, model: str, engine_kwargs: dict[str, Any]) -> None:
    """One LLM instance. Messages: ("generate", prompts, sampling dicts) -> list of results."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model, **engine_kwargs)
    except BaseException as exc:  # report, then exit
        conn.send(("failed", repr(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message[0] != "generate":
            break  # "stop"
        _, prompts, samplings = message
        try:
            inputs = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
            outs = llm.generate(inputs, [SamplingParams(**s) for s in samplings], use_tqdm=False)
            conn.send(("ok", [(o.outputs[0].text, len(o.prompt_token_ids or ()), len(o.outputs[0].token_ids),
                               o.outputs[0].finish_reason) for o in outs]))
        except BaseException as exc:
            conn.send(("error", repr(exc)))
    # Stop the engine core explicitly and leave at once: vLLM's background threads
    # can otherwise hold the interpreter's exit for a minute.
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    os._exit(0)


class _Instance:
    def __init__(self, index: int, model: str, engine_kwargs: dict[str, Any], env: dict[str, str]):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, model, engine_kwargs), name=f"reference-{index}")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the spawned interpreter inherits the environment at start()
        try:
            self.process.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self.lock = threading.Lock()  # LLM is not thread-safe: one generate at a time

    def wait_ready(self, timeout: float) -> None:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.process.name} did not start in {timeout:.0f} s")
        kind, payload = self.conn.recv()
        if kind != "ready":
            raise RuntimeError(f"{self.process.name} failed to start: {payload}")

    def generate(self, prompts: list, samplings: list[dict[str, Any]]) -> list[tuple]:
        with self.lock:
            self.conn.send(("generate", prompts, samplings))
            kind, payload = self.conn.recv()
        if kind != "ok":
            raise RuntimeError(payload)
        return payload

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, EOFError):
            pass
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)


def placement_envs(n: int, on_gpu: bool) -> list[dict[str, str]]:
    """One GPU per instance; on CPU, a disjoint core set per instance."""
    if on_gpu:
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        ids = visible if len(visible) >= n else [str(i) for i in range(n)]
        return [{"CUDA_VISIBLE_DEVICES": ids[i]} for i in range(n)]
    cores = os.cpu_count() or 1
    per = max(cores // n, 1)
    envs = []
    for i in range(n):
        first = (i * per) % cores
        last = min(first + per - 1, cores - 1)
        envs.append({"VLLM_CPU_OMP_THREADS_BIND": str(first) if first == last else f"{first}-{last}",
                     "CUDA_VISIBLE_DEVICES": ""})
    return envs


class _PerCallEngine:
    """DSPy 3.4's engine contract (``complete(Request) -> Response``) over the guide's
    per-call path (``ReferenceMultiGPU.per_call``)."""

    def __init__(self, lm: "ReferenceMultiGPU"):
        self.lm = lm

    def complete(self, request):
        return self.lm.per_call(request)

    def close(self) -> None:
        pass  # the instances are the LM's: ReferenceMultiGPU.shutdown


class ReferenceMultiGPU(dspy.LM):
    """The guide's LM: one generate per call, round robin over the instances."""

    def __init__(self, model: str, num_instances: int, engine_kwargs: dict[str, Any], *, on_gpu: bool,
                 sampling: dict[str, Any] | None = None, start_timeout: float = 1800.0):
        super().__init__(model=f"reference/{os.path.basename(model.rstrip('/'))}", engine=_PerCallEngine(self),
                         cache=False)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.sampling = dict(sampling or {})
        self.instances: list[_Instance] = []
        try:
            for i, env in enumerate(placement_envs(num_instances, on_gpu)):
                self.instances.append(_Instance(i, model, engine_kwargs, env))
            for inst in self.instances:  # all spawned first, so they start in parallel
                inst.wait_ready(start_timeout)
        except BaseException:
            self.shutdown()
            raise
        self._next = itertools.count()
        self.output_tokens = 0  # counted from the engines' results
        self._count_lock = threading.Lock()

    # ----------------------------------------------------------------- DSPy path

    def per_call(self, request):
        """One DSPy call: the request's chat messages through the chat template, one generate
        on the next instance, the answer read back as DSPy reads a Chat Completions body."""
        from dspy import lm15

        text = self.tokenizer.apply_chat_template(_chat_messages(request), tokenize=False,
                                                  add_generation_prompt=True)
        sampling = {**self.sampling, **_sampling_from(request.config)}
        inst = self.instances[next(self._next) % len(self.instances)]
        (out_text, n_prompt, n_out, finish), = inst.generate([text], [sampling])
        with self._count_lock:
            self.output_tokens += n_out
        return lm15.response_from_openai_chat({
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out_text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
        }, model=request.model)

    # ---------------------------------------------------------------- batch path

    def batch_generate(self, prompts: list, samplings: list[dict[str, Any]]) -> tuple[list[tuple], list[float]]:
        """Static split into N equal contiguous chunks, one thread per instance.
        Returns the concatenated results and each chunk's finish time (monotonic)."""
        n = len(self.instances)
        bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
        results: list[Any] = [None] * n
        finished = [0.0] * n
        errors: list[BaseException] = []

        def run(i: int) -> None:
            lo, hi = bounds[i], bounds[i + 1]
            try:
                results[i] = self.instances[i].generate(prompts[lo:hi], samplings[lo:hi]) if hi > lo else []
            except BaseException as exc:
                errors.append(exc)
            finished[i] = time.monotonic()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return [r for chunk in results for r in chunk], finished

    def shutdown(self) -> None:
        threads = [threading.Thread(target=inst.close) for inst in self.instances]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.instances = []


def _chat_messages(request) -> list[dict[str, str]]:
    """An lm15 Request's system text and messages as the chat messages the guide's
    ``forward`` received (text only: the guide's LM took no other content)."""
    def text(parts) -> str:
        if any(p.type != "text" for p in parts):
            raise ValueError(f"the reference LM takes text only, not {sorted({p.type for p in parts})}")
        return "".join(p.text for p in parts)

    out = []
    if request.system is not None:
        out.append({"role": "system", "content": request.system if isinstance(request.system, str)
                    else text(request.system)})
    return out + [{"role": m.role, "content": text(m.parts)} for m in request.messages]


def _sampling_from(config) -> dict[str, Any]:
    """A DSPy call's settings (its Request's ``config``) to SamplingParams keywords (what
    the guide passed through)."""
    out = {}
    for key in ("max_tokens", "temperature", "top_p", "stop", "seed"):
        value = getattr(config, key)
        if value is not None and value != ():
            out[key] = list(value) if key == "stop" else value
    return out
