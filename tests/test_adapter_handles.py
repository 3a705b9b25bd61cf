"""Which model an LM handle serves while its parent switches adapters (issue 35), on fake
replicas (``backend=FakeBackend(handler)``: no model, no vLLM).

1. ``with_adapter(name)`` (None included) is pinned to that model whatever its parent does
   later; only the parent and its plain copies (``lm.copy(...)``, DSPy's rollout copies)
   follow ``switch_adapter``. Checked through each response's ``provider_data["adapter"]``
   (what the replica ran the request with).
2. A swap (load the new version, switch, retire the old one) never fails a call in flight:
   a request holds its version from the moment it is chosen until its answer, and the
   retirement waits for it.
"""

from __future__ import annotations

import threading

import pytest

from fakes import adapter_folder
from vllm_dspy_adapter import vLLMOfflineMultiGPU
from vllm_dspy_adapter.backends.fake import FakeBackend
from vllm_dspy_adapter.protocol import GenerationRequest

dspy = pytest.importorskip("dspy")


def fake_lm():
    """The real LM class over two fake replicas (the public seam) with LoRA on: every
    request is answered at once, and its Generation names the adapter it carried."""
    return vLLMOfflineMultiGPU(backend=FakeBackend(lambda request: "ok", replicas=2), routing="round_robin",
                               health_timeout=None, cache=False, enable_lora=True, max_lora_rank=8, max_loras=2)


def served_by(llm, prompt: str):
    """The adapter the replica ran ``llm``'s call with, from the response's provider_data."""
    llm(prompt)
    return llm.history[-1]["response"].provider_data["adapter"]


@pytest.fixture
def lm():
    lm = fake_lm()
    yield lm
    lm.shutdown()


# ------------------------------------------------------------ 1. handles keep their model

def test_with_adapter_is_pinned_and_only_the_student_and_its_plain_copies_follow_a_switch(lm, tmp_path):
    base = lm.with_adapter(None)  # made while lm serves the base: the handle
    follower = lm.copy(temperature=0.5)  # a plain copy (DSPy's rollout copies): follows lm
    v1 = lm.load_adapter("t-v1", adapter_folder(tmp_path, "v1"))
    lm.switch_adapter("t-v1")  # what a GRPO run does to its student
    pinned_v1 = lm.with_adapter("t-v1")  # made while lm serves t-v1
    pinned_v1_copy = pinned_v1.copy(temperature=0.3)  # a copy of a pinned LM follows it: t-v1
    base_again = lm.with_adapter(None)  # made while lm serves t-v1
    assert [served_by(x, f"a{i}") for i, x in enumerate((lm, follower, base, v1, pinned_v1))] == \
        ["t-v1", "t-v1", None, "t-v1", "t-v1"]

    lm.load_adapter("t-v2", adapter_folder(tmp_path, "v2"))
    lm.switch_adapter("t-v2")
    handles = {"lm": lm, "follower": follower, "base": base, "v1": v1, "pinned_v1": pinned_v1,
               "pinned_v1_copy": pinned_v1_copy, "base_again": base_again}
    assert {k: served_by(x, f"b-{k}") for k, x in handles.items()} == {
        "lm": "t-v2", "follower": "t-v2", "base": None, "v1": "t-v1", "pinned_v1": "t-v1",
        "pinned_v1_copy": "t-v1", "base_again": None}
    assert {k: x.adapter for k, x in handles.items()} == {
        "lm": "t-v2", "follower": "t-v2", "base": None, "v1": "t-v1", "pinned_v1": "t-v1",
        "pinned_v1_copy": "t-v1", "base_again": None}
    assert base.model == lm.with_adapter(None).model != lm.model  # the base label, not the student's

    lm.switch_adapter(None)  # back to the base: the pinned handles stay where they were
    assert [served_by(x, f"c{i}") for i, x in enumerate((lm, follower, pinned_v1))] == [None, None, "t-v1"]


def test_copy_with_the_model_it_serves_is_pinned_too(lm, tmp_path):
    lm.load_adapter("t-v1", adapter_folder(tmp_path, "v1"))
    lm.switch_adapter("t-v1")
    same = lm.copy(model=lm.model)  # DSPy's lm.finetune passes copy(model=...) too
    lm.switch_adapter(None)
    assert served_by(same, "q") == "t-v1" and served_by(lm, "q2") is None


# ------------------------------------------------------------ 2. swaps never fail a call

class Progress:
    """A counter to wait on (with a deadline), instead of polling."""

    def __init__(self):
        self.count, self.changed = 0, threading.Condition()

    def add(self) -> None:
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def reach(self, n: int, timeout: float = 30.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.count >= n, timeout)


