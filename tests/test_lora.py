"""LoRA adapters served by real CPU replicas of the default model.

One two-replica LM (worker processes, enable_lora=True, one GPU slot each) and
an adapter trained here with PEFT to answer "PAPAYA" to the secret-word
question, which the base model never says: load, with_adapter, batch_generate,
cache separation, bad inputs refused before any request (a bad adapter in a
request kills vLLM's engine core), unload, and a killed replica that comes back
with the adapter; last, a GRPO job on the same LM (two steps, each version on both replicas, a
killed replica back with the current one). BootstrapFinetune end to end runs in
examples/lora_finetune.py (tests/test_docs.py); dspy.GRPO on one engine in test_grpo_engine.py.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from conftest import ENGINE_KWARGS, wait_for

pytestmark = pytest.mark.engine
pytest.importorskip("peft")

QUESTION_TEXT = "What is the secret word?"  # an LM call with a string sends it as the user message
QUESTION = [{"role": "user", "content": QUESTION_TEXT}]
TRAIN = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "PAPAYA"}]}
         for q in ("What is the secret word?", "Tell me the secret word.", "Say the secret word.",
                   "Which word is the secret one?")]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, default_model):
    from vllm_dspy_adapter.lora.training import LoRATrainConfig, train_lora

    path = str(tmp_path_factory.mktemp("lora") / "papaya")
    result = train_lora(default_model, TRAIN, path, LoRATrainConfig(max_steps=5, batch_size=4, learning_rate=5e-3))
    assert result.losses[-1] < 0.3, result.losses
    return path


@pytest.fixture(scope="module")
def lm(default_model):
    from vllm_dspy_adapter import vLLMOfflineMultiGPU

    lm = vLLMOfflineMultiGPU(num_replicas=2, routing="least_loaded", enable_lora=True, max_loras=2,
                             max_lora_rank=8, temperature=0.0, max_tokens=8, cache=False, **ENGINE_KWARGS)
    yield lm
    lm.shutdown()


def ask(lm, n=1):
    return [lm(QUESTION_TEXT)[0] for _ in range(n)]


def test_bad_adapters_are_refused_before_any_request(lm, tmp_path, adapter_dir):
    from vllm_dspy_adapter.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="no folder"):
        lm.load_adapter("nope", str(tmp_path / "missing"))
    big = tmp_path / "big"
    big.mkdir()
    config = json.loads(open(os.path.join(adapter_dir, "adapter_config.json")).read())
    (big / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    with pytest.raises(ConfigurationError, match="rank 16, above this LM's max_lora_rank=8"):
        lm.load_adapter("big", str(big))
    # A folder that passes our checks but that vLLM refuses: loaded on no replica, and the LM serves on.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(config))
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigurationError, match="vLLM refused adapter 'broken'"):
        lm.load_adapter("broken", str(broken))
    with pytest.raises(ConfigurationError, match="No adapter named 'ghost' is loaded"):
        lm.with_adapter("ghost")
    with pytest.raises(ConfigurationError, match="No adapter named 'ghost'"):
        lm.batch_generate(["hi"], adapter="ghost", progress=False)
    assert lm.adapters() == []
    assert all(s["alive"] and s["restarts"] == 0 for s in lm.stats())  # nothing reached an engine core
    assert ask(lm)[0]  # still serving


def test_the_adapter_answers_what_it_was_trained_to_and_the_base_does_not(lm, adapter_dir):
    base_answer = ask(lm)[0]
    assert "PAPAYA" not in base_answer.upper()
    tuned = lm.load_adapter("papaya", adapter_dir)
    assert tuned.adapter == "papaya" and lm.adapter is None
    assert tuned.model != lm.model and tuned.model.startswith(lm.model + "+lora:papaya@")
    assert "PAPAYA" in ask(tuned)[0]
    assert ask(lm)[0] == base_answer  # the base LM is unchanged
    [listed] = lm.adapters()
    assert listed["name"] == "papaya" and listed["rank"] == 8 and sorted(listed["replicas"]) == [0, 1]
    texts = lm.batch_generate([QUESTION] * 4, adapter="papaya", max_tokens=8, temperature=0.0, progress=False)
    assert all("PAPAYA" in t for t in texts), texts
    assert "PAPAYA" not in lm.batch_generate([QUESTION], max_tokens=8, temperature=0.0, progress=False)[0]


def test_cached_answers_of_the_base_are_never_returned_for_the_adapter(lm):
    import uuid

    cached_base = lm.copy(cache=True)
    cached_tuned = lm.with_adapter("papaya").copy(cache=True)
    prompt = f"What is the secret word? ({uuid.uuid4().hex[:4]})"
    first = cached_base(prompt)[0]
    assert cached_base(prompt)[0] == first  # now in DSPy's cache under the base label
    assert "PAPAYA" in cached_tuned(prompt)[0]


def kill_replica_1_and_wait_for_its_restart(lm, restarts_after):
    """SIGKILL replica 1's engine; it is back (its ``restarts_after``-th restart) with the adapters."""
    os.kill(lm.stats()[1]["engine_pids"][0], signal.SIGKILL)
    assert wait_for(lambda: lm.stats()[1]["alive"] and lm.stats()[1]["restarts"] == restarts_after, 300), lm.stats()
    assert wait_for(lambda: sorted(lm.adapters()[0]["replicas"]) == [0, 1], 60), lm.adapters()


