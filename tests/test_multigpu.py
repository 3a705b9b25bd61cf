"""vLLMOfflineMultiGPU on real vLLM (CPU build): two CPU replicas of the default model."""

import os
import signal
import subprocess
import sys
import threading
import time

import dspy
import pytest

from conftest import ENGINE_KWARGS, ROOT, assert_streams_in_pieces, engine_children, prompts, wait_for
from vllm_dspy_adapter import ConfigurationError, LMClosedError, NoHealthyReplicaError, vLLMOfflineMultiGPU

pytestmark = pytest.mark.engine


@pytest.fixture
def lm(pool_lm):
    return pool_lm  # the session's two replicas (conftest); this module's last test kills them


def test_gpu_request_on_a_cpu_machine_says_what_to_do():
    with pytest.raises(ConfigurationError, match="num_replicas"):
        vLLMOfflineMultiGPU(num_gpus=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_replicas=0), "num_replicas must be >= 1"),
    (dict(num_replicas=2, health_timeout=0), "health_timeout"),
    (dict(num_replicas=2, max_restarts=-1), "max_restarts"),
    (dict(num_replicas=2, spill_at=-1), "spill_at must be an int >= 0"),
    (dict(num_replicas=2, spill_at=1.5), "spill_at must be an int >= 0"),
    (dict(num_replicas=2, backend="slurm"), "Unknown backend"),
])
def test_bad_arguments_are_refused_before_any_start(kwargs, match):
    before = len(engine_children())
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=match):
        vLLMOfflineMultiGPU(**kwargs, **ENGINE_KWARGS)
    assert time.monotonic() - started < 10 and len(engine_children()) == before


def test_evaluate_spreads_over_both_replicas(lm):
    from vllm_dspy_adapter.cli import arithmetic_devset

    before = [s["requests"] for s in lm.stats()]
    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=lm):
        result = dspy.Evaluate(devset=arithmetic_devset(16, seed=1), metric=lambda e, p, t=None: True,
                               num_threads=16, display_progress=False)(program)
    assert len(result.results) == 16
    served = [s["requests"] - b for s, b in zip(lm.stats(), before)]
    assert sum(served) >= 16 and min(served) > 0, served


def test_batch_generate_keeps_order_and_completeness(lm):
    outs = lm.batch_generate(prompts(100, "alpha"), max_tokens=4, progress=False, return_outputs=True)
    assert len(outs) == 100
    lengths = [o.num_prompt_tokens for o in outs]
    assert lengths == sorted(lengths) and len(set(lengths)) == 100
    assert {o.replica for o in outs} == {0, 1}
    texts = lm.batch_generate(prompts(5, "beta"), max_tokens=4, progress=False)
    assert all(isinstance(t, str) for t in texts)


def test_batch_generate_per_prompt_sampling(lm):
    # Each prompt's own max_tokens (a long-tailed workload), in input order, over both replicas.
    wanted = [1 + i % 5 for i in range(20)]
    outs = lm.batch_generate(prompts(20, "zeta"), per_prompt=[{"max_tokens": n} for n in wanted],
                             ignore_eos=True, progress=False, return_outputs=True)
    assert [o.num_output_tokens for o in outs] == wanted
    before = sum(s["requests"] for s in lm.stats())
    with pytest.raises(ConfigurationError, match="per_prompt has 1 entries for 2 prompts"):
        lm.batch_generate(["a", "b"], per_prompt=[{}], progress=False)
    with pytest.raises(ConfigurationError, match=r"per_prompt\[1\].*max_tokenz.*max_tokens"):
        lm.batch_generate(["a", "b"], per_prompt=[{}, {"max_tokenz": 3}], progress=False)
    assert sum(s["requests"] for s in lm.stats()) == before


def test_batch_generate_refuses_bad_prompts_before_submitting(lm):
    before = sum(s["requests"] for s in lm.stats())
    with pytest.raises(ConfigurationError, match="prompt_token_ids"):
        lm.batch_generate(["fine", 42], progress=False)
    with pytest.raises(ConfigurationError, match=r"list of prompts.*\[prompt\]"):
        lm.batch_generate("hello", progress=False)  # not five one-character prompts
    assert sum(s["requests"] for s in lm.stats()) == before


def replica(lm, index):
    return lm.stats()[index]


