"""Reinforce a DSPy program with DSPy's GRPO optimiser on your own engine: no
server, no second GPU. The replicas generate the rollouts, a LoRA is trained on
them in this process, and every new version is swapped into the running engine.

    python examples/grpo_small.py

The student is the embedded default model (SmolLM2-135M-Instruct) on vLLM; the
reward is 1 when its answer contains "yes". Two GRPO steps on a CPU take a few
minutes; on a GPU, use a real model, more steps and more rollouts.
"""

import os
import time

import dspy

try:
    from dspy import GRPO  # a DSPy that exports it
except ImportError:  # DSPy 3.4 exports it only from its module
    from dspy.teleprompt.grpo import GRPO

from vllm_dspy_adapter import vLLMOffline, visible_gpu_count


class YesNo(dspy.Signature):
    """Answer the question with yes or no."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


QUESTIONS = ["Is fire cold?", "Is the sea dry?", "Is ice hot?", "Is the sun dark?"]


def said_yes(example, prediction, trace=None) -> float:
    return 1.0 if "yes" in prediction.answer.lower() else 0.0


def main() -> None:
    if visible_gpu_count() == 0:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    trainset = [dspy.Example(question=q).with_inputs("question") for q in QUESTIONS]
    started = time.monotonic()
    # enable_lora: the engine serves the adapter versions; max_loras=2 holds the old and the new one during a swap.
    # temperature=1.0: GRPO learns from the spread of sampled answers (and the trainer uses the same temperature).
    with vLLMOffline(enable_lora=True, max_lora_rank=8, max_loras=2, temperature=1.0, max_tokens=24, cache=False,
                     max_model_len=2048, enforce_eager=True, seed=0) as lm:
        print(f"engine ready in {time.monotonic() - started:.0f} s: {lm.model}")
        program = dspy.Predict(YesNo)
        program.set_lm(lm)
        optimizer = GRPO(
            metric=said_yes, num_threads=4, num_train_steps=2, seed=0,
            num_dspy_examples_per_grpo_step=2, num_rollouts_per_grpo_step=4,
            exclude_demos=True, multitask=True,  # what DSPy's GRPO supports today
            # GRPO options (docs/LORA_GUIDE.md): learning_rate, beta, epsilon, temperature, update_interval,
            # groups_per_step (= examples per step x predictors), rank, ...; versions serve as <adapter_name>-vN.
            train_kwargs={"learning_rate": 4e-4, "groups_per_step": 2, "adapter_name": "say-yes"},
        )
        started = time.monotonic()
        with dspy.context(adapter=dspy.ChatAdapter()):  # rollouts and training data in one format
            tuned = optimizer.compile(program, trainset=trainset)
            print(f"2 GRPO steps in {time.monotonic() - started:.0f} s; the student now serves {lm.adapter!r}")
            print(f"adapters on the engine: {[a['name'] for a in lm.adapters()]}")
            print(f"after GRPO: {tuned(question=QUESTIONS[0]).answer!r}")
        assert lm.adapter == "say-yes-v2", lm.adapter
        print("grpo_small: done")


if __name__ == "__main__":
    main()
