"""Does GRPO learn? (issue 35, item 5.) A task the embedded model can learn in minutes: answer
briefly. The reward of a completion is ``1 - output_tokens / max_tokens`` (0 when it runs to
``max_tokens``); the prompts say nothing about length, so only the trainer can move it.

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
import statistics
import time

TRAIN_TOPICS = ("the sea", "bread", "winter", "a river", "music", "the moon", "trains", "coffee", "a forest",
                "paper", "bees", "glass", "rain", "a library", "tea", "salt", "clocks", "bridges", "wool",
                "honey", "maps", "the desert", "candles", "owls", "snow", "copper", "gardens", "kites", "ink",
                "lighthouses", "apples", "volcanoes")
HELD_OUT_TOPICS = ("mountains", "cheese", "the wind", "violins", "deserts at night", "whales", "bicycles",
                   "silk", "thunder", "chess", "islands", "lanterns", "pepper", "foxes", "marble", "clouds")


def chat(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me about {topic}."}]


def reward(output, max_tokens: int) -> float:
    """Brevity: the share of ``max_tokens`` left unused; a completion cut at ``max_tokens`` gets 0."""
    if output.finish_reason == "length":
        return 0.0
    return 1.0 - output.num_output_tokens / max_tokens


def summary(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": round(mean, 4), "ci95": round(half, 4), "n": len(values)}


def held_out(lm, args) -> dict:
    prompts = [chat(t) for t in HELD_OUT_TOPICS[:args.held_out] for _ in range(args.samples)]
    outs = lm.batch_generate(prompts, max_tokens=args.max_tokens, temperature=1.0, return_outputs=True,
                             progress=False)
    row = summary([reward(o, args.max_tokens) for o in outs])
    row["adapters"] = sorted({str(o.adapter) for o in outs})
    row["mean_output_tokens"] = round(statistics.fmean(o.num_output_tokens for o in outs), 2)
    return row


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
    ax.set_ylabel("mean reward (1 - output tokens / max_tokens)")
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
    parser.add_argument("--groups", type=int, default=2, help="training questions per step")
    parser.add_argument("--rollouts", type=int, default=6, help="samples per training question")
    parser.add_argument("--held-out", type=int, default=16, help="held-out questions (at most 16)")
    parser.add_argument("--samples", type=int, default=2, help="samples per held-out question")
    parser.add_argument("--max-tokens", type=int, default=32)
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
    try:
        rows.append({"step": 0, "train_reward": None, "held_out": held_out(lm, args), "seconds": 0.0})
        print(f"step 0 (base): {rows[-1]}", flush=True)
        out_dir = os.path.join(args.out or "/tmp/grpo_learns", "adapters")
        job = lm.reinforce({"learning_rate": args.learning_rate, "rank": args.rank, "groups_per_step": args.groups,
                            "adapter_name": "brief", "output_dir": out_dir, "seed": args.seed})
        result["trainer_device"] = job.get_status()["device"]
        for step in range(1, args.steps + 1):
            t = time.monotonic()
            first = ((step - 1) * args.groups) % len(TRAIN_TOPICS)
            topics = [TRAIN_TOPICS[(first + g) % len(TRAIN_TOPICS)] for g in range(args.groups)]
            prompts = [chat(topic) for topic in topics for _ in range(args.rollouts)]
            outs = lm.batch_generate(prompts, max_tokens=args.max_tokens, temperature=1.0, return_outputs=True,
                                     progress=False)
            rewards = [reward(o, args.max_tokens) for o in outs]
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
        title = (f"GRPO, brevity reward: {lm.model.rsplit('/', 1)[-1]}, {'CPU' if args.cpu else 'GPU'}, "
                 f"{args.groups}x{args.rollouts} rollouts/step, lr {args.learning_rate}, rank {args.rank}")
        plot(rows, title, os.path.join(args.out, "grpo_learns.png"))
    return result


if __name__ == "__main__":
    main()
