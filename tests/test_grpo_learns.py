"""benchmarks/grpo_learns.py's reward and summary (the run itself: benchmarks/results/grpo-learns-cpu)."""

from types import SimpleNamespace

from benchmarks.grpo_learns import HELD_OUT_QUESTIONS, TRAIN_QUESTIONS, reward, summary, title_model


def test_the_reward_is_the_word_yes_in_any_case():
    said = [SimpleNamespace(text=t) for t in ("Yes, it is.", "yes", "I think YES!", "No.", "Yesterday it was.", "")]
    assert [reward(o) for o in said] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_held_out_questions_are_never_trained_on():
    assert not set(TRAIN_QUESTIONS) & set(HELD_OUT_QUESTIONS)
    assert len(HELD_OUT_QUESTIONS) == 16


def test_summary_gives_a_95_percent_interval():
    row = summary([0.0, 1.0] * 8)
    assert row["mean"] == 0.5 and row["n"] == 16 and 0.2 < row["ci95"] < 0.3
    assert title_model("/x/SmolLM2-135M-Instruct@a653590e7c") == "SmolLM2-135M-Instruct"
