"""GPU/CPU placement (placement.plan_placement): pure, no engine."""

import pytest

from vllm_dspy_adapter.errors import ConfigurationError
from vllm_dspy_adapter.backends.placement import plan_placement


def plan(**kw):
    base = dict(num_gpus=None, gpus=None, tensor_parallel_size=1, num_replicas=None, available_gpus=4, cpu_count=8)
    base.update(kw)
    return plan_placement(**base)


def test_every_visible_gpu_by_default():
    plans = plan()
    assert [p.device for p in plans] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert plans[2].env["CUDA_VISIBLE_DEVICES"] == "2"


def test_tensor_parallel_groups(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    plans = plan(tensor_parallel_size=2)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0,1", "2,3"]


def test_chosen_gpus_map_through_the_drivers_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    plans = plan(gpus=[0, 2])
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["4", "6"]


@pytest.mark.parametrize("kw,match", [
    (dict(num_gpus=8), "shows 4 GPU"),
    (dict(gpus=[0, 9]), r"GPU\(s\) \[9\]"),
    (dict(num_gpus=3, tensor_parallel_size=2), "divisible"),
    (dict(gpus=[0, 0]), "twice"),
    (dict(num_gpus=2, gpus=[0]), "contradicts"),
    (dict(num_gpus=4, num_replicas=3), "num_replicas=3"),
    (dict(available_gpus=0, num_gpus=2), "num_replicas=N"),
    (dict(available_gpus=0, num_replicas=9), "cores"),
    (dict(available_gpus=0, num_replicas=0), "num_replicas must be >= 1"),
    (dict(num_replicas=0), "num_replicas must be >= 1"),
    (dict(num_gpus=0), "num_gpus must be >= 1"),
    (dict(gpus=[]), "names no GPU"),
])
def test_bad_requests_fail_before_anything_starts(kw, match):
    with pytest.raises(ConfigurationError, match=match):
        plan(**kw)


def test_cpu_replicas_split_the_cores():
    plans = plan(available_gpus=0, num_replicas=2, cpu_count=2)
    assert [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in plans] == ["0", "1"]
    plans = plan(available_gpus=0, num_replicas=2, cpu_count=8)
    assert [p.device for p in plans] == ["cpu:0-3", "cpu:4-7"]


def test_replica_count_on_a_gpu_machine_means_gpu_replicas():
    plans = plan(num_replicas=2, tensor_parallel_size=2)
    assert [p.device for p in plans] == ["cuda:0,1", "cuda:2,3"]
