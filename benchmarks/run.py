"""The benchmark command: ``python -m benchmarks.run [options]`` (``--help``).

Plans one job per (system, N), runs each in its own child process (so GPU memory
is freed between systems and a crash loses nothing else), collects the rows the
children print, and writes the table, results.json and throughput.png. A
``--budget-s`` deadline is enforced: jobs that cannot start in time are
reported as skipped, and a child still running at the deadline is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from . import report
from .child import MARK
from .options import Settings, parse_settings


def plan(settings: Settings, model: str, w4_model: str | None,
         w5_models: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Jobs: system x N (x routing), each with phases of items (one engine start per phase).

    With ``--subsets``, ours and raw-async start once at the largest N and every smaller N of
    ``--gpus`` is an item (``active``) measured on the same engines."""
    jobs = []
    wls = set(settings.workloads)
    for system in settings.systems:
        for n in settings.gpus:
            subset_sizes = [n]
            if settings.subsets and system in ("ours", "raw-async"):
                if n != max(settings.gpus):
                    continue
                subset_sizes = sorted(settings.gpus)
            if system == "raw-llm" and n != 1:
                continue  # LLM.generate is the single-GPU ceiling
            if n == 1 and (system == "tp" or system not in settings.single_gpu_systems):
                continue
            if system == "ours":
                variants = [(None, "ours")] if n == 1 else [(r, f"ours-{r}") for r in settings.routings]
            elif system == "ray":  # the same LM on the Ray backend, under the first routing policy
                variants = [(settings.routings[0], "ours-ray")]
            else:
                variants = [(None, system)]
            for routing, label in variants:
                main: list[dict[str, Any]] = []
                for k in subset_sizes:
                    active = {"active": k} if len(subset_sizes) > 1 else {}
                    if "w1" in wls:
                        main.append({"workload": "W1", **active})
                    if "w2" in wls:
                        if system != "raw-llm":
                            for t in settings.w2_threads:
                                main.append({"workload": "W2-threads", "variant": f"threads={t}", "threads": t,
                                             "percall": system == "reference", **active})
                        if system != "http":
                            main.append({"workload": "W2-batch", **active})
                w3 = [{"workload": "W3", "variant": settings.w3_order}] if "w3" in wls else []
                phases = []
                if settings.w3_kv_prefixes > 0 and w3:
                    phases += [{"name": "main", "model": model, "items": main}] if main else []
                    phases.append({"name": "w3", "model": model, "items": w3})
                elif main or w3:
                    phases.append({"name": "main", "model": model, "items": main + w3})
                if ("w4" in wls and w4_model and system in settings.w4_systems and n in (settings.w4_gpus or [])
                        and routing in (None, "prefix")):
                    phases.append({"name": "w4", "model": w4_model,
                                   "items": [{"workload": "W4", "variant": f"threads={settings.w4_threads}"}]})
                if phases:
                    jobs.append({"system": system, "label": label, "gpus": n, "routing": routing, "phases": phases})
    if "w5" in wls:
        jobs += plan_w5(settings, w5_models or {})
    return jobs


def plan_w5(settings: Settings, models: dict[str, str]) -> list[dict[str, Any]]:
    """W5 jobs: (ours, raw-async) x N x replicas per GPU; one phase (engine start) per model
    shape and sampler. With ``--subsets`` one job per system at the largest replicas per GPU,
    measuring each smaller count on it."""
    from .options import SAMPLERS, W5_SYSTEMS

    jobs = []
    counts = sorted(settings.replicas_per_gpu)
    for system in [s for s in settings.systems if s in W5_SYSTEMS]:
        for n in settings.gpus:
            if system == "raw-async" and n != 1 and max(counts) > 1:
                continue  # several AsyncLLM engines per GPU: one GPU only
            for k in ([counts[-1]] if settings.subsets else counts):
                measured = [c for c in counts if c <= k] if settings.subsets else [k]
                phases = []
                for shape in settings.w5_shapes:
                    for sampler in settings.w5_samplers:
                        items = []
                        for c in measured:
                            tag = f"{shape} {sampler} k={c}"
                            active = {"active": c * n} if len(measured) > 1 else {}
                            if settings.w5_batch:
                                items.append({"workload": "W5-batch", "variant": tag, "replicas_per_gpu": c,
                                              **active})
                            for t in settings.w5_threads:
                                items.append({"workload": "W5-threads", "variant": f"{tag} threads={t}",
                                              "threads": t, "replicas_per_gpu": c, **active})
                        if settings.profile_s > 0 and not phases and items and items[0]["workload"] == "W5-batch" \
                                and items[0]["replicas_per_gpu"] == 1:
                            items[0]["profile"] = True  # where one engine's time goes: the first batch run
                        phases.append({"name": "w5", "model": models.get(shape), "shape": shape,
                                       "env": {"VLLM_USE_FLASHINFER_SAMPLER": SAMPLERS[sampler]}, "items": items})
                routing = None if (n == 1 and k == 1) else settings.routings[0]
                jobs.append({"system": system, "label": system, "gpus": n, "routing": routing,
                             "replicas_per_gpu": k, "phases": phases})
    return jobs


def row_gpus(job: dict[str, Any], item: dict[str, Any]) -> int:
    """A row's N: the job's GPUs, or the subset measured (W5 subsets count replicas, not GPUs)."""
    if "active" in item and not item["workload"].startswith("W5"):
        return item["active"]
    return job["gpus"]


def expected_rows(job: dict[str, Any]) -> list[tuple]:
    return [(job["label"], row_gpus(job, it), it["workload"], it.get("variant", ""))
            for ph in job["phases"] for it in ph["items"]]


