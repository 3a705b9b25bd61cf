import os
import pathlib
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Real vLLM (CPU build) with the embedded default model; small KV cache per engine
# so several engines fit on a CI machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_DSPY_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Settings every engine test uses: eager mode starts a 135M model in ~30 s instead of ~100 s.
ENGINE_KWARGS = dict(enforce_eager=True, max_model_len=2048)


def engine_children():
    """Live child processes of this test process, except Python's resource tracker."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" in " ".join(child.cmdline()) or child.status() == psutil.STATUS_ZOMBIE:
                continue
            out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_for(predicate, timeout, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def prompts(n, salt):
    # Prompt i has i+1 words, so its token count tells its position: order is checkable.
    return [f"{salt} " + " ".join(["count"] * (i + 1)) for i in range(n)]


@pytest.fixture(scope="session")
def default_model():
    from vllm_dspy_adapter.models import resolve_model

    return resolve_model(None)


def assert_streams_in_pieces(lm):
    """A streamed request on a replica outside this process (worker process, Ray actor):
    pieces arrive, and they add up to the whole-answer path's answer."""
    from dspy.lm15 import Config, Message, Request

    engine = lm.engine
    request = Request(model="m", messages=(Message.user("Count from one to twenty in words."),),
                      config=Config(max_tokens=32, temperature=0.0))
    events = list(engine.stream(request))
    pieces = [e.delta.text for e in events if e.type == "delta" and e.delta.type == "text"]
    assert events[0].type == "start" and events[-1].type == "end"
    assert len(pieces) >= 3, pieces
    assert "".join(pieces) == engine.complete(request).text
