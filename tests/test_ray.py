"""backend="ray": replicas as Ray actors over the nodes of a Ray cluster.

The engine tests run a real two-node Ray cluster on this machine (a head without
CPUs and two worker nodes of one CPU each, so each node takes exactly one CPU
replica of the default model), then lose one node in the middle of a batch.
"""

import threading

import dspy
import psutil
import pytest

ray = pytest.importorskip("ray")

from conftest import ENGINE_KWARGS, assert_streams_in_pieces, prompts, wait_for  # noqa: E402
from vllm_dspy_adapter import ConfigurationError, vLLMOfflineMultiGPU  # noqa: E402
from vllm_dspy_adapter.backends.placement import RayNode, free_core_offset, plan_ray_placement  # noqa: E402


# ---------------------------------------------------------------- placement (no cluster)


def nodes(*shape):
    return [RayNode(node_id=f"{i:02d}" * 8, ip=f"10.0.0.{i}", cpus=cpus, gpus=gpus)
            for i, (cpus, gpus) in enumerate(shape)]


def plan(cluster, num_gpus=None, gpus=None, tensor_parallel_size=1, num_replicas=None):
    return plan_ray_placement(num_gpus=num_gpus, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
                              num_replicas=num_replicas, nodes=cluster)


def test_gpu_replicas_count_over_the_cluster():
    cluster = nodes((32, 4), (32, 4))
    assert plan(cluster).count == 8
    assert plan(cluster, num_gpus=8).bundle == {"GPU": 1.0}
    two = plan(cluster, num_gpus=8, tensor_parallel_size=2)
    assert (two.count, two.bundle) == (4, {"GPU": 2.0})
    three = plan(cluster, tensor_parallel_size=2, num_replicas=3)  # a replica count alone: GPU replicas
    assert (three.count, three.gpus_per_replica) == (3, 2)


