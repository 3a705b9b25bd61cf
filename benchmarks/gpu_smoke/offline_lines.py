"""The ``vLLMOffline`` layout's first lines: an answer, ``batch_generate``, ``dspy.Evaluate``,
JSONAdapter, ``dspy.streamify``, a native tool call (methods of :class:`..smoke.Smoke`)."""

from __future__ import annotations

import json
import threading
import time

from .runner import _one_line, check


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


class OfflineLines:
    """Lines over the ``offline`` LM (``Smoke`` gives ``plan``, ``_lm``, ``_start``, ``_prompt``)."""

    def offline_answer(self) -> str:
        from vllm_dspy_adapter import vLLMOffline

        plan = self.plan
        kwargs = dict(plan.engine, enable_lora=True, max_loras=1, max_lora_rank=8, max_tokens=16)
        if plan.single_memory is not None:
            kwargs["gpu_memory_utilization"] = plan.single_memory
        start = self._start("offline", lambda: vLLMOffline(plan.model, **kwargs))
        lm = self.lms["offline"]
        out = lm(self._prompt("Say hello."))
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
            [out] = own(self._prompt("What is the weather?"), tools=tools, tool_choice="required",
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
