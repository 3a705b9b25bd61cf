"""GRPO step timing (issue 21, item 6): seconds per step split into rollouts, training
and the adapter swap; rollouts/s against the same replicas serving plain calls; the
serving gap during a swap; memory at each phase.

    python -m benchmarks.grpo_bench --cpu                     # default model, CPU build: proves the command
    python -m benchmarks.grpo_bench --model /models/qwen3-0.6b --gpus 1 --gpu-memory-utilization 0.5
    python -m benchmarks.grpo_bench --model /models/qwen3-8b-dummy --gpus 2 --trainer-device cuda:1

Rollouts are ``--examples x --rollouts`` chat prompts of the same shape, sent at
once with ``batch_generate`` (``ignore_eos``, ``--max-tokens`` each): first through the
base model (plain throughput), then, every step, through the student's current
adapter version (the rollouts of a GRPO step), and after the steps once more through the
last version with no step around it (plain throughput through an adapter: the baseline of
the rollouts of steps 2 on, ``vs_plain_adapter``). Rewards are arbitrary (time, not
quality). While each step runs, a prober sends one-token requests back to back; the
longest wait between two of its answers is the serving gap. A separate swap with no
training beside it (load a version on every replica, switch, retire the old one)
gives the swap's own cost. One JSON line (prefix ``@@GRPO``) is printed and appended
to ``--out``/grpo.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time


def memory() -> dict[str, float]:
    """GiB in use: each GPU's (NVML) when there are GPUs, else this process tree's RSS."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return {f"gpu{i}": round(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                                     / 2**30, 2) for i in range(pynvml.nvmlDeviceGetCount())}
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        import psutil

        me = psutil.Process()
        rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
        return {"rss": round(rss / 2**30, 2)}


