"""Issue 22: an LM made by ``with_adapter(name)`` answers nothing once ``name`` is unloaded.

The scenario of the issue on two fake replicas (``backend=FakeBackend(handler)``, the
public seam: the rule lives in the LM, DSPy's cache and the pool, not in vLLM), each
answer naming the adapter the request carried, ``enable_lora=True``, two adapters
(``acc-ft`` stays loaded, ``acc-b`` is unloaded), and DSPy's response cache ON (DSPy's
default; here in a temporary folder, so the test neither reads nor fills
``~/.dspy_cache``). The same refusal on a real engine: test_lora's
``test_unloaded_adapter_fails_fast``.

The root cause the issue hit: DSPy's ``execute()`` looks a call up in its
response cache *before* it reaches our engine, under the LM's ``model``, which
for an adapter LM is the adapter's label (``<base>+lora:acc-b@<digest>``). That
label stays the same after the unload (and in a later process: DSPy's disk cache
outlives it), so every call the adapter answered once is answered again from
the cache: no request reaches a replica and nothing refuses. A Predict on the
ChatAdapter whose output was cut at ``max_tokens`` shows it as "two LM calls
that ended at max_tokens" (the ChatAdapter's and the JSONAdapter fallback's,
both cache hits). ``test_*_asked_before_the_unload`` tests fail on the code of
the issue; ``test_*_fresh`` tests pin down that a new question was already
refused.

Every refusal must also happen before any replica sees the request (replica
counters unchanged), and every Generation and DSPy response must say which
adapter served it (``test_every_generation_and_response_records_the_adapter``
fails until ``Generation`` has an ``adapter`` field).
"""

from __future__ import annotations

import asyncio
import uuid

import dspy
import pytest

from fakes import adapter_folder
from vllm_dspy_adapter.backends.fake import FakeBackend

UNLOADED, KEPT = "acc-b", "acc-ft"
REFUSED = f"No adapter named '{UNLOADED}' is loaded"
MAX_TOKENS = 16


def answer_with_the_adapter(request):
    """Every answer names the model that ran it, in the ChatAdapter's format."""
    label = request.adapter or "base"
    return f"[[ ## reasoning ## ]]\nasked {label}\n\n[[ ## answer ## ]]\n{label}\n\n[[ ## completed ## ]]"


BACKEND: list[FakeBackend] = []  # the module's backend: its replicas count what they answered


def _served(lm) -> list[tuple[int, int]]:
    """Per replica: requests routed to it, answered by it."""
    return [(s["routed"], len(r.served)) for s, r in zip(lm.stats(), BACKEND[0].replicas)]


