"""Request generators for W1-W5.

Every measured run draws fresh prompts from a seed made of (workload, run key),
so two runs in one engine never share a prompt (vLLM's prefix cache would
inflate the second) while every system gets exactly the same requests for the
same run key, which is what makes their numbers comparable.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what up out who them some "
    "time could into two more other then than its only first also new after used made many may people way "
    "water world number sound place years work part long right system group state small large point river "
    "city country paper market energy history method result theory light field value order power change "
    "science model signal animal plant island mountain ocean reason answer question example evidence "
    "process structure function measure amount surface pressure weight distance moment season century"
).split()


@dataclass
class Request:
    """One request of a workload. Exactly one of token_ids / messages is set."""

    max_tokens: int
    token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    group: int = -1  # W3: the candidate (shared prefix) index
    # None: the model's generation config decides (W5 samples as a small-model user would).
    temperature: float | None = 0.0


@dataclass
class Workload:
    name: str  # "W1", "W2-threads", "W2-batch", "W3", "W4", "W5-batch", "W5-threads"
    requests: list[Request]
    variant: str = ""
    threads: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def planned_output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)


def seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def token_range(tokenizer) -> tuple[int, int]:
    """Ordinary token ids (no special tokens) to draw random prompts from."""
    vocab = int(getattr(tokenizer, "vocab_size", 0) or len(tokenizer))
    low = 1000 if vocab > 20000 else 300
    return low, vocab - 64


def _random_ids(rng: np.random.Generator, tokenizer, shape) -> np.ndarray:
    low, high = token_range(tokenizer)
    return rng.integers(low, high, size=shape)


def w1(tokenizer, settings, n_requests: int, run_key: str) -> Workload:
    rng = np.random.default_rng(seed_of("w1", settings.seed, run_key))
    ids = _random_ids(rng, tokenizer, (n_requests, settings.w1_prompt_len))
    reqs = [Request(max_tokens=settings.w1_output_len, token_ids=row.tolist()) for row in ids]
    return Workload("W1", reqs)


def output_lengths(rng: np.random.Generator, n: int, mean: int, low: int, cap: int) -> list[int]:
    """Long-tailed output lengths: log-normal with sigma 1 and the given mean, capped."""
    sigma = 1.0
    mu = math.log(max(mean, 1)) - sigma * sigma / 2
    draws = rng.lognormal(mu, sigma, size=n)
    return [int(min(max(round(x), low), cap)) for x in draws]


def _sentence(rng: np.random.Generator, low: int, high: int) -> str:
    n = int(rng.integers(low, high + 1))
    words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), size=n)]
    return " ".join(words).capitalize()


def w2_messages(settings, n_requests: int, run_key: str) -> tuple[list[list[dict[str, str]]], list[int]]:
    """Chat messages rendered by DSPy's ChatAdapter for a ChainOfThought signature
    with demos (what a DSPy program sends), and per-request output lengths."""
    import dspy

    rng = np.random.default_rng(seed_of("w2", settings.seed, run_key))
    # A run-specific instruction, so the system message of one run is not a cached
    # prefix of the next run in the same engine.
    instructions = (f"Answer the question using the context of the conversation. Think step by step. "
                    f"Session {rng.integers(0, 10**9)}.")
    signature = dspy.Signature("question -> answer", instructions)
    program = dspy.ChainOfThought(signature)
    predictor_signature = program.named_predictors()[0][1].signature
    demos = [dspy.Example(question=_sentence(rng, 20, 40) + "?", reasoning=_sentence(rng, 60, 120) + ".",
                          answer=_sentence(rng, 3, 8) + ".") for _ in range(settings.w2_demos)]
    adapter = dspy.ChatAdapter()
    messages = [adapter.format(predictor_signature, demos, {"question": _sentence(rng, 15, 40) + "?"})
                for _ in range(n_requests)]
    lengths = output_lengths(rng, n_requests, settings.w2_mean_output, settings.w2_min_output,
                             settings.w2_max_output)
    return messages, lengths


def w2(settings, name: str, n_requests: int, run_key: str, threads: int | None = None) -> Workload:
    messages, lengths = w2_messages(settings, n_requests, run_key)
    reqs = [Request(max_tokens=k, messages=m) for m, k in zip(messages, lengths)]
    variant = f"threads={threads}" if threads else ""
    return Workload(name, reqs, variant=variant, threads=threads)


def w3(tokenizer, settings, run_key: str) -> Workload:
    """32 candidate prefixes (2-3k tokens each) x 64 questions, candidate-major by default."""
    rng = np.random.default_rng(seed_of("w3", settings.seed, run_key))
    prefixes = [_random_ids(rng, tokenizer, int(rng.integers(settings.w3_prefix_min, settings.w3_prefix_max + 1)))
                .tolist() for _ in range(settings.w3_candidates)]
    questions = _random_ids(rng, tokenizer, (settings.w3_questions, settings.w3_question_len)).tolist()
    pairs = [(c, q) for c in range(settings.w3_candidates) for q in range(settings.w3_questions)]
    if settings.w3_order == "interleaved":
        pairs.sort(key=lambda cq: (cq[1], cq[0]))
    reqs = [Request(max_tokens=settings.w3_output_len, token_ids=prefixes[c] + questions[q], group=c)
            for c, q in pairs]
    return Workload("W3", reqs, variant=settings.w3_order,
                    meta={"candidates": settings.w3_candidates, "questions": settings.w3_questions})


def w3_kv_tokens(settings) -> int:
    """KV cache per replica for W3: room for a few prefixes plus the running sequences' own tokens."""
    if settings.w3_kv_tokens:
        return settings.w3_kv_tokens
    own = settings.w3_question_len + settings.w3_output_len + 32
    return settings.w3_kv_prefixes * settings.w3_prefix_max + 64 * own


