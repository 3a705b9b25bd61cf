"""The adapter's engine defaults (``config.engine_defaults``): what is set when the user
sets nothing, and that a user's own setting wins."""

from vllm_dspy_adapter.config import PERFORMANCE_ONLY_ARGS, ModelSpec, engine_defaults


def test_the_adapter_sets_the_prefix_cache_and_quiet_stats_and_leaves_vllms_batch_limits():
    kwargs = engine_defaults({"max_model_len": 4096})
    assert kwargs == {"disable_log_stats": True, "enable_prefix_caching": True, "max_model_len": 4096}
    # measured and not taken as a default (BENCHMARKS.md, issue #20): vLLM's batch limits stay
    assert not {"performance_mode", "max_num_seqs", "max_num_batched_tokens"} & set(kwargs)


def test_the_users_own_values_win_over_every_default():
    own = {"enable_prefix_caching": False, "disable_log_stats": False, "performance_mode": "throughput"}
    assert engine_defaults(dict(own)) == own


def test_a_batch_mode_does_not_change_the_cache_label():
    """performance_mode changes speed, not answers: a cached answer survives it."""
    assert "performance_mode" in PERFORMANCE_ONLY_ARGS
    plain = ModelSpec(model="m", engine_kwargs={})
    assert plain.label() == plain.with_engine_kwargs(performance_mode="throughput").label()
    assert plain.label() != plain.with_engine_kwargs(dtype="float16").label()
