"""The benchmark harness, small, on CPU: every system completes and the report is
well formed. Speed is never checked here (2 CPU cores say nothing about GPUs).

Marked ``bench``: about 13 minutes of engine starts (every system of the harness, raw vLLM
and the HTTP server included) that check the harness, not a path of the library, so
`make test` leaves them out and `make bench-smoke` runs them (before a GPU lease)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SYSTEM_LABELS = {"raw-llm", "raw-async", "reference", "http", "ours", "ours-prefix", "ours-least_loaded",
                 "ours-round_robin", "tp", "ours-ray"}


@pytest.mark.engine
@pytest.mark.bench
@pytest.mark.timeout(1900)  # every system of the harness on CPU: ~7.5 min on 2 cores; the run's own limit is 1800 s
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    report = proc.stdout + "\n" + proc.stderr[-6000:]
    assert proc.returncode == 0, report

    with open(out / "results.json") as fh:
        results = json.load(fh)
    rows = results["rows"]
    failed = [r for r in rows if not r.get("ok")]
    assert not failed, json.dumps(failed, indent=1)
    assert {r["label"] for r in rows} == SYSTEM_LABELS
    assert {r["workload"] for r in rows} == {"W1", "W2-threads", "W2-batch", "W3", "W4"}
    for r in rows:
        if r["workload"] == "W4":
            assert r["parsed"] >= 0 and 0 <= r["score"] <= 100
            continue
        assert r["requests"] > 0 and r["elapsed_s"] > 0
        assert r["req_s"] > 0 and r["out_tok_s"] > 0
        # ignore_eos: every system must have produced (and counted) exactly max_tokens per request.
        assert r["output_tokens"] == r["planned_output_tokens"] > 0, r
    for r in rows:  # batch systems report the static-split / routing tail
        if r["workload"] == "W2-batch" and r["label"] in ("reference", "ours-prefix"):
            assert r["tail_s"] >= 0
    assert isinstance(results["targets"], list) and results["targets"]
    assert all({"target", "ratio", "threshold", "pass"} <= set(t) for t in results["targets"])

    # One table line per row, under a header naming the columns.
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("workload"))
    for col in ("system", "req/s", "out tok/s", "ratio"):
        assert col in lines[header]
    body = lines[header + 2:header + 2 + len(rows)]
    assert len(body) == len(rows) and all(line.split()[0] in {r["workload"] for r in rows} for line in body)

    png = (out / "throughput.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.engine
@pytest.mark.bench
def test_benchmark_smoke_w5_replicas_per_gpu(tmp_path):
    """W5 (small models): ours and raw AsyncLLM with 1 and 2 replicas (engines), measured on one
    start of two (--subsets); batch and threads paths; the k=2 vs k=1 targets computed."""
    out = tmp_path / "w5"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--workloads", "w5", "--systems",
                           "ours,raw-async", "--gpus", "1", "--subsets", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + "\n" + proc.stderr[-6000:]
    with open(out / "results.json") as fh:
        results = json.load(fh)
    rows = results["rows"]
    assert {(r["label"], r["workload"], r["replicas_per_gpu"]) for r in rows} == {
        (label, w, k) for label in ("ours", "raw-async") for w in ("W5-batch", "W5-threads") for k in (1, 2)}
    for r in rows:
        assert r["ok"], r
        assert r["engines_started"] == 2
        assert r["output_tokens"] == r["planned_output_tokens"] > 0, r
    names = {t["target"] for t in results["targets"]}
    assert any("W5-batch" in n and "best k=2 / k=1" in n for n in names), names


@pytest.mark.engine
@pytest.mark.bench
def test_benchmark_smoke_w6_optimiser(tmp_path):
    """W6 (issue 20): two CPU replicas, ours under every routing policy on one LM start and
    raw AsyncLLM engines, batch and threads; each row has its prefix-cache hit rates."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.w6_bench", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (tmp_path / "w6.jsonl").read_text().splitlines()]
    assert {(r["system"], r["mode"]) for r in rows} == {
        (s, m) for s in ("cache", "prefix", "round_robin", "least_loaded", "raw") for m in ("batch", "threads")}
    for r in rows:
        assert r["requests"] == 12 and r["req_s"] > 0, r
        assert len(r["hit_rate_per_replica"]) == 2 and r["hit_rate"] is not None, r
    assert "x rr" in proc.stdout  # the closing table
