"""dspy.GRPO on the real CPU engine with the default model, through the public API.

1. ``dspy.GRPO`` drives ``lm.reinforce``'s job for two steps on a vLLMOffline: the
   rollouts come from the engine, each step's adapter version is loaded and the
   student switched to it, the previous version unloaded; the per-token
   log-probability of the rewarded rollouts rises against the base model more
   than that of the others (two steps cannot move a sampled reward's mean
   reliably on a 135M model; this can).
2. Two worker replicas: every version is loaded on both, the student's requests
   move to it, the old one is unloaded, and a killed replica comes back with the
   current version.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from conftest import ENGINE_KWARGS, wait_for

pytestmark = pytest.mark.engine
dspy = pytest.importorskip("dspy")
pytest.importorskip("peft")

WORD = "yes"
QUESTIONS = ["Is fire cold?", "Is the sea dry?", "Is ice hot?", "Is the sun dark?"]


class YesNo(dspy.Signature):
    """Answer the question with yes or no."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


def mean_logps(model_path, adapter_path, messages_list):
    """Mean per-token log-prob of each last (assistant) message, under the base model and the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_dspy_adapter.lora.grpo import tokenize_completion

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # float32: the checkpoint is bfloat16, which CI's AVX2 CPU multiplies on a slow fallback (minutes here)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_path).eval()
    out = {"base": [], "tuned": []}
    with torch.no_grad():
        for messages in messages_list:
            item = {"messages": messages[:-1], "completion": messages[-1]}
            ids, n_prompt = tokenize_completion(tokenizer, item, {}, 2048)
            ids_t = torch.tensor([ids])
            for key in out:
                if key == "base":
                    with model.disable_adapter():
                        logits = model(input_ids=ids_t).logits
                else:
                    logits = model(input_ids=ids_t).logits
                logp = torch.log_softmax(logits[0, :-1].float(), -1).gather(1, ids_t[0, 1:, None]).squeeze(1)
                out[key].append(float(logp[n_prompt - 1:].mean()))
    return out


def test_dspy_grpo_runs_two_steps_and_swaps_the_adapter_live(default_model, tmp_path):
    try:
        from dspy import GRPO  # a DSPy that exports it
    except ImportError:  # DSPy 3.4 exports it only from its module
        from dspy.teleprompt.grpo import GRPO

    from vllm_dspy_adapter import vLLMOffline

    records, lock = [], threading.Lock()

    def said_yes(example, prediction, trace=None):
        score = 1.0 if WORD in prediction.answer.lower() else 0.0
        with lock:
            records.append((example.question, prediction.answer, score))
        return score

    trainset = [dspy.Example(question=q).with_inputs("question") for q in QUESTIONS]
    started = time.monotonic()
    with vLLMOffline(enable_lora=True, max_lora_rank=8, max_loras=2, temperature=1.0, max_tokens=24, seed=0,
                     cache=False, **ENGINE_KWARGS) as lm:
        program = dspy.Predict(YesNo)
        program.set_lm(lm)
        base = lm.with_adapter(None)  # made while the student serves the base: stays the base (issue 35)
        optimizer = GRPO(metric=said_yes, num_threads=4, num_train_steps=2, seed=0,
                              num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=4,
                              exclude_demos=True, multitask=True,
                              train_kwargs={"learning_rate": 4e-4, "groups_per_step": 2, "adapter_name": "yes",
                                            "output_dir": str(tmp_path / "yes")})
        with dspy.context(adapter=dspy.ChatAdapter()):  # rollouts and training data in one format
            compiled = optimizer.compile(program, trainset=trainset)
            assert lm.adapter == "yes-v2"  # the student LM was switched in place
            assert [a["name"] for a in lm.adapters()] == ["yes-v2"]  # v1 unloaded once idle
            answer = compiled(question=QUESTIONS[0]).answer  # served by v2
        assert isinstance(answer, str)
        for handle, expected in ((base, None), (lm.copy(temperature=0.5), "yes-v2")):
            handle("Is fire cold?")
            response = handle.history[-1]["response"]
            assert response.provider_data["adapter"] == expected and handle.adapter == expected
        served = lm.stats()[0]["served_by"]
        assert served.get("yes-v1", 0) >= 8 and served.get("yes-v2", 0) >= 1, served  # step 2's rollouts ran on v1
        adapter_path = lm.adapters()[0]["path"]
        assert adapter_path == str(tmp_path / "yes" / "v2")
    print(f"dspy.GRPO, 2 steps: {time.monotonic() - started:.0f} s; {len(records)} scored rollouts")

    rewarded = [r for r in records if r[2] == 1.0]
    others = [r for r in records if r[2] == 0.0]
    assert rewarded and others, records  # the reward had spread to learn from
    adapter = dspy.ChatAdapter()
    messages = [adapter.format_finetune_data(YesNo, [], {"question": q}, {"answer": a})["messages"]
                for q, a, _ in rewarded + others]
    logps = mean_logps(default_model, adapter_path, messages)
    deltas = [t - b for t, b in zip(logps["tuned"], logps["base"])]
    up_rewarded = sum(deltas[:len(rewarded)]) / len(rewarded)
    up_others = sum(deltas[len(rewarded):]) / len(others)
    print(f"log-prob change per token: rewarded {up_rewarded:+.3f}, others {up_others:+.3f}")
    assert up_rewarded > 0 and up_rewarded > up_others


@pytest.mark.timeout(1500)  # two engines, two training steps and a restart on a shared 2-core machine
def test_two_replicas_swap_live_and_a_restarted_replica_gets_the_current_version(default_model, tmp_path):
    from vllm_dspy_adapter import vLLMOfflineMultiGPU

    group = [{"messages": [{"role": "user", "content": "Is fire cold?"}],
              "completion": {"role": "assistant", "content": text}, "reward": reward}
             for text, reward in (("yes", 1.0), ("no", 0.0)) * 2]
    with vLLMOfflineMultiGPU(num_replicas=2, routing="least_loaded", enable_lora=True, max_loras=2,
                             max_lora_rank=8, temperature=0.0, max_tokens=4, cache=False, **ENGINE_KWARGS) as lm:
        job = lm.reinforce({"learning_rate": 2e-4, "adapter_name": "live", "output_dir": str(tmp_path)})
        assert job.get_status()["pending_batch_ids"] == [0]
        job.step([{"batch_id": 0, "group": group}], "grpo_chat")
        assert lm.adapter == "live-v1" and sorted(lm.adapters()[0]["replicas"]) == [0, 1]

        # (Requests sent *while* a step trains, on 2 CPU cores shared by two pinned replicas and the trainer,
        # stalled past swap_timeout here: see the report; the swap alone is measured by benchmarks/grpo_bench.py.)
        job.step([{"batch_id": 1, "group": group}], "grpo_chat")
        after = lm.batch_generate([[{"role": "user", "content": "Hi"}]] * 4, progress=False, return_outputs=True,
                                  max_tokens=4)
        assert {o.adapter for o in after} == {"live-v2"}  # the student's requests moved to v2
        assert [a["name"] for a in lm.adapters()] == ["live-v2"]
        swap = job.get_status()["swap_seconds"]
        print(f"swap (load on both replicas, switch): {swap}")

        victim = lm.stats()[1]
        os.kill(victim["engine_pids"][0], signal.SIGKILL)
        assert wait_for(lambda: lm.stats()[1]["alive"] and lm.stats()[1]["restarts"] == 1, 300), lm.stats()
        assert wait_for(lambda: sorted(lm.adapters()[0]["replicas"]) == [0, 1], 60), lm.adapters()
        outputs = lm.batch_generate([[{"role": "user", "content": "Hi"}]] * 6, progress=False, return_outputs=True,
                                    max_tokens=4)
        assert {o.adapter for o in outputs} == {"live-v2"} and {o.replica for o in outputs} == {0, 1}
        job.terminate()
        assert job.get_status()["status"] == "terminated" and lm.adapter == "live-v2"
