#!/usr/bin/env bash
# One device call, several GPU jobs: `bash tools/gpu_run.sh JOB...` on the GPU host (carry .whl, .whl-extra
# and .cache). Jobs run in the order given; each writes its log and results under $OUT/r, and the end packs
# them into $OUT/results.tgz (benchmarks/results/ files + logs + a trained checkpoint) and the compile caches
# into $OUT/cache.tgz (carry it back as .cache/fi.tgz: the next machine skips FlashInfer's ~3-minute build).
# Jobs:
#   train-bg      start the tiny-checkpoint training in the background (TRAIN_ARGS, TRAIN_MINUTES)
#   tests         pytest -m gpu on the kernels, FlashInfer's LSE and block-causal prefill (not the e2e suite)
#   adapters      benchmarks/adapters_check.py -> adapters.json
#   kernels       benchmarks/bench_kernels.py (KERNEL_ARGS) -> kernels.json
#   e2e           benchmarks/bench_e2e.py (E2E_ARGS) -> e2e.json
#   wait-train    wait for train-bg, then evaluate the checkpoint (eval_accuracy.py, EVAL_ARGS)
set -u
OUT=${OUT:-/tmp/gpu-out}
R=$OUT/r
CKPT=${CKPT:-/tmp/ckpt/tiny-sdar-recall}
mkdir -p "$R"
t0=$(date +%s)
stamp() { echo "[gpu_run +$(( $(date +%s) - t0 ))s] $*" | tee -a "$R/gpu_run.log"; }
# Packed after every job: a call cut off at the device's time limit still brings back what finished.
pack() { [ -d "$CKPT" ] && rm -rf "$R/checkpoint" && cp -r "$CKPT" "$R/checkpoint"; tar czf "$OUT/results.tgz" -C "$OUT" r; }
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
    tests)
      timeout 300 python -m pytest -m gpu -q -p no:cacheprovider tests/ops tests/gpu/test_flashinfer_lse.py \
        tests/gpu/test_block_causal_gpu.py > "$R/gpu_tests.txt" 2>&1; tail -3 "$R/gpu_tests.txt" ;;
    adapters|adapters2)  # two runs with different arguments: ADAPTERS_ARGS / ADAPTERS2_ARGS
      args=${ADAPTERS_ARGS:-}; [ "$job" = adapters2 ] && args=${ADAPTERS2_ARGS:-}
      timeout "${ADAPTERS_TIMEOUT:-480}" python benchmarks/adapters_check.py --out "$R/$job.json" $args \
        > "$R/$job.log" 2>&1; grep -v "Ignore import" "$R/$job.log" | tail -6 ;;
    kernels)
      timeout "${KERNELS_TIMEOUT:-420}" python benchmarks/bench_kernels.py --out "$R/kernels.json" ${KERNEL_ARGS:-} \
        > "$R/kernels.log" 2>&1; tail -4 "$R/kernels.log" ;;
    e2e)
      timeout "${E2E_TIMEOUT:-420}" python benchmarks/bench_e2e.py --out "$R/e2e.json" ${E2E_ARGS:-} \
        > "$R/e2e.log" 2>&1; tail -12 "$R/e2e.log" ;;
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
