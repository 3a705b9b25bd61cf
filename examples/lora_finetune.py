"""Distil a DSPy program into a LoRA adapter with dspy.BootstrapFinetune, and serve
the adapter from the running engine at once (no restart, no server).

    python examples/lora_finetune.py

The student is the embedded default model (SmolLM2-135M-Instruct) on vLLM; it
does not know the answer. The teacher stands in for a large model (on a GPU you
would use, say, vLLMOffline("Qwen/Qwen3-8B") or the student with optimised
prompts); here a DSPy DummyLM answers, so the example needs no download.
BootstrapFinetune runs the teacher over the trainset, keeps the traces the metric
accepts, and calls lm.finetune(): our provider trains a LoRA with PEFT (a few
steps on a CPU), loads it into the engine, and returns the LM that serves it.
"""

import os
import time

import dspy
from dspy.utils.dummies import DummyLM

from vllm_dspy_adapter import vLLMOffline, visible_gpu_count


class SecretWord(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


QUESTIONS = ["What is the secret word?", "Tell me the secret word.", "Say the secret word.",
             "Which word is the secret one?"]


def said_it(example, prediction, trace=None) -> bool:
    return "PAPAYA" in prediction.answer.upper()


def main() -> None:
    if visible_gpu_count() == 0:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    trainset = [dspy.Example(question=q, answer="PAPAYA").with_inputs("question") for q in QUESTIONS]
    started = time.monotonic()
    # enable_lora: the engine serves adapters; max_lora_rank bounds their rank (train at most that).
    with vLLMOffline(enable_lora=True, max_lora_rank=8, temperature=0.0, max_tokens=32, cache=False,
                     max_model_len=2048, enforce_eager=True) as lm:
        print(f"engine ready in {time.monotonic() - started:.0f} s: {lm.model}")
        student = dspy.Predict(SecretWord)
        student.set_lm(lm)
        before = student(question=QUESTIONS[0]).answer
        print(f"before fine-tuning: {before!r}")

        teacher = dspy.Predict(SecretWord)
        teacher.set_lm(DummyLM([{"answer": "PAPAYA"}] * len(trainset)))

        optimizer = dspy.BootstrapFinetune(
            metric=said_it, num_threads=2,
            # LoRA options (rank, alpha, learning_rate, max_steps or num_train_epochs, batch_size, ...);
            # a few steps are enough for this tiny task. adapter_name names the served adapter.
            train_kwargs={"rank": 8, "max_steps": 4, "batch_size": 2, "learning_rate": 5e-3,
                          "adapter_name": "secret-word"},
        )
        started = time.monotonic()
        tuned = optimizer.compile(student, trainset=trainset, teacher=teacher)
        tuned_lm = tuned.predictors()[0].lm
        print(f"fine-tuned and loaded in {time.monotonic() - started:.0f} s: adapter {tuned_lm.adapter!r}")
        print(f"adapters on the engine: {[a['name'] for a in lm.adapters()]}")

        after = tuned(question=QUESTIONS[0]).answer
        print(f"after fine-tuning: {after!r}")
        base = dspy.Predict(SecretWord)  # compile() set the adapter LM on the student itself
        base.set_lm(lm)
        print(f"the base model still answers: {base(question=QUESTIONS[0]).answer!r}")
        assert "PAPAYA" in after.upper(), after
        print("lora_finetune: done")


if __name__ == "__main__":
    main()