def resolve_models(settings: Settings) -> tuple[str, str | None, dict[str, str]]:
    """The throughput model, W4's model and W5's (by shape), prepared here once so children don't race."""
    from vllm_dspy_adapter.models import resolve_model

    from .bench_models import benchmark_model_path

    if settings.model:
        model = settings.model
    elif settings.on_gpu:
        model = benchmark_model_path()
    else:
        from .smoke_model import tiny_model_path

        model = tiny_model_path()
    w5_models: dict[str, str] = {}
    if "w5" in settings.workloads:
        for shape in settings.w5_shapes:
            # On CPU every shape is the tiny smoke model: the code path, not the speed.
            w5_models[shape] = benchmark_model_path(shape=shape) if settings.on_gpu and not settings.model else model
    w4_model = None
    if "w4" in settings.workloads:
        try:
            w4_model = resolve_model(settings.w4_model)
        except Exception as exc:  # e.g. the default model's package is absent on the GPU machine
            print(f"W4 skipped: no W4 model ({exc})", file=sys.stderr)
    return model, w4_model, w5_models


class ChildRun:
    """One child process; its @@BENCH rows are collected while the log is written."""

    def __init__(self, settings_path: str, jobs: list[dict[str, Any]], deadline: float, log_path: str,
                 t0: float, partial_path: str | None = None):
        self.rows: list[dict[str, Any]] = []
        self.partial = open(partial_path, "a") if partial_path else None
        cmd = [sys.executable, "-m", "benchmarks.child", "--settings", settings_path, "--jobs", json.dumps(jobs),
               "--deadline", str(deadline)]
        self.log = open(log_path, "w")
        # A new session: at the deadline the whole group (engines included) is stopped together.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, bufsize=1, errors="replace")
        self.t0 = t0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            if line.startswith(MARK):
                row = json.loads(line[len(MARK):])
                self.rows.append(row)
                if self.partial is not None:  # survives even if this process is killed
                    self.partial.write(line[len(MARK):])
                    self.partial.flush()
                print(f"[{time.monotonic() - self.t0:7.1f} s] {_progress(row)}", file=sys.stderr, flush=True)
            elif line.startswith("== "):
                print(f"[{time.monotonic() - self.t0:7.1f} s] {line[3:].rstrip()}", file=sys.stderr, flush=True)

    def wait(self, deadline: float) -> str | None:
        """Wait until the child ends or the deadline passes; None if it exited cleanly."""
        why = None
        try:
            self.proc.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            why = "killed at the --budget-s deadline"
            self._kill()
        self.reader.join(timeout=30)
        self.log.close()
        if self.partial is not None:
            self.partial.close()
        # Anything the child left behind (an engine process orphaned by a crash) is
        # still in its process group: stop it so the next job gets the devices.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if why is None and self.proc.returncode != 0:
            why = f"child exited with code {self.proc.returncode}"
        return why

    def _kill(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def _progress(row: dict[str, Any]) -> str:
    what = f"{row['label']} N={row['gpus']} {row['workload']} {row.get('variant', '')}".rstrip()
    if not row.get("ok"):
        return f"{what}: FAILED {str(row.get('error', ''))[:120]}"
    return f"{what}: {row.get('req_s') or 0:.2f} req/s, {row.get('out_tok_s') or 0:,.0f} out tok/s"


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    t0 = time.monotonic()
    deadline = time.time() + settings.budget_s
    out = settings.out
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    model, w4_model, w5_models = resolve_models(settings)
    jobs = plan(settings, model, w4_model, w5_models)
    settings_path = os.path.join(out, "settings.json")
    with open(settings_path, "w") as fh:
        fh.write(settings.to_json())
    print(f"{len(jobs)} job(s) on {settings.device_name}, model {model}; budget {settings.budget_s:.0f} s; "
          f"logs in {out}/logs", file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    # Rows as they arrive; `python -m benchmarks.report OUT/results.partial.jsonl --out DIR`
    # rebuilds a report from it if this process is stopped before the end.
    partial_path = os.path.join(out, "results.partial.jsonl")
    open(partial_path, "w").close()
    batches = [jobs] if settings.group_jobs else [[job] for job in jobs]
    for batch in batches:
        if not batch:
            continue
        name = "all" if settings.group_jobs else f"{batch[0]['label']}-N{batch[0]['gpus']}"
        if time.time() > deadline - settings.min_job_s:
            why = "skipped: out of --budget-s"
        else:
            child = ChildRun(settings_path, batch, deadline, os.path.join(out, "logs", f"{name}.log"), t0,
                             partial_path=partial_path)
            why = child.wait(deadline)
            rows += child.rows
        got = {report.key(r) for r in rows}
        for job in batch:
            for label, n, workload, variant in expected_rows(job):
                if (label, n, workload, variant) not in got:
                    rows.append({"system": job["system"], "label": label, "gpus": n, "workload": workload,
                                 "variant": variant, "device": settings.device_name, "ok": False,
                                 "error": f"not run: {why or 'no result'} (see logs/{name}.log)"})

    if settings.append and os.path.exists(os.path.join(out, "results.jsonl")):
        new = {report.key(r) for r in rows}
        rows = [r for r in report.load_rows([out]) if report.key(r) not in new] + rows
    text = report.write(out, rows, json.loads(settings.to_json()))
    print(text)
    print(f"\nwrote {out}/results.json, {out}/throughput.png ({time.monotonic() - t0:.0f} s)")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
