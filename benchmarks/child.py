"""One benchmark job in its own process: start a system, measure its workloads.

``python -m benchmarks.child --settings FILE --jobs JSON --deadline EPOCH``.
Each job has phases (one engine start each: the main engine for W1/W2, a
KV-limited one for W3, the real small model for W4); within a phase every
workload runs back to back on the same engine, each with fresh prompts.
Every result is printed as one ``@@BENCH {json}`` line, as soon as it exists,
so the parent keeps what finished even if this process is killed later.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from typing import Any

from . import probes
from . import workloads as wl
from .options import Settings

MARK = "@@BENCH "


def emit(row: dict[str, Any]) -> None:
    print(MARK + json.dumps(row), flush=True)


def _setup_env(settings: Settings) -> None:
    # LiteLLM would try to download its price list at import (no network on the GPU machine).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not settings.on_gpu:
        # VLLM_CPU_KVCACHE_SPACE would override every engine's kv_cache_memory_bytes,
        # and W3 needs its own size: pass sizes explicitly instead.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def engine_kwargs(settings: Settings, phase: str, model: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_model_len": settings.max_model_len}
    if phase != "w4":
        kw["load_format"] = settings.load_format
    if settings.enforce_eager:
        kw["enforce_eager"] = True
    if settings.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = settings.gpu_memory_utilization
    if not settings.on_gpu:
        kw["kv_cache_memory_bytes"] = settings.cpu_kv_cache_bytes
    if phase == "w3" and settings.w3_kv_prefixes > 0:
        tokens = wl.w3_kv_tokens(settings)
        if _has_engine_arg("kv_cache_memory_bytes"):
            kw["kv_cache_memory_bytes"] = tokens * wl.kv_bytes_per_token(model)
        else:  # an older vLLM: the block count says the same (16-token blocks)
            kw["num_gpu_blocks_override"] = -(-tokens // 16)
    kw.update(settings.engine_args)
    return kw


def _has_engine_arg(name: str) -> bool:
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    return name in {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def start_driver(settings: Settings, job: dict[str, Any], phase: str, model: str):
    from . import systems

    system, n = job["system"], job["gpus"]
    k = job.get("replicas_per_gpu", 1)
    ignore_eos = phase != "w4"  # dummy weights: fixed lengths; W4's real model stops by itself
    lm_kwargs = {"max_tokens": settings.w4_max_tokens, "temperature": 0.0} if phase == "w4" else None
    kw = engine_kwargs(settings, phase, model)
    if system == "raw-llm":
        return systems.RawLLM(model, kw, ignore_eos=ignore_eos)
    if system == "raw-async":
        return systems.RawAsync(model, kw, dp=n, ignore_eos=ignore_eos, engines_per_gpu=k)
    if system == "reference":
        return systems.Reference(model, kw, n=n, on_gpu=settings.on_gpu, ignore_eos=ignore_eos, lm_kwargs=lm_kwargs)
    if system == "http":
        from .systems_http import Http

        return Http(model, kw, dp=n, ignore_eos=ignore_eos, start_timeout=settings.server_start_timeout_s,
                            lm_kwargs=lm_kwargs)
    if system in ("ours", "tp", "ray"):
        if system == "tp" and not settings.on_gpu:
            # vLLM's CPU backend needs one core set per TP rank ("0|1").
            cores = os.cpu_count() or 1
            per = max(cores // n, 1)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
                f"{i * per}-{i * per + per - 1}" if per > 1 else str(i) for i in range(n))
        return systems.Ours(model, kw, n=n, routing=job.get("routing"), tp=system == "tp", on_gpu=settings.on_gpu,
                            ignore_eos=ignore_eos, lm_kwargs=lm_kwargs, backend="ray" if system == "ray" else "local",
                            replicas_per_gpu=k)
    raise ValueError(f"unknown system {system}")


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def build_workload(settings: Settings, item: dict[str, Any], tokenizer, n: int) -> wl.Workload:
    name, key = item["workload"], f"{item['workload']}|{item.get('variant', '')}|n={n}"
    if name == "W1":
        return wl.w1(tokenizer, settings, settings.w1_requests_per_gpu * n, key)
    if name == "W2-threads":
        count = min(settings.w2_requests_per_gpu * n, item["threads"] * settings.w2_rounds)
        count = max(count, 1)
        work = wl.w2(settings, name, count, key, threads=item["threads"])
        if item.get("percall"):
            # The reference design serves one request per GPU at a time: a few per GPU
            # measure its rate; the first k of the same list, so lengths match the others'.
            work.requests = work.requests[:max(settings.w2_percall_requests_per_gpu * n, 1)]
        return work
    if name == "W2-batch":
        return wl.w2(settings, name, settings.w2_requests_per_gpu * n, key)
    if name == "W3":
        return wl.w3(tokenizer, settings, key)
    if name == "W5-batch":
        return wl.w5(tokenizer, settings, name, settings.w5_requests_per_gpu * n, key)
    if name == "W5-threads":
        count = max(item["threads"] * settings.w5_rounds, settings.w5_min_requests)
        return wl.w5(tokenizer, settings, name, count, key, threads=item["threads"])
    raise ValueError(name)


def measure(driver, work: wl.Workload) -> dict[str, Any]:
    """Run one workload; return the measured numbers."""
    before = driver.output_tokens()
    started = time.monotonic()
    tail = None
    extra: dict[str, Any] = {}
    failures = 0
    threads = work.name.endswith("-threads")
    if threads and hasattr(driver, "concurrent"):
        out_tokens = driver.concurrent(work.requests, work.threads)
        elapsed = time.monotonic() - started
        source = "engine"
    elif threads:
        outputs = run_dspy_threads(driver, work.requests, work.threads)
        elapsed = time.monotonic() - started
        failures = sum(1 for o in outputs if not isinstance(o, list))
        after = driver.output_tokens()
        if before is not None and after is not None:
            out_tokens, source = after - before, "engine"
        else:
            out_tokens, source = work.planned_output_tokens, "planned (ignore_eos)"
    else:
        result = driver.batch(work.requests)
        elapsed = time.monotonic() - started
        out_tokens, tail, extra = result.output_tokens, result.tail_s, result.extra
        source = "engine"
        if out_tokens is None:
            out_tokens, source = work.planned_output_tokens, "planned (ignore_eos)"
    n_req = len(work.requests)
    row = {"requests": n_req, "output_tokens": out_tokens, "planned_output_tokens": work.planned_output_tokens,
           "output_tokens_source": source, "elapsed_s": round(elapsed, 4),
           "req_s": n_req / elapsed if elapsed > 0 else None,
           "out_tok_s": out_tokens / elapsed if elapsed > 0 else None, "failures": failures, **extra}
    if tail is not None:
        row["tail_s"] = round(tail, 4)
    if failures:
        row["ok"] = False
        row["error"] = f"{failures} of {n_req} calls failed"
    return row


def run_dspy_threads(driver, requests: list[wl.Request], threads: int) -> list:
    """DSPy's own thread pool calling the LM (``driver.dspy_call``: ``lm(Request)``), as a DSPy program does."""
    from dspy.utils.parallelizer import ParallelExecutor

    # timeout=0: no straggler resubmission (it would duplicate slow calls and skew counts).
    executor = ParallelExecutor(num_threads=threads, disable_progress_bar=True, max_errors=len(requests) + 1,
                                timeout=0, provide_traceback=True)
    return executor.execute(driver.dspy_call, requests)


