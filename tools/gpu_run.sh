#!/usr/bin/env bash
# One device call, several GPU jobs: `bash tools/gpu_run.sh JOB...` on the GPU host (carry .whl
# and .cache). Jobs run in the order given; each writes its log and results under $OUT/r, and the end packs
# them into $OUT/results.tgz (benchmarks/results/ files + logs + a trained checkpoint) and the compile caches
# into $OUT/cache.tgz (carry it back as .cache/fi.tgz: the next machine skips FlashInfer's ~3-minute build).
# Carry limit: the tree (~10 MB) + .whl (~52 MB) + .cache (~3 MB) fit in 64 MiB, + .whl-extra does not.
# Only the HTTP-server jobs (examples, serve-ckpt, serve-robust) need .whl-extra: carry it instead of .cache.
# Jobs:
#   train-bg      start the tiny-checkpoint training in the background (TRAIN_ARGS, TRAIN_MINUTES)
#   graphcheck    benchmarks/cuda_graph_check.py (GRAPH_ARGS): graph vs eager mage engines -> cuda_graph_check.json
#   graphcheck2   the same with GRAPH2_ARGS -> cuda_graph_check2.json
#   eval          eval_accuracy.py on $CKPT: sglang engine (EVAL_ARGS) and reference engine on cuda (EVAL_REF_ARGS)
#   robust-bg     benchmarks/robustness.py (ROBUST_ARGS) in the background; wait-robust waits for it
#   tests         pytest -m gpu on the kernels, FlashInfer's LSE and block-causal prefill (not the e2e suite)
#   adapters      benchmarks/adapters_check.py -> adapters.json
#   kernels       benchmarks/bench_kernels.py (KERNEL_ARGS) -> kernels.json
#   first-step    benchmarks/bench_first_step.py (FIRST_STEP_ARGS) -> first_step.json: P4's parts and tile sweep
#   e2e           benchmarks/bench_e2e.py (E2E_ARGS) -> e2e.json
#   radix         benchmarks/bench_radix_rounds.py (the host's CPU) -> radix_rounds.json
#   wait-train    wait for train-bg, then evaluate the checkpoint (eval_accuracy.py, EVAL_ARGS)
#   sweep-bg      start one training per SWEEP_1..SWEEP_4 (extra train.py args) at once, in the background
#   wait-sweep    wait for them; the run whose last held-out eval is best becomes $CKPT (logs of all come back)
#   adapters-bg   adapters_check.py (ADAPTERS_ARGS) in the background; wait-adapters waits for it
#   examples      examples/serve_tiny.sh (shipped checkpoint), --clients (server + frontend + OpenAI), offline_batch.py
#   serve-ckpt    examples/serve_tiny.sh alone (SERVE_TIMEOUT), its server log kept
#   warm-fi-bg    tools/warm_flashinfer.py (WARM_HEAD_DIMS, default 64) in the background: FlashInfer's JIT build
#   cache64       wait for it, then pack_fi for WARM_HEAD_DIMS: $OUT/fi<d>.txz (carry fi64 in .cache64/)
#   pack-fi       pack_fi for PACK_HEAD_DIMS (default 64 128): what this call's jobs compiled
#   serve-robust  examples/serve_tiny.sh on the checkpoint (SERVE_ARGS), its server then held for
#                 benchmarks/robustness.py --server-url (ROBUST_ARGS): the launch example and the load tests, one start
#   tp2           benchmarks/tp2_check.py (TP2_ARGS) -> tp2.json (needs the nvidia-h200-x2 kind)
#   probe-bg      training/retrieval_probe.py grid (PROBE_GRID, PROBE_MINUTES) in the background; wait-probe
set -u
OUT=${OUT:-/tmp/gpu-out}
R=$OUT/r
CKPT=${CKPT:-/tmp/ckpt/tiny-sdar-recall}
mkdir -p "$R"
t0=$(date +%s)
stamp() { echo "[gpu_run +$(( $(date +%s) - t0 ))s] $*" | tee -a "$R/gpu_run.log"; }
# Packed after every job: a call cut off at the device's time limit still brings back what finished.
pack() { [ -d "$CKPT" ] && rm -rf "$R/checkpoint" && cp -r "$CKPT" "$R/checkpoint"; tar czf "$OUT/results.tgz" -C "$OUT" r; }
serve_checkpoint() {
  PORT=30221 SERVER_LOG="$R/serve_checkpoint_server.log" timeout "${SERVE_TIMEOUT:-200}" bash examples/serve_tiny.sh \
    --mem-fraction-static 0.3 --max-total-tokens 65536 > "$R/examples_serve_checkpoint.log" 2>&1
  echo "serve_tiny (checkpoint) rc=$?"; tail -4 "$R/examples_serve_checkpoint.log"
  [ -s "$R/examples_serve_checkpoint.log" ] || tail -20 "$R/serve_checkpoint_server.log"
}
# Every compiled FlashInfer module + Triton's cache, one archive per head dim ($OUT/fi<d>.txz): modules named
# by another head dim are left out, so each stays small enough to carry (fi128 as .cache/fi.txz, fi64 in .cache64/).
pack_fi() {
  for d in "$@"; do
    (cd ~ && { ls .cache/flashinfer/*/*/cached_ops/*/*.so | awk -v d="head_dim_qk_${d}_" '!/head_dim_qk_/ || index($0, d)'; \
      find .triton/cache -type f 2>/dev/null || true; } > /tmp/fi$d.list && tar cJf "$OUT/fi$d.txz" -T /tmp/fi$d.list)
  done
  ls -la "$OUT"/fi*.txz
}
source tools/gpu_prep.sh > "$R/prep.log" 2>&1 || { cat "$R/prep.log"; exit 1; }
python - > "$R/environment.txt" 2>&1 <<'PY'
import torch, triton, flashinfer, sglang, transformers
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, "flashinfer",
      flashinfer.__version__, "sglang", sglang.__version__, "transformers", transformers.__version__)
PY
stamp "prep done: $(cat "$R/environment.txt" | tail -1)"
export PYTHONUNBUFFERED=1
train_pid=""
for job in "$@"; do
  stamp "start $job"
  case $job in
    train-bg)
      mkdir -p "$(dirname "$CKPT")"
      python -m training.train --out "$CKPT" --minutes "${TRAIN_MINUTES:-6}" ${TRAIN_ARGS:-} > "$R/train.log" 2>&1 &
      train_pid=$! ;;
    sweep-bg)
      sweep_pids=""
      for i in 1 2 3 4; do
        var=SWEEP_$i; [ -z "${!var:-}" ] && continue
        mkdir -p /tmp/sweep/$i
        python -m training.train --out /tmp/sweep/$i --minutes "${TRAIN_MINUTES:-6}" ${TRAIN_ARGS:-} ${!var} \
          > "$R/sweep$i.log" 2>&1 &
        sweep_pids="$sweep_pids $!"
      done ;;
    wait-sweep)
      wait $sweep_pids
      best=$(python tools/pick_checkpoint.py /tmp/sweep/*/training_args.json 2>>"$R/gpu_run.log")
      stamp "best sweep run: $best"
      for d in /tmp/sweep/*; do cp "$d/training_args.json" "$R/sweep$(basename "$d")_args.json" 2>/dev/null; \
        cp "$d/train_log.jsonl" "$R/sweep$(basename "$d")_log.jsonl" 2>/dev/null; done
      [ -n "$best" ] && mkdir -p "$(dirname "$CKPT")" && rm -rf "$CKPT" && cp -r "$best" "$CKPT" ;;
    adapters-bg)
      ENGINE_JOBS_DIR="$R/adapters-engines" timeout "${ADAPTERS_TIMEOUT:-480}" python benchmarks/adapters_check.py \
        --out "$R/adapters.json" ${ADAPTERS_ARGS:-} > "$R/adapters.log" 2>&1 &
      adapters_pid=$! ;;
    wait-adapters)
      wait "$adapters_pid"; echo "adapters rc=$?"; grep -v "Ignore import" "$R/adapters.log" | tail -8 ;;
    examples)  # small fixed KV pools: other engines share the GPU meanwhile
      serve_checkpoint
      PORT=30222 timeout 240 bash examples/serve_tiny.sh --clients --mem-fraction-static 0.5 \
        --max-total-tokens 65536 > "$R/examples_serve.log" 2>&1; echo "serve_tiny --clients rc=$?"
      tail -12 "$R/examples_serve.log"
      timeout 200 python examples/offline_batch.py --model-path "$CKPT" --num-prompts 64 --prompt-len 1024 4096 \
        --mage-k 64 --mem-fraction-static 0.5 --max-total-tokens 131072 --json "$R/offline_batch.json" \
        > "$R/examples_offline.log" 2>&1; echo "offline_batch rc=$?"; tr '\r' '\n' < "$R/examples_offline.log" | tail -6 ;;
    serve-robust)
      stats=/tmp/serve-robust-stats.json hold=/tmp/serve-robust-done; rm -f "$hold" "$stats"
      SGLANG_MAGE_STATS_PATH=$stats PORT=30231 SERVER_LOG="$R/serve_checkpoint_server.log" HOLD_SERVER_UNTIL=$hold \
        bash examples/serve_tiny.sh ${SERVE_ARGS:-} > "$R/examples_serve_checkpoint.log" 2>&1 &
      serve_pid=$!
      for _ in $(seq "${SERVE_TIMEOUT:-300}"); do
        grep -q "holding server" "$R/examples_serve_checkpoint.log" && break; kill -0 $serve_pid 2>/dev/null || break; sleep 1
      done
      stamp "serve_tiny: $(grep -E 'generated|expected|holding' "$R/examples_serve_checkpoint.log" | tr '\n' ' ')"
      if grep -q "holding server" "$R/examples_serve_checkpoint.log"; then
        python benchmarks/robustness.py --server-url http://127.0.0.1:30231 --stats-path "$stats" \
          --out "$R/robustness.json" ${ROBUST_ARGS:-} > "$R/robustness.log" 2>&1; echo "robustness rc=$?"
        tr '\r' '\n' < "$R/robustness.log" | grep -v "Ignore import" | tail -12
      else
        tail -30 "$R/serve_checkpoint_server.log"
      fi
      touch "$hold"; wait $serve_pid; echo "serve_tiny rc=$?" ;;
    serve-ckpt)  # the README's launch example alone: serve_tiny.sh on the shipped checkpoint
      serve_checkpoint ;;
    probe-bg)
      python -m training.retrieval_probe --grid "${PROBE_GRID:-default}" --minutes "${PROBE_MINUTES:-4}" \
        --out "$R/retrieval_probe.json" > "$R/retrieval_probe.log" 2>&1 &
      probe_pid=$! ;;
    wait-probe)
      wait "$probe_pid"; echo "probe rc=$?"; tail -14 "$R/retrieval_probe.log" ;;
    graphcheck|graphcheck2)  # graph vs eager mage engines (benchmarks/cuda_graph_check.py): GRAPH_ARGS / GRAPH2_ARGS
      args=${GRAPH_ARGS:-}; [ "$job" = graphcheck2 ] && args=${GRAPH2_ARGS:-}
      name=cuda_graph_check; [ "$job" = graphcheck2 ] && name=cuda_graph_check2
      timeout "${GRAPH_TIMEOUT:-240}" python benchmarks/cuda_graph_check.py --out "$R/$name.json" $args \
        > "$R/$name.log" 2>&1; echo "$job rc=$?"; tail -8 "$R/$name.log" ;;
    eval)  # the checkpoint through SGLang (EVAL_ARGS) and, at once, the reference engine for recall (EVAL_REF_ARGS)
      if [ -f "$CKPT/model.safetensors" ]; then
        timeout "${EVAL_TIMEOUT:-240}" python benchmarks/eval_accuracy.py --engine reference --device cuda \
          --checkpoint "$CKPT" --out "$R/accuracy_reference.json" ${EVAL_REF_ARGS:-} > "$R/eval_reference.log" 2>&1 &
        ref_pid=$!
        ENGINE_JOBS_DIR="$R/eval-engines" timeout "${EVAL_TIMEOUT:-240}" python benchmarks/eval_accuracy.py \
          --engine sglang --checkpoint "$CKPT" \
          --out "$R/accuracy_sglang.json" ${EVAL_ARGS:-} > "$R/eval.log" 2>&1; echo "eval rc=$?"
        wait $ref_pid; echo "reference eval rc=$?"; grep -v "Ignore import" "$R/eval.log" | tail -16
        tail -14 "$R/eval_reference.log"
      fi ;;
    warm-fi-bg)
      # niced: the build (ninja, all cores) must not starve a training's data workers running meanwhile
      nice -n 19 python tools/warm_flashinfer.py ${WARM_HEAD_DIMS:-64} > "$R/warm_flashinfer.log" 2>&1 &
      warm_pid=$! ;;
    cache64)
      wait "$warm_pid"; cat "$R/warm_flashinfer.log"; pack_fi ${WARM_HEAD_DIMS:-64} ;;
    pack-fi)
      pack_fi ${PACK_HEAD_DIMS:-64 128} ;;
    robust-bg)  # benchmarks/robustness.py (ROBUST_ARGS) in the background, next to the other jobs
      python benchmarks/robustness.py --out "$R/robustness.json" --server-log "$R/robustness_server.log" \
        ${ROBUST_ARGS:-} > "$R/robustness.log" 2>&1 &
      robust_pid=$! ;;
    wait-robust)
      wait "$robust_pid"; echo "robustness rc=$?"; tr '\r' '\n' < "$R/robustness.log" | grep -v "Ignore import" | tail -12 ;;
    tests)
      timeout 300 python -m pytest -m gpu -q -p no:cacheprovider tests/ops tests/gpu/test_flashinfer_lse.py \
        tests/gpu/test_block_causal_gpu.py tests/backend/test_side_stream.py > "$R/gpu_tests.txt" 2>&1; tail -3 "$R/gpu_tests.txt" ;;
    adapters|adapters2)  # two runs with different arguments: ADAPTERS_ARGS / ADAPTERS2_ARGS
      args=${ADAPTERS_ARGS:-}; [ "$job" = adapters2 ] && args=${ADAPTERS2_ARGS:-}
      ENGINE_JOBS_DIR="$R/$job-engines" timeout "${ADAPTERS_TIMEOUT:-480}" python benchmarks/adapters_check.py \
        --out "$R/$job.json" $args > "$R/$job.log" 2>&1; grep -v "Ignore import" "$R/$job.log" | tail -8 ;;
    kernels)
      timeout "${KERNELS_TIMEOUT:-420}" python benchmarks/bench_kernels.py --out "$R/kernels.json" ${KERNEL_ARGS:-} \
        > "$R/kernels.log" 2>&1; tail -4 "$R/kernels.log" ;;
    first-step)
      timeout "${FIRST_STEP_TIMEOUT:-300}" python benchmarks/bench_first_step.py --out "$R/first_step.json" \
        ${FIRST_STEP_ARGS:-} > "$R/first_step.log" 2>&1; echo "first-step rc=$?"; tail -6 "$R/first_step.log" ;;
    tp2)
      NCCL_NVLS_ENABLE=0 timeout "${TP2_TIMEOUT:-480}" python benchmarks/tp2_check.py --out "$R/tp2.json" ${TP2_ARGS:-} \
        > "$R/tp2.log" 2>&1; echo "tp2 rc=$?"; grep -v "Ignore import" "$R/tp2.log" | tail -10 ;;
    radix)
      timeout 120 python benchmarks/bench_radix_rounds.py --out "$R/radix_rounds.json" > "$R/radix_rounds.log" 2>&1
      tail -9 "$R/radix_rounds.log" ;;
    e2e|e2e2)  # two grids in one call: E2E_ARGS -> e2e.json, E2E2_ARGS -> e2e2.json
      args=${E2E_ARGS:-}; [ "$job" = e2e2 ] && args=${E2E2_ARGS:-}
      timeout "${E2E_TIMEOUT:-420}" python benchmarks/bench_e2e.py --out "$R/$job.json" $args \
        > "$R/$job.log" 2>&1; tail -12 "$R/$job.log" ;;
    wait-train)
      [ -n "$train_pid" ] && wait "$train_pid"; tail -3 "$R/train.log"; grep EVAL "$R/train.log" | tail -2
      if [ -f "$CKPT/model.safetensors" ] && [ -n "${EVAL_ARGS:-}" ]; then
        timeout "${EVAL_TIMEOUT:-240}" python benchmarks/eval_accuracy.py --checkpoint "$CKPT" \
          --out "$R/accuracy.json" ${EVAL_ARGS} > "$R/eval.log" 2>&1; tail -6 "$R/eval.log"
      fi ;;
    *) stamp "unknown job $job" ;;
  esac
  stamp "end $job"
  pack
done
[ -z "${NO_CACHE_OUT:-}" ] && tar czf "$OUT/cache.tgz" -C ~ .cache/flashinfer .triton/cache 2>/dev/null
ls -la "$OUT"
stamp "done"
# At most 8 files come back from $OUT: once results.tgz holds everything, drop the loose copies so the
# compile-cache archives are not among those left out (a call cut short keeps its loose files instead).
if [ -f "$OUT/results.tgz" ]; then rm -rf "$R"; fi