class Prober:
    """One-token requests back to back; ``max_gap()``: the longest wait between answers."""

    def __init__(self, lm):
        self.lm, self.times, self.errors = lm, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.lm.batch_generate([[{"role": "user", "content": "Hi"}]], max_tokens=1, progress=False)
                self.times.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - reported
                self.errors.append(repr(exc))

    def __enter__(self):
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def max_gap(self) -> float:
        marks = [self.started, *self.times]
        return round(max((b - a for a, b in zip(marks, marks[1:])), default=float("nan")), 3)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the default model on the CPU build")
    parser.add_argument("--model", default=None)
    parser.add_argument("--gpus", type=int, default=1, help="replicas' GPUs (1: vLLMOffline)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--trainer-device", default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--train-kwargs", type=json.loads, default={},
                        help='more GRPO train_kwargs as JSON, e.g. \'{"gradient_checkpointing": true}\'')
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        args.gpus, args.examples, args.rollouts, args.max_tokens, args.rank = 1, 2, 4, 16, 8

    from vllm_dspy_adapter import vLLMOffline, vLLMOfflineMultiGPU

    engine = dict(enable_lora=True, max_lora_rank=args.rank, max_loras=2, temperature=1.0, cache=False,
                  max_model_len=2048, enforce_eager=args.cpu)
    if args.gpu_memory_utilization is not None:
        engine["gpu_memory_utilization"] = args.gpu_memory_utilization
    phases = {"start": memory()}
    started = time.monotonic()
    lm = (vLLMOfflineMultiGPU(args.model, num_gpus=args.gpus, **engine) if args.gpus > 1
          else vLLMOffline(args.model, **engine))
    result: dict = {"model": lm.model, "gpus": args.gpus, "cpu": args.cpu, "start_s": round(time.monotonic() - started)}
    try:
        n = args.examples * args.rollouts
        prompts = [[{"role": "user", "content": f"Question {i // args.rollouts}: tell me a short story."}]
                   for i in range(n)]
        sampling = dict(max_tokens=args.max_tokens, ignore_eos=True, progress=False)
        lm.batch_generate(prompts[:2], **sampling)  # warm-up
        t = time.monotonic()
        lm.batch_generate(prompts, adapter=None, **sampling)
        plain = n / (time.monotonic() - t)
        phases["serving"] = memory()
        kwargs = {"learning_rate": 1e-5, "rank": args.rank, "groups_per_step": args.examples,
                  "adapter_name": "bench", "output_dir": os.path.join(args.out or "/tmp/grpo_bench", "adapters")}
        if args.trainer_device:
            kwargs["device"] = args.trainer_device
        kwargs.update(args.train_kwargs)
        result["train_kwargs"] = kwargs
        t = time.monotonic()
        job = lm.reinforce(kwargs)
        result["trainer_load_s"] = round(time.monotonic() - t, 2)
        result["trainer_device"] = job.get_status()["device"]
        print(f"trainer on {result['trainer_device']}, loaded in {result['trainer_load_s']} s", flush=True)
        phases["trainer_loaded"] = memory()
        steps = []
        for step in range(args.steps):
            t = time.monotonic()
            texts = lm.batch_generate(prompts, **sampling)  # the student's current version
            rollout_s = time.monotonic() - t
            groups = [[{"messages": prompts[g * args.rollouts + k],
                        "completion": {"role": "assistant", "content": texts[g * args.rollouts + k]},
                        "reward": float(len(texts[g * args.rollouts + k]) % 3)} for k in range(args.rollouts)]
                      for g in range(args.examples)]
            ids = job.get_status()["pending_batch_ids"]
            t = time.monotonic()
            with Prober(lm) as prober:
                job.step([{"batch_id": b, "group": g} for b, g in zip(ids, groups)], "grpo_chat")
            step_s = time.monotonic() - t
            status = job.get_status()
            train_s = status["last_step"]["seconds"]
            steps.append({"adapter_before": None if step == 0 else f"bench-v{step}", "rollout_s": round(rollout_s, 2),
                          "rollouts_per_s": round(n / rollout_s, 2), "vs_plain": round(n / rollout_s / plain, 3),
                          "train_s": round(train_s, 2), "per_pass": status["last_step"]["per_pass"],
                          "swap_s": round(status["swap_seconds"][-1], 3),
                          "step_s": round(step_s, 2), "serving_gap_s": prober.max_gap(),
                          "probe_errors": len(prober.errors)})
            phases[f"after_step{step + 1}"] = memory()
            print(f"step {step + 1}: {steps[-1]}", flush=True)
        # Plain serving through an adapter: the same requests through the last version, no step around
        # them (the rollouts of steps 2.. run through an adapter; the base model's rate is not their baseline).
        t = time.monotonic()
        lm.batch_generate(prompts, **sampling)
        plain_adapter = n / (time.monotonic() - t)
        for row in steps[1:]:
            row["vs_plain_adapter"] = round(row["rollouts_per_s"] / plain_adapter, 3)
        # The swap alone: load a version on every replica, switch the student, retire the old one.
        folder = job.save_checkpoint("swap-probe")
        with Prober(lm) as prober:
            time.sleep(1.0)
            t = time.monotonic()
            lm.load_adapter("swap-probe", folder)
            lm.switch_adapter("swap-probe")
            loaded_s = time.monotonic() - t
            lm.unload_adapter(f"bench-v{args.steps}")
            swap_total_s = time.monotonic() - t
            time.sleep(1.0)
        result["swap_alone"] = {"load_and_switch_s": round(loaded_s, 3), "with_unload_s": round(swap_total_s, 3),
                                "serving_gap_s": prober.max_gap(), "probes": len(prober.times),
                                "probe_errors": len(prober.errors)}
        job.terminate()
        phases["terminated"] = memory()
        result.update({"plain_rollouts_per_s": round(plain, 2), "plain_adapter_rollouts_per_s": round(plain_adapter, 2),
                       "rollouts_per_step": n, "max_tokens": args.max_tokens,
                       "steps": steps, "memory_gib": phases})
    finally:
        lm.shutdown()
    print("@@GRPO " + json.dumps(result), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "grpo.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