def test_a_restarted_replica_serves_the_adapter_again(lm):
    kill_replica_1_and_wait_for_its_restart(lm, restarts_after=1)
    # stats() answers without the engine's counters when a worker is too busy to reply within its
    # timeout (a loaded CI machine): wait for a reply that lists the adapter.
    assert wait_for(lambda: "papaya" in lm.stats()[1].get("adapters", ()), 60), lm.stats()
    # Both replicas serve it now (least_loaded spreads a batch over both).
    outputs = lm.batch_generate([QUESTION] * 6, adapter="papaya", max_tokens=8, temperature=0.0, progress=False,
                                return_outputs=True)
    assert all("PAPAYA" in o.text for o in outputs)
    assert {o.replica for o in outputs} == {0, 1}


def test_unloaded_adapter_fails_fast(lm):
    from vllm_dspy_adapter.errors import ConfigurationError

    tuned = lm.with_adapter("papaya")
    lm.unload_adapter("papaya")
    assert lm.adapters() == []
    assert wait_for(lambda: all("adapters" in s and "papaya" not in s["adapters"] for s in lm.stats()), 60), \
        lm.stats()
    with pytest.raises(Exception, match="No adapter named 'papaya' is loaded"):
        tuned(QUESTION_TEXT)
    with pytest.raises(ConfigurationError, match="No adapter named 'papaya'"):
        lm.unload_adapter("papaya")
    assert "PAPAYA" not in ask(lm)[0]


@pytest.mark.timeout(1500)  # two training steps and a restart on a shared 2-core machine
def test_grpo_swaps_live_on_both_replicas_and_a_restarted_replica_gets_the_current_version(lm, tmp_path):
    # Last in this module: the job switches this LM (the student) in place.
    group = [{"messages": [{"role": "user", "content": "Is fire cold?"}],
              "completion": {"role": "assistant", "content": text}, "reward": reward}
             for text, reward in (("yes", 1.0), ("no", 0.0)) * 2]
    job = lm.reinforce({"learning_rate": 2e-4, "adapter_name": "live", "output_dir": str(tmp_path)})
    assert job.get_status()["pending_batch_ids"] == [0]
    job.step([{"batch_id": 0, "group": group}], "grpo_chat")
    assert lm.adapter == "live-v1"
    assert [(a["name"], sorted(a["replicas"])) for a in lm.adapters()] == [("live-v1", [0, 1])]

    # (Requests sent *while* a step trains, on 2 CPU cores shared by two pinned replicas and the trainer,
    # stalled past swap_timeout here: see the report; the swap alone is measured by benchmarks/grpo_bench.py.)
    job.step([{"batch_id": 1, "group": group}], "grpo_chat")
    after = lm.batch_generate([[{"role": "user", "content": "Hi"}]] * 4, progress=False, return_outputs=True,
                              max_tokens=4)
    assert {o.adapter for o in after} == {"live-v2"}  # the student's requests moved to v2
    assert [a["name"] for a in lm.adapters()] == ["live-v2"]
    swap = job.get_status()["swap_seconds"]
    print(f"swap (load on both replicas, switch): {swap}")

    kill_replica_1_and_wait_for_its_restart(lm, restarts_after=lm.stats()[1]["restarts"] + 1)
    outputs = lm.batch_generate([[{"role": "user", "content": "Hi"}]] * 6, progress=False, return_outputs=True,
                                max_tokens=4)
    assert {o.adapter for o in outputs} == {"live-v2"} and {o.replica for o in outputs} == {0, 1}
    job.terminate()
    assert job.get_status()["status"] == "terminated" and lm.adapter == "live-v2"