def measure_w4(driver, settings: Settings) -> dict[str, Any]:
    """DSPy Evaluate of a ChainOfThought program on the real small model, parsing included."""
    import dspy

    devset = wl.w4_devset(settings)
    program = dspy.ChainOfThought("question -> answer")
    evaluate = dspy.Evaluate(devset=devset, metric=wl.w4_metric, num_threads=settings.w4_threads,
                             display_progress=False, max_errors=len(devset) + 1, provide_traceback=False)
    before = driver.output_tokens()
    started = time.monotonic()
    with dspy.context(lm=driver.dspy_lm, adapter=dspy.ChatAdapter()):
        result = evaluate(program)
    elapsed = time.monotonic() - started
    after = driver.output_tokens()
    results = getattr(result, "results", None) or []
    parsed = sum(1 for _, pred, _ in results if getattr(pred, "answer", None) not in (None, ""))
    out_tokens = after - before if before is not None and after is not None else None
    return {"requests": len(devset), "elapsed_s": round(elapsed, 4), "req_s": len(devset) / elapsed,
            "output_tokens": out_tokens, "out_tok_s": out_tokens / elapsed if out_tokens else None,
            "score": float(getattr(result, "score", 0.0)), "parsed": parsed, "unparsed": len(devset) - parsed}


def warm_up(driver, settings: Settings, tokenizer, n: int) -> None:
    """A few short requests through every path the phase uses, outside the timings."""
    count = max(settings.warmup_requests * n, 1)
    reqs = wl.w1(tokenizer, settings, count, f"warmup|{time.time()}").requests
    for r in reqs:
        r.max_tokens = 4
    try:
        driver.batch(reqs)
    except NotImplementedError:
        pass
    if driver.dspy_lm is not None:
        chat = wl.w2(settings, "warmup", min(count, 4), f"warmup|{time.time()}").requests
        for r in chat:
            r.max_tokens = 4
        run_dspy_threads(driver, chat, len(chat))


