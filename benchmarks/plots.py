"""BENCHMARKS.md's plots, drawn from the harness's own rows under benchmarks/results/.

    python -m benchmarks.plots --out benchmarks/results/plots

- ``throughput_vs_gpus.png``: W1 and W2 requests/s at 1, 2 and 4 GPUs, ours against the peers of
  the same run (``2026-11-27-h200x4.jsonl``, the one run measured at every GPU count).
- ``w6_by_policy.png``: W6 requests/s by routing policy and mode (every ``w6*.jsonl``; the
  optimisers' replays in their own panel).
- ``grpo_steps.png``: seconds per GRPO step and the serving gap of each swap (every
  ``*grpo.jsonl`` of ``benchmarks.grpo_bench``).
- ``grpo_reward.png``: held-out and training reward per GRPO step (every ``grpo_learns.json`` of
  ``benchmarks.grpo_learns``).

Nothing is typed in: a plot whose rows are missing is skipped, and the script says so.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def card(path: str) -> str:
    """'2026-12-05-h200x1-lease6/...' -> '1 x H200, 2026-12-05'."""
    rel = os.path.relpath(path, RESULTS)
    m = re.match(r"(\d{4}-\d\d-\d\d)-(h100|h200)x(\d)", rel)
    return f"{m.group(3)} x {m.group(2).upper()}, {m.group(1)}" if m else rel.split(os.sep)[0]


def throughput_vs_gpus(plt, out: str) -> str | None:
    path = os.path.join(RESULTS, "2026-11-27-h200x4.jsonl")
    if not os.path.exists(path):
        return None
    rows = [r for r in read_rows(path) if "req_s" in r and "replicas" in r]
    fig, (w1, w2) = plt.subplots(1, 2, figsize=(11, 4.2))
    w1_lines = {"ours, after warm-up": ("ours", "W1-warm"), "ours, first runs (cold)": ("ours", "W1"),
                "raw LLM.generate, static split": (("raw-llm-generate", "reference-static"), "W1"),
                "raw AsyncLLM(dp=4), pinned": ("raw-async", "W1")}
    for label, (systems, workload) in w1_lines.items():
        systems = systems if isinstance(systems, tuple) else (systems,)
        pts = sorted((r["replicas"], r["req_s"]) for r in rows if r["system"] in systems and r["workload"] == workload)
        w1.plot(*zip(*pts), marker="o", label=label)
    base = [r["req_s"] for r in rows if r["system"] == "ours" and r["workload"] == "W1-warm" and r["replicas"] == 1]
    if base:
        w1.plot([1, 2, 4], [base[0] * n for n in (1, 2, 4)], "k:", label="N x ours on 1 GPU")
    w1.set_title("W1: 512 in / 256 out, every prompt at once", fontsize=9)
    for system, workload, name in (("ours", "W2-dspy-threads", "ours, DSPy threads"),
                                   ("raw-async", "W2-same-concurrency", "raw AsyncLLM, same cap")):
        for threads, style in ((512, "-"), (128, "--")):
            pts = sorted((r["replicas"], r["req_s"]) for r in rows
                         if r["system"] == system and r["workload"] == workload and r.get("threads") == threads)
            w2.plot(*zip(*pts), style, marker="o", label=f"{name}, {threads} threads")
    w2.set_title("W2: DSPy-shaped calls from a thread pool", fontsize=9)
    for ax in (w1, w2):
        ax.set_xticks([1, 2, 4])
        ax.set_xlabel("GPUs (replicas)")
        ax.set_ylabel("requests/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Throughput vs GPUs ({card(path)}, vLLM 0.26.0, Qwen3-8B shape, dummy weights)", fontsize=10)
    return save(fig, out, "throughput_vs_gpus.png")


def w6_by_policy(plt, out: str) -> str | None:
    files = sorted(glob.glob(os.path.join(RESULTS, "**", "w6*.jsonl"), recursive=True))
    panels: dict[str, dict[str, dict[str, float]]] = {"W6 (64 shared 2,048-token prefixes)": {}, "optimisers' replays": {}}
    for path in files:
        replay = re.search(r"replay-(\w+)", path)
        panel = panels["optimisers' replays" if replay else "W6 (64 shared 2,048-token prefixes)"]
        rows = read_rows(path)
        spill = next((r["spill_at"] for r in rows if "spill_at" in r), 256)  # 256: the default, unrecorded
        for r in rows:
            mode = "batch_generate" if r["mode"] == "batch" else f"{r['threads']} threads"
            group = f"{replay.group(1) + ', ' if replay else ''}{mode}" + (
                "" if replay or r["mode"] == "batch" else f", spill_at {spill}")
            panel.setdefault(f"{group}\n{card(path)}", {})[r["system"]] = r["req_s"]
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.4), squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels.items()):
        groups = {g: groups[g] for g in sorted(groups, key=lambda g: ("batch" not in g, "spill_at 0" in g, g))}
        systems = [s for s in ("cache", "prefix", "round_robin", "least_loaded", "raw")
                   if any(s in g for g in groups.values())]
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            xs = [j + i * width for j, g in enumerate(groups.values()) if system in g]
            ys = [g[system] for g in groups.values() if system in g]
            ax.bar(xs, ys, width, label="raw vLLM engines" if system == "raw" else system)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels(list(groups), fontsize=7)
        ax.set_ylabel("requests/s")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("W6 by routing policy and mode (0.6B shape, 2 replicas on one GPU, vLLM 0.26.0)", fontsize=10)
    return save(fig, out, "w6_by_policy.png")


def grpo_steps(plt, out: str) -> str | None:
    files = sorted(glob.glob(os.path.join(RESULTS, "**", "*grpo.jsonl"), recursive=True))
    runs = []
    for path in files:
        for r in read_rows(path):
            if r.get("steps"):
                shape = re.search(r"Qwen3-([\d.]+B)", r["model"])
                kw = {k: v for k, v in r["train_kwargs"].items() if k in ("batch_size", "gradient_checkpointing")}
                extra = ", " + ", ".join(f"{k}={v}" for k, v in kw.items()) if kw else ", defaults"
                runs.append((f"{shape.group(1) if shape else r['model']}{extra} ({card(path)})", r["steps"]))
    if not runs:
        return None
    fig, (step, gap) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, steps in runs:
        xs = range(1, len(steps) + 1)
        step.plot(xs, [s["step_s"] for s in steps], marker="o", label=label)
        gap.plot(xs, [s["serving_gap_s"] for s in steps], marker="o", label=label)
    step.set_ylabel("seconds per step")
    gap.set_ylabel("longest serving gap during the swap, s")
    gap.axhline(1.0, color="k", linestyle=":", label="target: under 1 s")
    step.set_ylim(0, 1.45 * max(s["step_s"] for _, steps in runs for s in steps))
    gap.set_ylim(0, 1.6)
    for ax in (step, gap):
        ax.set_xlabel("GRPO step")
        ax.set_xticks(range(1, max(len(s) for _, s in runs) + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("GRPO steps: 16 examples x 8 rollouts, up to 512 tokens, rank 16, trainer beside the replica",
                 fontsize=10)
    return save(fig, out, "grpo_steps.png")


def grpo_reward(plt, out: str) -> str | None:
    files = sorted(glob.glob(os.path.join(RESULTS, "**", "grpo_learns.json"), recursive=True))
    if not files:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for path in files:
        with open(path, encoding="utf-8") as fh:
            rows = json.load(fh)["rows"]
        mean = [r["held_out"]["mean"] for r in rows]
        half = [r["held_out"]["ci95"] for r in rows]
        steps = [r["step"] for r in rows]
        run = os.path.relpath(os.path.dirname(path), RESULTS)
        ax.plot(steps, mean, marker="o", label=f"held-out questions (95% interval), {run}")
        ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.2)
        train = [(r["step"], r["train_reward"]) for r in rows if r.get("train_reward") is not None]
        ax.plot(*zip(*train), marker=".", linestyle="--", label=f"training rollouts (before the step), {run}")
    ax.set_xlabel("GRPO step (0: the base model)")
    ax.set_ylabel("mean reward")
    ax.set_title("GRPO learns: reward per step (benchmarks.grpo_learns)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out, "grpo_reward.png")


def save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(RESULTS, "plots"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    for draw in (throughput_vs_gpus, w6_by_policy, grpo_steps, grpo_reward):
        path = draw(plt, args.out)
        print(f"{draw.__name__}: {path or 'skipped (no rows in benchmarks/results)'}")
        plt.close("all")


if __name__ == "__main__":
    main()