class SecretWord(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


def _predict(tuned, text, *, adapter=None, module="Predict", **config):
    settings = {"lm": tuned}
    if adapter is not None:
        settings["adapter"] = adapter()
    with dspy.context(**settings):
        return getattr(dspy, module)(SecretWord, **config)(question=text)


async def _apredict(tuned, text):
    with dspy.context(lm=tuned):
        return await dspy.Predict(SecretWord).acall(question=text)


def _request(tuned, text):
    """A chat call as DSPy 3.4 writes it (``lm(messages=[...])`` is deprecated, removed in 3.5): an
    lm15 Request, whose settings are its own ``config`` (the LM's defaults are not applied to it)."""
    from dspy.lm15 import Config, Message, Request

    return Request(model=tuned.model, messages=(Message.user(text),),
                   config=Config(max_tokens=MAX_TOKENS, temperature=0.0))


def _paths():
    """name -> call(lm, tuned, text): every way a program reaches the adapter's LM."""
    return {
        "plain call": lambda lm, tuned, text: tuned(text),
        "lm(Request)": lambda lm, tuned, text: tuned(_request(tuned, text)),
        "plain call n=2": lambda lm, tuned, text: tuned(text, n=2, temperature=0.7),
        "acall": lambda lm, tuned, text: asyncio.run(tuned.acall(text)),
        "forward": lambda lm, tuned, text: tuned.forward(text),
        "copy(temperature=)": lambda lm, tuned, text: tuned.copy(temperature=0.3)(text),
        "Predict ChatAdapter": lambda lm, tuned, text: _predict(tuned, text, adapter=dspy.ChatAdapter),
        "Predict JSONAdapter": lambda lm, tuned, text: _predict(tuned, text, adapter=dspy.JSONAdapter),
        "Predict default adapter": lambda lm, tuned, text: _predict(tuned, text),
        "Predict n=2": lambda lm, tuned, text: _predict(tuned, text, n=2),
        "ChainOfThought": lambda lm, tuned, text: _predict(tuned, text, module="ChainOfThought"),
        "Predict.acall": lambda lm, tuned, text: asyncio.run(_apredict(tuned, text)),
        "batch_generate(adapter=)": lambda lm, tuned, text: lm.batch_generate(
            [[{"role": "user", "content": text}]], adapter=UNLOADED, max_tokens=MAX_TOKENS, progress=False),
        "tuned.batch_generate": lambda lm, tuned, text: tuned.batch_generate(
            [[{"role": "user", "content": text}]], max_tokens=MAX_TOKENS, progress=False),
    }


PATHS = ["plain call", "lm(Request)", "plain call n=2", "acall", "forward", "copy(temperature=)",
         "Predict ChatAdapter", "Predict JSONAdapter", "Predict default adapter", "Predict n=2", "ChainOfThought",
         "Predict.acall", "batch_generate(adapter=)", "tuned.batch_generate"]


def _question(path: str, salt: str) -> str:
    return f"After the unload, the secret word? [{path}] ({salt})"


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def dspy_cache(tmp_path_factory):
    """DSPy's response cache on (memory and disk), in a folder of this test only."""
    old = dspy.cache
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True,
                         disk_cache_dir=str(tmp_path_factory.mktemp("dspy-cache")))
    yield dspy.cache
    dspy.cache = old


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, dspy_cache):
    """The issue's steps 1-2: load, answer through every path, unload. Yields
    (lm, tuned LM of the unloaded adapter, salt, what each path answered before)."""
    from dspy.utils.exceptions import AdapterParseError

    from vllm_dspy_adapter import vLLMOfflineMultiGPU

    BACKEND[:] = [FakeBackend(answer_with_the_adapter, replicas=2)]
    lm = vLLMOfflineMultiGPU(backend=BACKEND[0], enable_lora=True, max_loras=1, max_lora_rank=8, temperature=0.0,
                             max_tokens=MAX_TOKENS, health_timeout=None)  # cache: DSPy's default (on)
    try:
        folder = tmp_path_factory.mktemp("adapters")
        lm.load_adapter(KEPT, adapter_folder(folder, KEPT))
        tuned = lm.load_adapter(UNLOADED, adapter_folder(folder, UNLOADED))
        assert tuned.adapter == UNLOADED and tuned.model != lm.model
        salt = uuid.uuid4().hex[:8]
        # Step 1: the adapter answers, and not as the base model does.
        probe = f"Say one word. ({salt})"
        assert tuned(probe)[0] != lm(probe)[0], "the adapter answers as the base model: its weights did not apply"
        # While it is loaded, every path answers once (and DSPy caches what the LM calls return).
        before = {}
        for name, call in _paths().items():
            try:
                before[name] = call(lm, tuned, _question(name, salt))
            except AdapterParseError as exc:  # the adapter's noise cut at max_tokens: the LM calls did answer
                before[name] = exc
        # Step 2: unload; listed nowhere.
        lm.unload_adapter(UNLOADED)
        assert [a["name"] for a in lm.adapters()] == [KEPT]
        assert sorted(lm.adapters()[0]["replicas"]) == [0, 1], lm.adapters()  # KEPT still on both
        yield lm, tuned, salt, before
    finally:
        lm.shutdown()


def _assert_refused(lm, call, what: str) -> None:
    """``call()`` fails with the unload refusal, and no replica saw the request."""
    served = _served(lm)
    try:
        out = call()
    except Exception as exc:  # noqa: BLE001 - checked below
        where = " (no request reached a replica: an answer from DSPy's response cache)" if _served(lm) == served else ""
        assert REFUSED in str(exc), (f"{what}: failed, but not with the unload refusal{where}: "
                                     f"{type(exc).__name__}: {str(exc)[:300]}")
        assert _served(lm) == served, f"{what}: the refused request reached a replica: {served} -> {_served(lm)}"
        return
    after = _served(lm)
    where = ("no request reached a replica: DSPy's response cache answered" if after == served
             else f"replicas (routed, served, failed) {served} -> {after}")
    raise AssertionError(f"{what}: answered after {UNLOADED!r} was unloaded ({where}): {str(out)[:200]!r}")