def warm_up_w5(driver, settings: Settings, tokenizer, replicas: int) -> None:
    """W5's warm-up: a batch as wide as the engines will run (the first batches of new
    shapes are slow), short outputs, then a few chat calls through the threads path."""
    driver.set_active(replicas)
    reqs = wl.w5(tokenizer, settings, "W5-batch", 256 * replicas, f"warmup|{time.time()}").requests
    for r in reqs:
        r.max_tokens = 16
    driver.batch(reqs)
    chat = wl.w5(tokenizer, settings, "W5-threads", 4, f"warmup|{time.time()}").requests
    if hasattr(driver, "concurrent"):
        driver.concurrent(chat, len(chat))
    elif driver.dspy_lm is not None:
        run_dspy_threads(driver, chat, len(chat))


def run_job(settings: Settings, job: dict[str, Any], deadline: float) -> None:
    saved_env = dict(os.environ)  # start_driver may pin cores for one job (CPU TP)
    try:
        _run_job(settings, job, deadline)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)


def _run_job(settings: Settings, job: dict[str, Any], deadline: float) -> None:
    base = {"system": job["system"], "label": job["label"], "gpus": job["gpus"], "device": settings.device_name}
    for phase in job["phases"]:
        items = phase["items"]

        def fail_all(items_left, message):
            for it in items_left:
                emit({**base, "workload": it["workload"], "variant": it.get("variant", ""), "ok": False,
                      "error": message})

        if time.time() > deadline - settings.min_job_s:
            fail_all(items, "skipped: out of --budget-s")
            continue
        model = phase["model"]
        os.environ.update(phase.get("env", {}))  # run_job restores the environment afterwards
        what = f"{job['label']} N={job['gpus']}" + (f" x{job['replicas_per_gpu']}/GPU" if "replicas_per_gpu" in job else "")
        print(f"== {what} phase {phase['name']}: starting ({model}, env {phase.get('env', {})})", flush=True)
        started = time.monotonic()
        try:
            driver = start_driver(settings, job, phase["name"], model)
            tokenizer = _tokenizer(model)
            if phase["name"] == "w5":
                warm_up_w5(driver, settings, tokenizer, job["gpus"] * job.get("replicas_per_gpu", 1))
            elif phase["name"] != "w4":
                warm_up(driver, settings, tokenizer, job["gpus"])
        except Exception as exc:
            traceback.print_exc()
            fail_all(items, f"start failed: {type(exc).__name__}: {str(exc)[:500]}")
            continue
        start_s = time.monotonic() - started
        print(f"== {what} phase {phase['name']}: ready in {start_s:.1f} s", flush=True)
        try:
            for i, item in enumerate(items):
                row = {**base, "workload": item["workload"], "variant": item.get("variant", ""),
                       "start_s": round(start_s, 2), "ok": True}
                if "active" in item:  # --subsets: this item uses the first replicas only
                    driver.set_active(item["active"])
                    if not item["workload"].startswith("W5"):
                        row["gpus"] = item["active"]
                    row["engines_started"] = job["gpus"] * job.get("replicas_per_gpu", 1)
                if "replicas_per_gpu" in item:
                    row.update(replicas_per_gpu=item["replicas_per_gpu"], shape=phase.get("shape"),
                               env=phase.get("env", {}))
                if time.time() > deadline - settings.min_job_s / 3:
                    fail_all(items[i:], "skipped: out of --budget-s")
                    break
                try:
                    if item["workload"] == "W4":
                        row.update(measure_w4(driver, settings))
                    else:
                        n = item.get("active", job["gpus"]) if not item["workload"].startswith("W5") else job["gpus"]
                        work = build_workload(settings, item, tokenizer, n)
                        with probes.GpuBusy(settings.on_gpu) as busy, probes.Profile(
                                settings, f"{job['label']}-{item.get('variant', '')}", item.get("profile")):
                            row.update(measure(driver, work))
                        if busy.mean is not None:
                            row["gpu_busy_pct"] = busy.mean
                except Exception as exc:
                    traceback.print_exc()
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
                emit(row)
        finally:
            try:
                driver.close()
            except Exception:
                traceback.print_exc()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.child")
    p.add_argument("--settings", required=True)
    p.add_argument("--jobs", required=True, help="JSON list of jobs")
    p.add_argument("--deadline", type=float, required=True, help="epoch seconds")
    args = p.parse_args(argv)
    with open(args.settings) as fh:
        settings = Settings.from_json(fh.read())
    _setup_env(settings)
    for job in json.loads(args.jobs):
        run_job(settings, job, args.deadline)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
