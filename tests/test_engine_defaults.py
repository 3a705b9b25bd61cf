"""The adapter's engine defaults (``config.engine_defaults``): what is set when the user
sets nothing, the batch limit chosen by measurement on the cards it was measured on, and
that a user's own setting wins."""

import pytest

from vllm_dspy_adapter import vllm_api
from vllm_dspy_adapter.config import PERFORMANCE_ONLY_ARGS, ModelSpec, engine_defaults


def test_the_adapter_sets_the_prefix_cache_and_quiet_stats_and_leaves_vllms_limits_where_not_measured():
    for card in (None, 256):  # unknown platform; an A100 or smaller card, a CPU
        kwargs, told = engine_defaults({"max_model_len": 4096}, vllm_max_num_seqs=card)
        assert kwargs == {"disable_log_stats": True, "enable_prefix_caching": True, "max_model_len": 4096}
        assert told is None


def test_on_an_h100_or_h200_the_lm_runs_twice_vllms_sequences_and_says_so():
    kwargs, told = engine_defaults({"max_model_len": 4096}, vllm_max_num_seqs=1024)
    assert kwargs["max_num_seqs"] == 2048
    # throughput mode (both limits doubled) was measured and not taken: the token budget stays vLLM's
    assert not {"performance_mode", "max_num_batched_tokens"} & set(kwargs)
    assert "max_num_seqs=2048" in told and "1.19x" in told and "Pass max_num_seqs=" in told


@pytest.mark.parametrize("own", [{"max_num_seqs": 64}, {"max_num_batched_tokens": 1024},
                                 {"performance_mode": "throughput"}, {"performance_mode": "balanced"}])
def test_a_user_who_sets_any_batch_limit_keeps_vllms_others(own):
    kwargs, told = engine_defaults(dict(own), vllm_max_num_seqs=1024)
    assert told is None
    assert kwargs == {"disable_log_stats": True, "enable_prefix_caching": True, **own}


def test_the_users_own_values_win_over_every_default():
    own = {"enable_prefix_caching": False, "disable_log_stats": False}
    kwargs, _ = engine_defaults(dict(own), vllm_max_num_seqs=1024)
    assert {k: kwargs[k] for k in own} == own


def test_vllm_names_this_cpus_limit_below_the_measured_cards():
    """The CPU build answers with its own table: the wider limit is not chosen here."""
    seqs = vllm_api.default_max_num_seqs()
    assert seqs is None or seqs < 1024


def test_a_batch_limit_does_not_change_the_cache_label():
    """Batch limits change speed, not answers: a cached answer survives them."""
    assert {"performance_mode", "max_num_seqs", "max_num_batched_tokens"} <= PERFORMANCE_ONLY_ARGS
    plain = ModelSpec(model="m", engine_kwargs={})
    assert plain.label() == plain.with_engine_kwargs(performance_mode="throughput").label()
    assert plain.label() == plain.with_engine_kwargs(max_num_seqs=2048).label()
    assert plain.label() != plain.with_engine_kwargs(dtype="float16").label()


def test_detokenize_off_keeps_the_cache_label_and_other_sampling_options_do_not():
    """detokenize=False gives the same text (decoded once at the end): a cached answer survives it."""
    plain = ModelSpec(model="m", engine_kwargs={})
    assert ModelSpec(model="m", engine_kwargs={}, sampling={"detokenize": False}).label() == plain.label()
    assert ModelSpec(model="m", engine_kwargs={}, sampling={"top_k": 20}).label() != plain.label()


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx fma avx2\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16\n"


def test_the_cpu_flags_tell_whether_bfloat16_matmuls_are_native():
    assert not vllm_api.has_native_bf16(AVX2_ONLY)
    assert vllm_api.has_native_bf16(SAPPHIRE_RAPIDS)
    assert not vllm_api.has_native_bf16(ARM)  # no "flags" line: cpu_without_native_bf16 says False there


def test_on_a_cpu_without_native_bfloat16_the_engine_runs_float32_and_says_so():
    kwargs, told = engine_defaults({}, slow_cpu_bf16=True)
    assert kwargs["dtype"] == "float32"
    assert "dtype=float32" in told and "Pass dtype=" in told and "13.8 s" in told
    assert "dtype" not in engine_defaults({}, slow_cpu_bf16=False)[0]


def test_a_user_who_sets_a_dtype_keeps_it_on_any_cpu():
    kwargs, told = engine_defaults({"dtype": "bfloat16"}, slow_cpu_bf16=True)
    assert kwargs["dtype"] == "bfloat16" and told is None


def test_both_choices_are_told_in_one_line():
    kwargs, told = engine_defaults({}, slow_cpu_bf16=True, vllm_max_num_seqs=1024)
    assert kwargs["dtype"] == "float32" and kwargs["max_num_seqs"] == 2048
    assert "dtype=float32" in told and "max_num_seqs=2048" in told