# ---------------------------------------------------------------------------- tests

@pytest.mark.parametrize("path", PATHS)
def test_every_path_refuses_a_question_asked_before_the_unload(scenario, path):
    """The issue's step 4: what the adapter answered once must not come back (from
    DSPy's cache, under the adapter's label) once the adapter is unloaded."""
    lm, tuned, salt, _ = scenario
    _assert_refused(lm, lambda: _paths()[path](lm, tuned, _question(path, salt)), f"{path} (asked before)")


@pytest.mark.parametrize("path", PATHS)
def test_every_path_refuses_a_fresh_question(scenario, path):
    lm, tuned, _, _ = scenario
    _assert_refused(lm, lambda: _paths()[path](lm, tuned, _question(path, uuid.uuid4().hex)), f"{path} (fresh)")


def test_the_issue_scenario_predict_after_unload(scenario):
    """Step 4 verbatim: Predict(SecretWord) under dspy.context(lm=tuned) on the
    question it answered while the adapter was loaded: refused, and no LM call is
    recorded as answered."""
    lm, tuned, salt, _ = scenario
    text = _question("Predict default adapter", salt)
    answered = len(tuned.history)
    _assert_refused(lm, lambda: _predict(tuned, text), "Predict(SecretWord)")
    assert len(tuned.history) == answered, [h.get("outputs") for h in tuned.history[answered:]]


def test_the_kept_adapter_and_the_base_still_answer(scenario):
    lm, _, salt, _ = scenario
    kept = lm.with_adapter(KEPT).copy(cache=False)
    served = sum(r[1] for r in _served(lm))
    assert KEPT in kept(f"Say one word. ({salt}-kept)")[0]
    assert "base" in lm.copy(cache=False)(f"Say one word. ({salt}-base)")[0]
    assert sum(r[1] for r in _served(lm)) == served + 2


def test_every_generation_and_response_records_the_adapter_that_served_it(scenario):
    """Expected to fail until ``Generation`` has an ``adapter`` field (what the
    engine applied) and DSPy responses carry it in ``provider_data``: today nothing
    records which model answered, so a request answered by another model than the
    one asked for cannot be told from a right one."""
    from vllm_dspy_adapter.protocol import Generation

    lm, _, salt, _ = scenario
    fields = getattr(Generation, "__dataclass_fields__", {})
    assert "adapter" in fields, ("Generation has no 'adapter' field: which adapter served a request is not "
                                 f"recorded (fields: {sorted(fields)})")
    kept_out = lm.batch_generate([f"one ({salt})", f"two ({salt})"], adapter=KEPT, return_outputs=True,
                                 progress=False, max_tokens=4)
    base_out = lm.batch_generate([f"three ({salt})"], return_outputs=True, progress=False, max_tokens=4)
    assert [g.adapter for g in kept_out] == [KEPT, KEPT]
    assert [g.adapter for g in base_out] == [None]

    kept = lm.with_adapter(KEPT).copy(cache=False)
    kept(f"Say one word. ({salt}-record)")
    base = lm.copy(cache=False)
    base(f"Say one word. ({salt}-record-base)")
    for llm, expected in ((kept, KEPT), (base, None)):
        responses = llm.history[-1]["response"]
        responses = responses if isinstance(responses, (list, tuple)) else [responses]
        data = [getattr(r, "provider_data", None) or {} for r in responses]
        assert all("adapter" in d for d in data), f"responses' provider_data do not say which adapter served: {data}"
        assert [d["adapter"] for d in data] == [expected] * len(data), data


def test_a_shut_down_lm_answers_nothing_from_the_cache(scenario):
    """Last (it shuts the module's LM down): after shutdown() every call fails with
    LMClosedError (vLLMOffline's docstring), a call DSPy has cached too."""
    lm, _, salt, _ = scenario
    base = lm.copy()
    text = f"Say one word. ({salt}-closed)"
    base(text)  # cached under the base label
    lm.shutdown()
    with pytest.raises(Exception, match="shut down"):
        base(text)
