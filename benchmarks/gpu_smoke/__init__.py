"""The smoke every change to src/ must pass on a lent GPU: each public path once, on dummy weights.

    python -m benchmarks.gpu_smoke --out $OUT          # GPU: Qwen3-0.6B-shaped folder, load_format="dummy"
    python -m benchmarks.gpu_smoke --cpu               # this CPU machine: the default model, dummy weights

One line per path, ``PASS <name> <detail> [seconds]`` or ``FAIL <name> <error> [seconds]``,
then ``SMOKE: n passed, m failed``; exit code 0 only when every line passed. A line that
raises is a FAIL and the run goes on; every line has its own deadline: past it the
stacks of this process (faulthandler) and of its children (py-spy, when installed) go to
``<out>/stacks-<line>.txt``, the line is a FAIL and the run goes on (a hang is evidence,
not a wait). Tracebacks go to stderr; stdout holds only the header and the lines.

Three layouts are started, one after another: ``vLLMOffline(enable_lora=True)`` for the
``offline.*``, ``dspy.*``, ``jsonadapter.*``, ``streamify``, ``tool_call`` and ``lora.*``
lines; ``vLLMOfflineMultiGPU`` with one worker-process replica (``multigpu.proc1``); and
with two replicas on the GPU, ``replicas_per_gpu=2`` (``multigpu.rpg2``, ``stats``). On
CPU (``--cpu``) the two layouts are ``num_replicas=1`` and ``num_replicas=2``.

What random weights let us assert. The weights are noise, so answers are noise: no line
checks what a model says, only that every call comes back, in order, counted, typed:

- ``dspy.evaluate64``: DSPy's ChatAdapter cannot parse noise, falls back to JSONAdapter
  (structured outputs) and may still fail to parse (a string field that never closes is
  cut at ``max_tokens``). An ``AdapterParseError`` is the adapter's verdict on the text,
  so it counts as answered; any other exception (ours or vLLM's) fails the line. Checked:
  Evaluate returns one result per example, every example's program call ended, the engine
  served at least one request per example and held more than one at once.
- Structured outputs on noise: vLLM's JSON grammar lets whitespace in between tokens, and a
  BPE vocabulary has hundreds of whitespace-only tokens (Qwen3: 422, SmolLM2: 160) against a
  handful that move the JSON on, so noise writes mostly whitespace: a forced answer takes tens
  to a thousand tokens, at random (measured on CPU with dummy SmolLM2: 67-707 tokens for an
  ``int`` answer, 90-996 for a forced tool call). Those lines therefore get
  ``--noise-max-tokens`` (1536) and send several requests; each must either hold what was
  forced or have been cut at ``max_tokens`` inside it (finish reason ``length``), and at
  least one must have finished. An answer that is neither fails the line.
- ``jsonadapter.typed``: ``answer: int`` with JSONAdapter (structured outputs), 8 requests;
  every finished one parses as an ``int`` (the type asserted).
- ``streamify``: ``dspy.streamify`` of a JSONAdapter ``Predict``, first without listeners
  (DSPy then yields the LM's own stream chunks): at least 2 chunks arrive before the end,
  their text is the LM's answer, and the stream ends (a Prediction, or the adapter's parse
  error on noise cut at ``max_tokens``); then with a ``StreamListener`` on the field: it
  must end the same way, and what it heard is reported, not required (DSPy's JSON
  listener waits for ``"answer":`` written exactly, which noise's whitespace often breaks).
- ``tool_call``: ``tool_choice="required"`` makes vLLM's structural tag force the
  hermes ``<tool_call>`` format (the tool's only argument is an enum), 4 requests; every
  finished one holds a ``get_weather`` call with valid JSON arguments.
- ``lora.*``: a random rank-8 adapter written from config.json's shapes
  (``lora_bench.write_random_adapter``), loaded, then asked through a ``with_adapter`` LM
  with DSPy's response cache on (a folder of this run): ``lm(prompt)`` and a
  ``dspy.Predict``. After ``unload_adapter`` the same calls and new ones must be refused
  with an error naming the adapter, before any request reaches the engine.
  ``lora.unload_refused``: a new ``lm(prompt)`` call. ``lora.unload_predict``: a new
  ``dspy.Predict`` question, and issue 22's case: the Predict question and the LM call
  answered before the unload, asked again (DSPy's cache answered them under the adapter's
  label; DSPy's parse error on that cached noise is an answer read, not a refusal).
- ``grpo.step``: ``lm.reinforce`` (the trainer loads the same folder with transformers: on
  GPU it holds random weights, ``bench_models.benchmark_weights_path``; ``train_kwargs`` in
  TRL's names, with gradient checkpointing, bf16 and DAPO's loss), one GRPO step on 4
  completions the LM sampled (two passes of 2, one optimiser update), the new adapter version loaded and serving the LM's next call
  (``stats()["served_by"]``), a checkpoint written as a PEFT folder, the job terminated
  (``shutdown.clean`` then checks that no GPU memory is left behind, the trainer's included).
- ``multigpu.proc1`` / ``multigpu.rpg2``: ``batch_generate`` of 256 / 512 random-token prompts
  with ``ignore_eos`` (every result has exactly ``max_tokens`` tokens; req/s printed, on
  dummy weights a sanity number, not a benchmark); rpg2: both replicas were routed requests
  and returned results. ``stats``: every replica reports requests, tokens and
  ``prefix_cache_hit_rate``, held more than one request at once (``peak_unfinished``),
  and had no stall and no restart (``health_timeout`` would have hidden a stall otherwise).
  The rpg2 layout routes with ``routing="cache"`` (a ``CacheRouter`` that counts only what
  the engines' KV-cache events say they hold). ``routing.cache_events``: no replica fell
  back to the approximate policy, the events of a prompt's prefill reach the router (it
  holds the prompt's blocks on the replica that served it), and follow-ups sharing the
  prefix go there and hit vLLM's prefix cache.
- ``shutdown.clean``: after each of the three shutdowns no child process of this one is
  left; on GPU also no compute app but this process in ``nvidia-smi`` and the GPU's used
  memory back within 1 GiB of what it was before the first start.

The files: ``runner.py`` (``Line``, ``run_lines``: no engine; tests/test_gpu_smoke.py checks it),
``plan.py`` (model folder, engine arguments, deadlines), ``machine.py`` (versions, nvidia-smi),
``smoke.py`` (``Smoke``: helpers, shutdowns, the plan of lines) with the lines of each layout in
``offline_lines.py``, ``lora_lines.py`` and ``serving_lines.py``, and ``main.py``.
"""


from __future__ import annotations

from .main import main
from .runner import Line, Result, dump_stacks, run_lines
from .smoke import Smoke

__all__ = ["Line", "Result", "Smoke", "dump_stacks", "main", "run_lines"]