def test_killed_replica_loses_no_result_and_comes_back(lm, caplog):
    engine_pid = replica(lm, 1)["engine_pids"][0]
    done = threading.Event()

    def kill_when_busy():
        wait_for(lambda: replica(lm, 1).get("in_flight", 0) > 0, 60)
        os.kill(engine_pid, signal.SIGKILL)
        done.set()

    resubmitted_before = replica(lm, 1)["resubmitted"]
    threading.Thread(target=kill_when_busy, daemon=True).start()
    outs = lm.batch_generate(prompts(96, "gamma"), max_tokens=16, progress=False, return_outputs=True)
    assert done.is_set()
    assert len(outs) == 96 and all(o is not None for o in outs)
    lengths = [o.num_prompt_tokens for o in outs]
    assert lengths == sorted(lengths) and len(set(lengths)) == 96  # each prompt exactly once, in order
    assert replica(lm, 1)["resubmitted"] > resubmitted_before
    assert "died" in caplog.text
    # restarted in the background, then serving again
    assert wait_for(lambda: replica(lm, 1)["alive"], 240), "replica 1 was not restarted"
    assert replica(lm, 1)["restarts"] == 1
    again = lm.batch_generate(prompts(20, "delta"), max_tokens=4, progress=False, return_outputs=True)
    assert {o.replica for o in again} == {0, 1}


def test_idle_replica_whose_engine_dies_comes_back_without_a_request(lm):
    # No request is in flight: the worker's watchdog must report the death itself
    # (otherwise the replica would look alive until a request reached it).
    victim = replica(lm, 0)
    assert all(s.get("in_flight", 0) == 0 for s in lm.stats())
    os.kill(victim["engine_pids"][0], signal.SIGKILL)
    assert wait_for(lambda: replica(lm, 0)["pid"] != victim["pid"], 60), "the dead engine's worker was not replaced"
    assert wait_for(lambda: replica(lm, 0)["alive"] and replica(lm, 0)["restarts"] == victim["restarts"] + 1, 240), \
        "replica 0 was not restarted"
    outs = lm.batch_generate(prompts(20, "eta"), max_tokens=4, progress=False, return_outputs=True)
    assert {o.replica for o in outs} == {0, 1}


def test_streams_arrive_in_pieces_from_a_worker_process(lm):
    """A streamed request on a replica in a worker process: pieces over the pipe,
    the same answer as the whole-answer path."""
    assert_streams_in_pieces(lm)


def test_stats_show_every_replica(lm):
    stats = lm.stats()
    assert [s["replica"] for s in stats] == [0, 1]
    for s in stats:
        assert s["alive"] and s["device"].startswith("cpu:")
        assert {"requests", "output_tokens", "in_flight", "prefix_cache_hit_rate"} <= set(s)


def test_every_replica_dead_fails_fast_and_shutdown_during_restart_leaves_no_process(lm):
    # Last in this module: kills both workers; calls fail at once while they restart,
    # and a shutdown in the middle of the restarts leaves nothing running.
    for entry in lm.stats():
        os.kill(entry["pid"], signal.SIGKILL)
    assert wait_for(lambda: not any(s["alive"] for s in lm.stats()), 30)
    started = time.monotonic()
    with pytest.raises(dspy.utils.exceptions.LMError, match="every replica is dead"):
        lm("Anyone?")
    with pytest.raises(NoHealthyReplicaError):
        lm.batch_generate(["Anyone?"], progress=False)
    assert time.monotonic() - started < 5
    lm.shutdown()
    with pytest.raises(LMClosedError):
        lm.batch_generate(["Anyone?"], progress=False)
    assert wait_for(lambda: not engine_children(), 30), engine_children()


def test_shutdown_as_context_manager_leaves_no_process(default_model):
    result = {}
    with vLLMOfflineMultiGPU(num_replicas=2, max_tokens=8, **ENGINE_KWARGS) as lm:
        assert len(lm("Hi", cache=False)) == 1
        assert len(engine_children()) >= 4  # two workers, each with its engine

        def long_batch():  # still in flight when the block ends
            try:
                result["out"] = lm.batch_generate(["Count to one thousand: 1, 2, 3,"] * 2, max_tokens=1500,
                                                  ignore_eos=True, progress=False, return_outputs=True)
            except Exception as exc:
                result["error"] = exc

        thread = threading.Thread(target=long_batch)
        thread.start()
        assert wait_for(lambda: sum(s.get("in_flight", 0) for s in lm.stats()) > 0, 30)
        time.sleep(0.5)
    thread.join(60)
    assert not thread.is_alive(), "the caller still waits after shutdown"
    # Never a half answer (vLLM's "abort" outputs) handed back as finished.
    assert "out" not in result, result
    assert isinstance(result["error"], LMClosedError) and "shut down" in str(result["error"]), result
    assert wait_for(lambda: not engine_children(), 30), engine_children()