def kv_bytes_per_token(model_path: str) -> int:
    """bf16 K and V for every layer: what one token of KV cache costs."""
    import json
    import os

    with open(os.path.join(model_path, "config.json")) as fh:
        cfg = json.load(fh)
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads", heads)
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 2


# --------------------------------------------------------------------------- W5

def w5(tokenizer, settings, name: str, n_requests: int, run_key: str, threads: int | None = None) -> Workload:
    """Small-model work: ``w5_prompt_len`` prompt tokens, ``w5_output_len`` output tokens, the
    model's own sampling settings. W5-batch: random token ids, every request at once;
    W5-threads: one user message of about as many words (a chat call, rendered and tokenized
    by the system under test), at most ``threads`` in flight."""
    rng = np.random.default_rng(seed_of("w5", settings.seed, run_key))
    if name == "W5-batch":
        ids = _random_ids(rng, tokenizer, (n_requests, settings.w5_prompt_len))
        reqs = [Request(max_tokens=settings.w5_output_len, token_ids=row.tolist(), temperature=None) for row in ids]
    else:
        words = max(settings.w5_prompt_len - 16, 1)  # the chat template's own tokens make up the rest
        reqs = [Request(max_tokens=settings.w5_output_len, temperature=None, messages=[
            {"role": "user", "content": " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=words))}])
            for _ in range(n_requests)]
    return Workload(name, reqs, variant=f"threads={threads}" if threads else "", threads=threads)


# --------------------------------------------------------------------------- W4

def w4_devset(settings) -> list:
    """Two-number sums: a real model's answers can be checked, and parsing is exercised."""
    import dspy

    rng = np.random.default_rng(seed_of("w4", settings.seed))
    out = []
    for _ in range(settings.w4_examples):
        a, b = (int(x) for x in rng.integers(2, 60, size=2))
        out.append(dspy.Example(question=f"What is {a} plus {b}?", answer=str(a + b)).with_inputs("question"))
    return out


def w4_metric(example, prediction, trace=None) -> bool:
    return str(example.answer) in str(getattr(prediction, "answer", "") or "")


# --------------------------------------------------------------------------- W6

@dataclass
class W6Shape:
    """SGLang ``bench_serving``'s generated-shared-prefix shape (issue 20): the work GEPA,
    MIPROv2 and BootstrapFewShot send (a few long candidate prefixes, many short questions)."""

    groups: int = 64
    questions: int = 16
    prefix_len: int = 2048
    question_len: int = 128
    output_len: int = 256


def w6(tokenizer, shape: W6Shape, run_key: str, seed: int = 0) -> Workload:
    """``groups`` random prefixes x ``questions`` random questions each, shuffled (DSPy's
    threads send a candidate's questions mixed with the others'), fresh per ``run_key``."""
    rng = np.random.default_rng(seed_of("w6", seed, run_key))
    prefixes = _random_ids(rng, tokenizer, (shape.groups, shape.prefix_len)).tolist()
    questions = _random_ids(rng, tokenizer, (shape.groups * shape.questions, shape.question_len)).tolist()
    reqs = [Request(max_tokens=shape.output_len, token_ids=prefixes[g] + questions[g * shape.questions + q], group=g)
            for g in range(shape.groups) for q in range(shape.questions)]
    order = rng.permutation(len(reqs))
    return Workload("W6", [reqs[i] for i in order], meta={"groups": shape.groups, "questions": shape.questions})


def w6_kv_tokens(shape: W6Shape, prefixes: int, running: int = 64) -> int:
    """KV cache per replica for W6: room for ``prefixes`` prefixes plus ``running`` sequences' own tokens."""
    return prefixes * shape.prefix_len + running * (shape.question_len + shape.output_len + 32)
