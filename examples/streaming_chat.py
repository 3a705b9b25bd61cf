"""Token streaming as a chat UI shows it: the reasoning appears word by word.

    python examples/streaming_chat.py        # the program's output only
    python examples/streaming_chat.py -v     # also vLLM's own logs

`dspy.streamify` with a `StreamListener` on ChainOfThought's `reasoning` field:
each piece is printed the moment vLLM decodes it (the request runs with vLLM's
DELTA outputs; every non-streamed request keeps whole-answer outputs). The LM is
`vLLMOfflineMultiGPU`, so the pieces come from replicas in worker processes (one
per GPU; two CPU replicas on a machine without GPU); `vLLMOffline` streams the
same way. Executed by the test suite on CPU with the embedded default model.
"""

import asyncio
import sys
import time

from vllm_dspy_adapter.logs import quiet_engine_logs

QUIET = quiet_engine_logs(verbose="-v" in sys.argv[1:] or "--verbose" in sys.argv[1:])

import dspy  # noqa: E402

from vllm_dspy_adapter import vLLMOfflineMultiGPU, visible_gpu_count  # noqa: E402

QUESTIONS = ["Why is the sky blue?", "What is 12 + 30?"]


async def show(program, question: str) -> None:
    """One question, printed as it streams; timings show the pieces came early."""
    listener = dspy.streaming.StreamListener(signature_field_name="reasoning")
    streaming = dspy.streamify(program, stream_listeners=[listener])
    started, first, pieces = time.monotonic(), None, 0
    print(f"Q: {question}\n   reasoning: ", end="", flush=True)
    async for item in streaming(question=question):
        if isinstance(item, dspy.streaming.StreamResponse):
            first = time.monotonic() - started if first is None else first
            pieces += 1
            print(item.chunk, end="", flush=True)
        elif isinstance(item, dspy.Prediction):
            whole = time.monotonic() - started
            when = f"first piece after {first:.1f} s, " if first is not None else ""
            print(f"\n   answer: {item.answer!r}   ({pieces} pieces; {when}whole answer after {whole:.1f} s)")


def main() -> None:
    started = time.monotonic()
    # round_robin: each question goes to the next replica, so every replica streams one.
    replicas = None if visible_gpu_count() else 2
    with vLLMOfflineMultiGPU(num_replicas=replicas, routing="round_robin", temperature=0.0, max_tokens=128,
                             max_model_len=2048, enforce_eager=True, use_tqdm_on_load=not QUIET, cache=False) as lm:
        print(f"engine ready in {time.monotonic() - started:.0f} s: {lm.model} ({lm.num_replicas} replicas)",
              flush=True)
        # JSONAdapter: structured outputs make even the 135M default model write each field.
        dspy.configure(lm=lm, adapter=dspy.JSONAdapter())
        program = dspy.ChainOfThought("question -> answer")
        for question in QUESTIONS:
            asyncio.run(show(program, question))
        print(f"requests per replica: {[entry.get('requests', 0) for entry in lm.stats()]}")
    print("streaming_chat: done")


if __name__ == "__main__":  # required: vLLM starts its engine in child processes (spawn)
    main()