_DRIVER = ("import json, sys\n"
           "from vllm_dspy_adapter import vLLMOfflineMultiGPU\n"
           "vLLMOfflineMultiGPU(num_replicas=1, cache=False, **json.loads(sys.argv[1]))\n")


def test_a_driver_killed_while_its_worker_starts_leaves_no_process(default_model):
    # SIGKILL the driver while its worker is still starting the engine (not reading its pipe):
    # the worker and its engine's processes go within seconds, not once the engine is up.
    import json

    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(ENGINE_KWARGS)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, psutil.Process] = {}

    def watch():  # every worker process and what it started, as long as they can be found
        roots = [driver.pid, *[p.pid for p in list(seen.values())]]
        for pid in roots:
            try:
                for child in psutil.Process(pid).children(recursive=True):
                    if "resource_tracker" not in " ".join(child.cmdline()):
                        seen.setdefault(child.pid, child)
            except psutil.Error:
                pass
        return seen

    def alive():
        out = []
        for proc in watch().values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
            except psutil.Error:
                pass
        return out

    try:
        assert wait_for(lambda: watch(), 60, interval=0.1), "no worker started"
        time.sleep(1.0)  # the worker imports vLLM and starts its engine: more than 10 s on this machine
        assert driver.poll() is None, "the LM started before the driver could be killed"
        watch()
        driver.kill()
        driver.wait(10)
        assert wait_for(lambda: not alive(), 10, interval=0.2), [p.cmdline()[:3] for p in alive()]
    finally:
        driver.kill()
        for proc in alive():
            proc.kill()


def test_multigpu_command_prints_a_table(default_model):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run(
        [sys.executable, "-m", "vllm_dspy_adapter", "multigpu", "--num-replicas", "2", "--questions", "8",
         "--threads", "8", "--enforce-eager", "--max-tokens", "24"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "questions/s" in run.stdout and "tokens/s" in run.stdout
    rows = [line for line in run.stdout.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2, run.stdout


def test_import_is_light_and_help_needs_no_engine():
    code = "import sys, vllm_dspy_adapter; assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    out = subprocess.run([sys.executable, "-m", "vllm_dspy_adapter", "multigpu", "--help"], capture_output=True,
                         text=True, env=env, check=True).stdout
    for flag in ("--model", "--num-gpus", "--num-replicas", "--routing"):
        assert flag in out


DRIVER = """
import sys, time
from vllm_dspy_adapter import vLLMOfflineMultiGPU
if __name__ == "__main__":
    lm = vLLMOfflineMultiGPU(num_replicas=1, enforce_eager=True, max_model_len=2048, max_tokens=4)
    print("ready", flush=True)
    time.sleep(600)
"""


def test_no_engine_outlives_its_driver(tmp_path, default_model):
    """Ctrl-C (SIGINT) and SIGKILL, one driver each, started side by side (one engine start's wait)."""
    import psutil

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    drivers = {}
    try:
        for how in (signal.SIGINT, signal.SIGKILL):
            # A background job (CI, this test's own runner) may start with SIGINT ignored,
            # which its children inherit: give the driver the default, as a terminal would.
            drivers[how] = subprocess.Popen(
                [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        pids = {}
        for how, driver in drivers.items():
            for line in driver.stdout:  # vLLM logs to stdout too
                if line.strip() == "ready":
                    break
            else:
                pytest.fail(f"the driver for {how!r} never became ready")
            # Keep draining: the engines log to the same pipe, and a full pipe would block them.
            threading.Thread(target=driver.stdout.read, daemon=True).start()
            tree = psutil.Process(driver.pid).children(recursive=True)
            workers = [p for p in tree if "resource_tracker" not in " ".join(p.cmdline())]
            assert workers, how
            # A worker leads its own process group: collect the engines under it too.
            pids[how] = {p.pid for p in workers} | {c.pid for w in workers for c in w.children(recursive=True)}
        for how, driver in drivers.items():
            driver.send_signal(how)  # Ctrl-C, or the driver killed outright
        for how, driver in drivers.items():
            driver.wait(timeout=60)
            assert wait_for(lambda: not [p for p in pids[how] if psutil.pid_exists(p) and
                                         psutil.Process(p).status() != psutil.STATUS_ZOMBIE], 60), (how, pids[how])
    finally:
        for driver in drivers.values():
            if driver.poll() is None:
                driver.kill()