def test_a_replica_never_spans_nodes():
    cluster = nodes((16, 3), (16, 3))  # only one replica of 2 GPUs fits on each node
    assert plan(cluster, tensor_parallel_size=2).count == 2
    with pytest.raises(ConfigurationError, match=r"room for 2: node 10\.0\.0\.0 .*3 GPU.*node 10\.0\.0\.1"):
        plan(cluster, num_gpus=6, tensor_parallel_size=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_gpus=6, tensor_parallel_size=4), "divisible"),
    (dict(num_gpus=4, num_replicas=3), "num_replicas=3"),
    (dict(gpus=[0, 1]), "num_gpus=N"),
    (dict(num_gpus=9), r"room for 8: node 10\.0\.0\.0 \(00000000\): 4 GPU, 32 CPU"),
])
def test_bad_gpu_requests_are_refused(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        plan(nodes((32, 4), (32, 4)), **kwargs)


def test_cpu_replicas_take_as_many_cpus_as_fit():
    cluster = nodes((16, 0), (16, 0))
    assert (plan(cluster).count, plan(cluster).cpus_per_replica) == (1, 16)
    assert plan(cluster, num_replicas=2).cpus_per_replica == 16
    assert plan(cluster, num_replicas=3).cpus_per_replica == 8
    assert plan(cluster, num_replicas=32).cpus_per_replica == 1
    with pytest.raises(ConfigurationError, match="33 CPU replicas.*has 32"):
        plan(cluster, num_replicas=33)
    with pytest.raises(ConfigurationError, match="no GPU"):
        plan(cluster, num_gpus=1)


def test_cpu_replicas_of_one_host_bind_different_cores():
    assert free_core_offset(8, 4, set()) == 0
    assert free_core_offset(8, 4, {0}) == 4
    assert free_core_offset(2, 1, {1}) == 0
    assert free_core_offset(2, 1, {0, 1}) in (0, 1)  # oversubscribed: shares rather than fails


# ---------------------------------------------------------------- a real two-node cluster


def descendants():
    """This process's descendants, less Python's resource tracker (this process's own,
    started by earlier tests, and alive as long as it is)."""
    me = psutil.Process()
    out = {}
    for child in me.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if not ("resource_tracker" in cmd and child.ppid() == me.pid):
                out[child.pid] = (child.create_time(), cmd[:100])
        except psutil.NoSuchProcess:
            pass
    return out


def still_running(processes):
    left = []
    for pid, (created, cmd) in processes.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                left.append((pid, cmd))
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # Fast node-failure detection, so that the lost node's requests move on quickly.
    head = {"num_cpus": 0, "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for i in range(2):
        cluster.add_node(num_cpus=1, resources={f"test_node_{i}": 1})
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def lm(cluster, default_model):
    # placement_timeout: a restart with no room anywhere gives up quickly
    lm = vLLMOfflineMultiGPU(backend="ray", ray_address=cluster.address, num_replicas=2, temperature=0.0,
                             max_tokens=48, cache=False, placement_timeout=10, **ENGINE_KWARGS)
    lm.processes = descendants()  # Ray's and the engines', for the no-process-left check
    yield lm
    lm.shutdown()


@pytest.mark.engine
def test_asking_more_than_the_cluster_has_is_refused_before_any_start(cluster):
    with pytest.raises(ConfigurationError, match=r"num_replicas=3 CPU replicas .* has 2: .*0 GPU, 1 CPU"):
        vLLMOfflineMultiGPU(backend="ray", ray_address=cluster.address, num_replicas=3)
    with pytest.raises(ConfigurationError, match="no GPU"):
        vLLMOfflineMultiGPU(backend="ray", ray_address=cluster.address, num_gpus=1)
    assert not ray.is_initialized()  # the refused LMs disconnected again


@pytest.mark.engine
def test_one_replica_per_node_and_evaluate_uses_both(lm, cluster):
    from vllm_dspy_adapter.cli import arithmetic_devset

    stats = lm.stats()
    workers = {node.node_id for node in cluster.worker_nodes}
    assert {s["node_id"] for s in stats} == workers  # one replica on each worker node
    assert all(s["alive"] and s["device"].startswith("node:") for s in stats)
    assert {s["device"].rsplit("/", 1)[1] for s in stats} == {"cpu:0", "cpu:1"}  # one machine: different cores

    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=lm):
        result = dspy.Evaluate(devset=arithmetic_devset(24, seed=3), metric=lambda e, p, t=None: True,
                               num_threads=12, display_progress=False)(program)
    assert len(result.results) == 24
    served = {s["node_id"]: s["requests"] for s in lm.stats()}
    assert sum(served.values()) >= 24 and min(served.values()) > 0, served  # both nodes served


@pytest.mark.engine
def test_streams_arrive_in_pieces_from_a_ray_actor(lm):
    """A streamed request on a Ray replica: pieces polled from the actor,
    the same answer as the whole-answer path."""
    assert_streams_in_pieces(lm)


@pytest.mark.engine
def test_a_request_error_crosses_ray_as_the_adapters_own(lm):
    from vllm_dspy_adapter import PromptTooLongError

    out = lm.batch_generate(["word " * 3000, "Hi"], max_tokens=2, progress=False, raise_on_error=False)
    assert isinstance(out[0], PromptTooLongError) and isinstance(out[1], str)
    assert all(s["alive"] for s in lm.stats())  # only that request failed


def replica(lm, index):
    return lm.stats()[index]


def engine_processes(entry):
    out = {}
    for pid in [entry["pid"], *entry["engine_pids"]]:
        try:
            out[pid] = (psutil.Process(pid).create_time(), f"pid {pid}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.engine
def test_an_acall_timed_out_is_aborted_in_the_ray_actors_engine(lm):
    import asyncio
    import uuid

    def total(key):
        return sum(int(s.get(key) or 0) for s in lm.stats())

    before = total("cancelled")

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lm.acall(f"Write a very long story. {uuid.uuid4().hex}", max_tokens=1500), 1.5)

    asyncio.run(main())
    assert wait_for(lambda: total("unfinished") == 0 and total("in_flight") == 0, 10, interval=0.2), lm.stats()
    assert total("cancelled") == before + 1


@pytest.mark.engine
def test_dead_engine_is_replaced_on_its_node_and_loses_no_result(lm, caplog):
    victim = replica(lm, 0)
    node_id, old = victim["node_id"], engine_processes(victim)
    killed = threading.Event()

    def kill_engine_when_busy():
        wait_for(lambda: replica(lm, 0).get("in_flight", 0) > 0, 60)
        psutil.Process(victim["engine_pids"][0]).kill()
        killed.set()

    resubmitted_before = victim["resubmitted"]
    threading.Thread(target=kill_engine_when_busy, daemon=True).start()
    outs = lm.batch_generate(prompts(120, "beta"), max_tokens=4, progress=False, return_outputs=True)
    assert killed.is_set()
    lengths = [o.num_prompt_tokens for o in outs]
    assert lengths == sorted(lengths) and len(set(lengths)) == 120
    assert replica(lm, 0)["resubmitted"] > resubmitted_before
    assert wait_for(lambda: replica(lm, 0)["alive"], 240), "replica 0 was not restarted"
    now = replica(lm, 0)
    assert now["restarts"] == 1 and now["node_id"] == node_id  # back on its node, the only one with room
    assert not still_running(old)  # the old actor and its engine processes are gone
    again = lm.batch_generate(prompts(40, "delta"), max_tokens=4, progress=False, return_outputs=True)
    assert {o.replica for o in again} == {0, 1}


@pytest.mark.engine
def test_node_lost_mid_batch_loses_no_result(lm, cluster, caplog):
    victim = replica(lm, 1)
    node = next(n for n in cluster.worker_nodes if n.node_id == victim["node_id"])
    old = engine_processes(victim)
    removed = threading.Event()

    def remove_node_when_busy():
        wait_for(lambda: replica(lm, 1).get("in_flight", 0) > 0, 60)
        cluster.remove_node(node, allow_graceful=False)  # kills the node's raylet, its workers and engines
        removed.set()

    resubmitted_before = victim["resubmitted"]
    threading.Thread(target=remove_node_when_busy, daemon=True).start()
    outs = lm.batch_generate(prompts(240, "gamma"), max_tokens=4, progress=False, return_outputs=True)
    assert removed.is_set()
    assert len(outs) == 240 and all(o is not None for o in outs)
    lengths = [o.num_prompt_tokens for o in outs]
    assert lengths == sorted(lengths) and len(set(lengths)) == 240  # each prompt exactly once, in order
    assert replica(lm, 1)["resubmitted"] > resubmitted_before
    assert "died" in caplog.text

    stats = {s["replica"]: s for s in lm.stats()}
    assert stats[1]["alive"] is False and stats[1]["restarts"] == 1
    assert stats[0]["alive"] is True
    assert wait_for(lambda: not still_running(old), 30), still_running(old)  # no orphaned engine
    # No node has room for it (the survivor's node has one CPU): the pool says so and goes on with one.
    assert wait_for(lambda: "could not be restarted" in caplog.text, 10 + 60)
    again = lm.batch_generate(prompts(20, "epsilon"), max_tokens=4, progress=False, return_outputs=True)
    assert {o.replica for o in again} == {0}


@pytest.mark.engine
def test_shutdown_leaves_no_ray_or_engine_process(lm, cluster):
    processes = lm.processes
    assert any("raylet" in cmd for _, cmd in processes.values())
    assert sum("VLLM" in cmd or "EngineCore" in cmd for _, cmd in processes.values()) >= 2
    lm.shutdown()
    assert not ray.is_initialized()
    cluster.shutdown()
    assert wait_for(lambda: not still_running(processes), 30), still_running(processes)
