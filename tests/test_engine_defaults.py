"""The adapter's engine defaults (``config.engine_defaults``): what is set when the user
sets nothing, what a user's own setting keeps, and vLLM's per-card limits read for real."""

import pytest

from vllm_dspy_adapter import vllm_api
from vllm_dspy_adapter.config import PERFORMANCE_ONLY_ARGS, THROUGHPUT_MIN_SEQS, ModelSpec, engine_defaults


def test_on_a_large_card_the_throughput_mode_is_chosen_and_said_once():
    kwargs, message = engine_defaults({"max_model_len": 4096}, vllm_max_num_seqs=1024)
    assert kwargs == {"disable_log_stats": True, "enable_prefix_caching": True, "performance_mode": "throughput",
                      "max_model_len": 4096}
    assert "performance_mode='throughput'" in message and "1024 -> 2048" in message
    assert "performance_mode='balanced'" in message  # how to undo it


@pytest.mark.parametrize("own", [{"performance_mode": "balanced"}, {"max_num_seqs": 512},
                                 {"max_num_batched_tokens": 8192}, {"performance_mode": "interactivity"}])
def test_a_users_batch_setting_keeps_vllms_behaviour(own):
    kwargs, message = engine_defaults(dict(own), vllm_max_num_seqs=1024)
    assert message is None
    assert kwargs.get("performance_mode") == own.get("performance_mode")
    assert {k: kwargs[k] for k in own} == own


@pytest.mark.parametrize("seqs", [None, 256, THROUGHPUT_MIN_SEQS - 1])
def test_cards_it_was_not_measured_on_keep_vllms_limits(seqs):
    kwargs, message = engine_defaults({}, vllm_max_num_seqs=seqs)
    assert message is None and "performance_mode" not in kwargs
    assert kwargs == {"disable_log_stats": True, "enable_prefix_caching": True}


def test_the_users_own_values_win_over_every_default():
    kwargs, _ = engine_defaults({"enable_prefix_caching": False, "disable_log_stats": False},
                                vllm_max_num_seqs=1024)
    assert kwargs["enable_prefix_caching"] is False and kwargs["disable_log_stats"] is False


def test_the_mode_does_not_change_the_cache_label():
    assert "performance_mode" in PERFORMANCE_ONLY_ARGS
    plain = ModelSpec(model="m", engine_kwargs={})
    assert plain.label() == plain.with_engine_kwargs(performance_mode="balanced").label()


def test_vllms_own_limit_for_this_machine_is_read_from_vllm():
    """On the CPU build vLLM's LLM-class limit is 256 sequences a socket: no throughput mode here."""
    seqs = vllm_api.default_max_num_seqs(1)
    assert isinstance(seqs, int) and seqs > 0
    if seqs < THROUGHPUT_MIN_SEQS:
        assert "performance_mode" not in engine_defaults({}, vllm_max_num_seqs=seqs)[0]
