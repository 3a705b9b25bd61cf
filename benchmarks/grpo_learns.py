"""Does GRPO learn? (issue 35, item 5.) A task the embedded model can learn in minutes: say yes.
The questions are yes/no questions about everyday facts, half of them false, and the reward of a
completion is 1 when its answer contains the word "yes", else 0; the prompts do not ask for it, so
only the trainer can move the rate (the base model answers "no" to the false ones, and often
neither word).

    python -m benchmarks.grpo_learns --cpu --out benchmarks/results/grpo-learns-cpu   # CPU build, ~10 min
    python -m benchmarks.grpo_learns --model /models/qwen3-0.6b --out /tmp/out      # a GPU

Every step: ``--groups`` training questions x ``--rollouts`` samples through the student's current
adapter version (``lm.batch_generate``, temperature 1), their rewards to ``job.step`` (GRPO, one
LoRA version published per step), then the held-out questions (never trained on), ``--samples``
each, through the version just published. Step 0 is the base model. Printed and written: the
held-out mean reward per step with its 95% interval (normal, over the held-out completions), the
training rollouts' mean reward, the adapter that answered (from each ``Generation``), the gain of
the last step over the base with its interval, and a PNG of both curves (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time

TRAIN_QUESTIONS = (
    "Is the sea salty?", "Is fire cold?", "Do birds have feathers?", "Is ice hot?", "Is grass green?",
    "Is the sun dark?", "Do fish live in water?", "Can a stone swim?", "Is honey sweet?", "Is snow black?",
    "Do cats have four legs?", "Is a mouse bigger than a horse?", "Is bread made from flour?",
    "Is the moon made of cheese?", "Do trees have leaves?", "Is sugar sour?", "Is rain wet?",
    "Can a car fly on its own?", "Is milk white?", "Is a circle square?", "Do bees make honey?",
    "Is winter warmer than summer?", "Is coffee a drink?", "Is glass soft?", "Do owls fly at night?",
    "Is the desert wet?", "Is copper a metal?", "Can fish climb trees?", "Is tea made from leaves?",
    "Is salt sweet?", "Do clocks tell the time?", "Is a river dry?")
HELD_OUT_QUESTIONS = (
    "Is the sky blue?", "Is a lemon sweet?", "Do dogs bark?", "Is stone soft?", "Is water wet?",
    "Are whales small?", "Do cows give milk?", "Is night bright?", "Is chocolate brown?", "Can a pig fly?",
    "Do bicycles have wheels?", "Is thunder quiet?", "Is silk smooth?", "Is pepper sweet?",
    "Do foxes have tails?", "Are clouds heavy as rocks?")
YES = re.compile(r"\byes\b", re.IGNORECASE)


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def reward(output) -> float:
    """1 when the answer says "yes" (the word, any case), else 0."""
    return 1.0 if YES.search(output.text) else 0.0


def summary(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": round(mean, 4), "ci95": round(half, 4), "n": len(values)}


def held_out(lm, args) -> dict:
    prompts = [chat(q) for q in HELD_OUT_QUESTIONS[:args.held_out] for _ in range(args.samples)]
    outs = lm.batch_generate(prompts, max_tokens=args.max_tokens, temperature=1.0, return_outputs=True,
                             progress=False)
    row = summary([reward(o) for o in outs])
    row["adapters"] = sorted({str(o.adapter) for o in outs})
    row["mean_output_tokens"] = round(statistics.fmean(o.num_output_tokens for o in outs), 2)
    return row


def title_model(label: str) -> str:
    """``/path/SmolLM2-135M-Instruct@a653590e7c`` -> ``SmolLM2-135M-Instruct``."""
    return label.rsplit("/", 1)[-1].split("@", 1)[0]


def plot(rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    mean = [r["held_out"]["mean"] for r in rows]
    half = [r["held_out"]["ci95"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, mean, marker="o", label="held-out questions (95% interval)")
    ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.2)
    train = [(r["step"], r["train_reward"]) for r in rows if r.get("train_reward") is not None]
    ax.plot([s for s, _ in train], [v for _, v in train], marker=".", linestyle="--",
            label="training rollouts (before the step)")
    ax.set_xlabel("GRPO step (0: the base model)")
    ax.set_ylabel("mean reward (share of answers saying yes)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the embedded model on the CPU build (float32)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4, help="training questions per step")
    parser.add_argument("--rollouts", type=int, default=6, help="samples per training question")
    parser.add_argument("--held-out", type=int, default=16, help="held-out questions (at most 16)")
    parser.add_argument("--samples", type=int, default=4, help="samples per held-out question")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm_dspy_adapter import vLLMOffline

    engine = dict(enable_lora=True, max_lora_rank=args.rank, max_loras=2, temperature=1.0,
                  max_tokens=args.max_tokens, cache=False, max_model_len=1024)
    if args.cpu:  # eager: a fast start; float32: bfloat16 matmuls are slow on CPUs without AVX-512 BF16
        engine.update(enforce_eager=True, dtype="float32")
    started = time.monotonic()
    lm = vLLMOffline(args.model, **engine)
    result: dict = {"model": lm.model, "cpu": args.cpu, "args": vars(args), "start_s": round(time.monotonic() - started)}
    rows: list[dict] = []
    out_dir = tempfile.mkdtemp(prefix="grpo_learns-")  # the versions' weights: not results
    try:
        rows.append({"step": 0, "train_reward": None, "held_out": held_out(lm, args), "seconds": 0.0})
        print(f"step 0 (base): {rows[-1]}", flush=True)
        job = lm.reinforce({"learning_rate": args.learning_rate, "rank": args.rank, "groups_per_step": args.groups,
                            "adapter_name": "say-yes", "output_dir": out_dir, "seed": args.seed})
        result["trainer_device"] = job.get_status()["device"]
        for step in range(1, args.steps + 1):
            t = time.monotonic()
            first = ((step - 1) * args.groups) % len(TRAIN_QUESTIONS)
            questions = [TRAIN_QUESTIONS[(first + g) % len(TRAIN_QUESTIONS)] for g in range(args.groups)]
            prompts = [chat(q) for q in questions for _ in range(args.rollouts)]
            outs = lm.batch_generate(prompts, max_tokens=args.max_tokens, temperature=1.0, return_outputs=True,
                                     progress=False)
            rewards = [reward(o) for o in outs]
            groups = [[{"messages": prompts[g * args.rollouts + k],
                        "completion": {"role": "assistant", "content": outs[g * args.rollouts + k].text},
                        "reward": rewards[g * args.rollouts + k]} for k in range(args.rollouts)]
                      for g in range(args.groups)]
            ids = job.get_status()["pending_batch_ids"]
            job.step([{"batch_id": b, "group": g} for b, g in zip(ids, groups)], "grpo_chat")
            status = job.get_status()
            rows.append({"step": step, "train_reward": round(statistics.fmean(rewards), 4),
                         "rollout_adapters": sorted({str(o.adapter) for o in outs}), "adapter": status["adapter"],
                         "loss": status["last_step"]["loss"] if status["last_step"] else None,
                         "held_out": held_out(lm, args), "seconds": round(time.monotonic() - t, 1)})
            print(f"step {step}: {rows[-1]}", flush=True)
        job.terminate()
    finally:
        lm.shutdown()
        shutil.rmtree(out_dir, ignore_errors=True)
    base, last = rows[0]["held_out"], rows[-1]["held_out"]
    result["gain"] = {"last_minus_base": round(last["mean"] - base["mean"], 4),
                      "ci95": round(math.hypot(last["ci95"], base["ci95"]), 4),
                      "best_step": max(rows, key=lambda r: r["held_out"]["mean"])["step"]}
    result["rows"] = rows
    print("@@GRPO_LEARNS " + json.dumps(result), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "grpo_learns.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        title = (f"GRPO, reward for saying yes: {title_model(result['model'])}, {'CPU' if args.cpu else 'GPU'}, "
                 f"{args.groups}x{args.rollouts} rollouts/step, lr {args.learning_rate}, rank {args.rank}")
        plot(rows, title, os.path.join(args.out, "grpo_learns.png"))
    return result


if __name__ == "__main__":
    main()
