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
# (On CI's AVX2-only CPU the engines run in float32: the adapter's default there, engine_defaults.)
ENGINE_KWARGS = dict(enforce_eager=True, max_model_len=2048)


# Processes of the session's in-process engine (below): not what a test that checks "no process left" means.
SHARED_PIDS: set[int] = set()


def engine_children():
    """Live child processes of this test process, except Python's resource tracker and the
    processes of the session's in-process engine (``engine_lm``, alive until test_offline kills it)."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in SHARED_PIDS:
                continue
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


# ------------------------------------------------------------------ engines shared by the session
# Each real engine start costs 30-40 s on CI's 2 cores, so tests that read what a real engine does
# share one. Their users run last, in SHARED_ENGINE_MODULES' order (below); the one test that kills
# a shared LM is the last of the last module that uses it (test_offline for `engine_lm`,
# test_multigpu for `pool_lm`), and a later user would be told so by `_alive`. Tests take copies with their own DSPy settings
# (`engine_lm.copy(max_tokens=...)`): a copy shares the engines.


def _alive(lm, name):
    if not any(row["alive"] for row in lm.stats()):
        pytest.fail(f"the shared {name} was killed by an earlier test; destructive tests go last (conftest.py)")
    return lm


@pytest.fixture(scope="session")
def _engine_lm(default_model):
    from vllm_dspy_adapter import vLLMOffline

    before = {p.pid for p in engine_children()}
    lm = vLLMOffline(temperature=0.0, max_tokens=64, **ENGINE_KWARGS)
    SHARED_PIDS.update(p.pid for p in engine_children() if p.pid not in before)
    yield lm
    lm.shutdown()


@pytest.fixture
def engine_lm(_engine_lm):
    """One in-process engine (vLLMOffline, the default model, greedy, DSPy's cache on) for the session."""
    return _alive(_engine_lm, "engine_lm")


@pytest.fixture(scope="session")
def _pool_lm(default_model):
    from vllm_dspy_adapter import vLLMOfflineMultiGPU

    lm = vLLMOfflineMultiGPU(num_replicas=2, temperature=0.0, max_tokens=48, cache=False, **ENGINE_KWARGS)
    yield lm  # not in SHARED_PIDS: test_multigpu's last test checks that none of its processes is left
    lm.shutdown()


@pytest.fixture
def pool_lm(_pool_lm):
    """Two replicas of the default model in worker processes (prefix routing, greedy, no DSPy cache)."""
    return _alive(_pool_lm, "pool_lm")


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


# ------------------------------------------------------------------ engine starts, counted
# Every vLLM engine core this run started (in this process's tree: in-process engines, worker
# processes, example scripts, Ray actors of the test cluster), printed at the end of the run
# beside pytest's own summary, so a change that adds engine starts shows in every CI log.

_ENGINE_CORES: set[int] = set()
_WATCH_STOP = None


def _watch_engine_cores(stop) -> None:
    import psutil

    me = psutil.Process()
    while not stop.wait(0.5):
        try:
            children = me.children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            try:
                if child.pid not in _ENGINE_CORES and "EngineCore" in child.name() + " ".join(child.cmdline()[:1]):
                    _ENGINE_CORES.add(child.pid)
            except psutil.Error:
                pass


def pytest_sessionstart(session):
    import threading

    global _WATCH_STOP
    _WATCH_STOP = threading.Event()
    threading.Thread(target=_watch_engine_cores, args=(_WATCH_STOP,), name="engine-core-count", daemon=True).start()


def pytest_terminal_summary(terminalreporter):
    if _WATCH_STOP is not None:
        _WATCH_STOP.set()
    terminalreporter.write_line(f"engine starts: {len(_ENGINE_CORES)} vLLM engine cores started by this run")


# The modules that use the session's shared engines run last, together and in this order (each
# shared LM is killed by the last test of its last user, test_multigpu and test_offline): the idle
# shared engines (about 3 GB each on CPU) then never sit beside another module's engines, whose
# sum would pass CI's 24 GB.
SHARED_ENGINE_MODULES = ("test_features_engine.py", "test_cancel_engine.py", "test_multigpu.py", "test_offline.py")


def _shared_last(items):
    def rank(item):
        name = item.path.name
        return SHARED_ENGINE_MODULES.index(name) + 1 if name in SHARED_ENGINE_MODULES else 0

    items.sort(key=rank)  # stable: every module keeps its own order, the others theirs


def pytest_collection_modifyitems(config, items):
    _shared_last(items)
    # `model`: a test that loads the embedded model's weights or tokenizer through PyTorch /
    # transformers (the real GRPO trainer, LoRA training, a tokenizer's template) without an engine.
    # `make check` leaves these and the engine tests out; `make unit` and `make test` run them.
    for item in items:
        if "default_model" in getattr(item, "fixturenames", ()) and item.get_closest_marker("engine") is None:
            item.add_marker(pytest.mark.model)