def test_a_call_whose_version_was_read_before_the_swap_holds_it_until_its_answer(lm, tmp_path, monkeypatch):
    # The window of the issue, widened: each call stops after its adapter version was read
    # (DSPyEngine reads it just before pool.submit) and before the pool routes it. The swap
    # (load v2, switch, retire v1) runs while all are stopped there; on the old code the
    # retirement saw v1 idle, unloaded it, and the calls failed "No adapter named 't-v1'".
    lm.load_adapter("t-v1", adapter_folder(tmp_path, "v1"))
    lm.switch_adapter("t-v1")
    stopped, go = Progress(), threading.Event()
    original = GenerationRequest.estimated_output_tokens

    def stop_here(request):  # called by the pool's submit, once per request, before routing
        if request.adapter == "t-v1":
            stopped.add()
            assert go.wait(30)
        return original(request)

    monkeypatch.setattr(GenerationRequest, "estimated_output_tokens", stop_here)
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = served_by(lm.copy(), f"in flight {i}")
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    callers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in callers:
        thread.start()
    assert stopped.reach(4), "the calls did not reach the pool"
    runtime = lm.engine.runtime
    lm.load_adapter("t-v2", adapter_folder(tmp_path, "v2"))
    lm.switch_adapter("t-v2")
    assert runtime.pool.adapter_users("t-v1") == 4  # held since their version was read
    assert runtime.retire_adapter("t-v1", timeout=0.2) is False  # still held at the deadline: left loaded
    assert "t-v1" in [a["name"] for a in lm.adapters()]
    retired: list[bool] = []
    retiring = threading.Thread(target=lambda: retired.append(runtime.retire_adapter("t-v1", timeout=30)))
    retiring.start()
    go.set()
    for thread in callers + [retiring]:
        thread.join(30)
    assert results == {i: "t-v1" for i in range(4)}  # every call answered, by the version it was sent with
    assert retired == [True] and [a["name"] for a in lm.adapters()] == ["t-v2"]
    assert served_by(lm, "after") == "t-v2"


def test_swaps_under_load_fail_no_call_and_every_answer_names_a_version_loaded_when_sent(lm, tmp_path):
    versions = 6
    lm.load_adapter("t-v1", adapter_folder(tmp_path, "v1"))
    lm.switch_adapter("t-v1")
    done, stop = Progress(), threading.Event()
    answers: list[tuple[int, object, int]] = []  # (version before the call, answer, version after)
    number = lambda name: int(name.rsplit("-v", 1)[1])  # noqa: E731

    def caller(i: int) -> None:
        student = lm.copy()  # follows lm, as DSPy's rollout copies do
        k = 0
        while not stop.is_set():
            before = number(student.adapter)
            try:
                answer = served_by(student, f"load {i} {k}")
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                answer = exc
            answers.append((before, answer, number(student.adapter)))
            done.add()
            k += 1

    callers = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(6)]
    for thread in callers:
        thread.start()
    runtime = lm.engine.runtime
    for version in range(2, versions + 1):
        assert done.reach(done.count + 12), "the callers made no progress"  # calls in flight on the old version
        lm.load_adapter(f"t-v{version}", adapter_folder(tmp_path, f"v{version}"))
        lm.switch_adapter(f"t-v{version}")
        assert runtime.retire_adapter(f"t-v{version - 1}", timeout=30) is True
    assert done.reach(done.count + 12)
    stop.set()
    for thread in callers:
        thread.join(30)
    failed = [a for a in answers if isinstance(a[1], Exception)]
    assert not failed, failed[:3]
    assert all(before <= number(answer) <= after for before, answer, after in answers), answers
    assert {number(a) for _, a, _ in answers} == set(range(1, versions + 1))
    assert [a["name"] for a in lm.adapters()] == [f"t-v{versions}"]


def test_a_batch_holds_its_version_until_its_last_answer_while_a_swap_retires_it(tmp_path):
    """batch_generate reads its LM's adapter and holds it in one step, until the batch is done:
    a swap meanwhile waits to retire the old version, and every answer names it."""
    release = threading.Event()
    arrived = threading.Semaphore(0)

    def handler(request):
        arrived.release()
        release.wait(10)
        return "ok"

    with vLLMOfflineMultiGPU(backend=FakeBackend(handler, replicas=2), routing="round_robin", health_timeout=None,
                             cache=False, enable_lora=True, max_lora_rank=8, max_loras=2) as lm:
        lm.load_adapter("t-v1", adapter_folder(tmp_path, "v1"))
        lm.switch_adapter("t-v1")
        out: list = []
        batch = threading.Thread(target=lambda: out.extend(lm.batch_generate(
            [f"p{i}" for i in range(8)], progress=False, return_outputs=True)))
        batch.start()
        assert all(arrived.acquire(timeout=10) for _ in range(8)), "the batch did not reach the replicas"
        runtime = lm.engine.runtime
        lm.load_adapter("t-v2", adapter_folder(tmp_path, "v2"))
        lm.switch_adapter("t-v2")
        assert runtime.pool.adapter_users("t-v1") == 9  # its 8 requests and the batch itself
        assert runtime.retire_adapter("t-v1", timeout=0.2) is False  # held: left loaded
        release.set()
        batch.join(10)
        assert [g.adapter for g in out] == ["t-v1"] * 8
        assert runtime.retire_adapter("t-v1", timeout=5) is True  # the batch is done: retired now
