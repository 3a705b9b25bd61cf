"""dspy.GRPO on the real CPU engine with the default model, through the public API.

``dspy.GRPO`` drives ``lm.reinforce``'s job for two steps on a vLLMOffline: the
rollouts come from the engine, each step's adapter version is loaded and the
student switched to it, the previous version unloaded; the per-token
log-probability of the rewarded rollouts rises against the base model more
than that of the others (two steps cannot move a sampled reward's mean
reliably on a 135M model; this can: benchmarks/grpo_learns.py shows the reward over more steps).
The same on two worker replicas (every version loaded on both, a killed replica coming back with
the current version) runs on test_lora.py's two-replica LoRA LM.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import ENGINE_KWARGS

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
