#!/usr/bin/env bash
# Launch an SGLang server with --attention-backend mage on the shipped tiny checkpoint
# (checkpoints/tiny-sdar-recall), ask it one needle-retrieval question, and stop the server. On a machine
# without a CUDA GPU, evaluate that checkpoint through MAGE's PyTorch reference path instead.
# Usage: bash examples/serve_tiny.sh [--text] [--clients] [extra launch_server flags, e.g. --mage-k 64]
#   --text     use a dummy-weight tiny SDAR with a word-level tokenizer (examples/tiny_model.py) so text APIs work
#   --clients  (implies --text) also run examples/frontend_program.py and examples/openai_completions.py
# Environment: PORT (default 30000), SERVER_LOG (the server's log, default /tmp/mage-server.log),
#   HOLD_SERVER_UNTIL=PATH keeps the server up after the examples until PATH exists (tools/gpu_run.sh
#   serve-robust points benchmarks/robustness.py at it)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
text=0 clients=0
while [ $# -gt 0 ]; do
  case "$1" in
    --text) text=1; shift ;;
    --clients) text=1; clients=1; shift ;;
    *) break ;;
  esac
done
root=$(cd "$here/.." && pwd)
checkpoint=$root/checkpoints/tiny-sdar-recall
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if [ -f "$checkpoint/model.safetensors" ]; then
    echo "No CUDA GPU here: the shipped checkpoint through MAGE's PyTorch reference (1024-token prompts)."
    exec python3 "$root/benchmarks/eval_accuracy.py" --engine reference --checkpoint "$checkpoint" \
      --contexts 1024 --samples 16 --methods exact mage quest oracle --ks 128 --no-plot --out /tmp/mage-demo.json
  fi
  echo "No CUDA GPU here: running the CPU reference path (python -m sglang_mage.demo)."
  exec python3 -m sglang_mage.demo
fi
model_dir=$(mktemp -d)/tiny-sdar
port=${PORT:-30000}
server_log=${SERVER_LOG:-/tmp/mage-server.log}
if [ "$text" = 1 ]; then
  python3 "$here/tiny_model.py" "$model_dir" --tokenizer
  # A tokenizer makes SGLang start its grammar backend (xgrammar by default), which the examples never use
  # and which a minimal install may lack (it did on the GPU host: benchmarks/results/raw/examples_serve_*).
  tokenizer_flags=(--grammar-backend none)
  tokenizer_flags+=(--load-format dummy)
elif [ -f "$checkpoint/model.safetensors" ]; then
  model_dir=$checkpoint
  tokenizer_flags=(--skip-tokenizer-init)
else
  python3 "$here/tiny_model.py" "$model_dir"
  tokenizer_flags=(--skip-tokenizer-init --load-format dummy)
fi
python3 -m sglang.launch_server --model-path "$model_dir" "${tokenizer_flags[@]}" \
  --dllm-algorithm LowConfidence --attention-backend mage --mage-k 64 --mage-min-context 256 \
  --max-running-requests 4 --port "$port" "$@" > "$server_log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
trap 'exit 143' TERM INT  # so a timeout's SIGTERM also stops the server (EXIT trap)
echo "server starting (log: $server_log)"
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -50 "$server_log"; exit 1; }
  sleep 1
done
python3 - "$port" "$model_dir" "$root" <<'PY'
import json, random, sys, urllib.request
port, model_dir, root = sys.argv[1:4]
vocab = json.load(open(f"{model_dir}/config.json"))["vocab_size"]
answer = None
if vocab == 1024:  # the shipped checkpoint: a needle question it was trained on, block-aligned as in training
    sys.path.insert(0, root)
    from training.train import padded_batch
    prompts, answers, _ = padded_batch(random.Random(0), 1, 1024, 4, ("needle",))
    ids, answer = prompts[0].tolist(), answers[0].tolist()
else:
    ids = [random.Random(0).randrange(100, 150000) for _ in range(1000)]
body = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": 4 if answer else 16,
                                                         "temperature": 0}}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", body, {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=600))
got = out.get("output_ids", out.get("text"))
print("generated:", got)
if answer:
    print("expected: ", answer, "(correct)" if got[:4] == answer else "(wrong)")
PY
if [ "$clients" = 1 ]; then
  python3 "$here/frontend_program.py" --url "http://127.0.0.1:$port"
  python3 "$here/openai_completions.py" --url "http://127.0.0.1:$port/v1"
fi
grep -m1 "sglang-mage: k=" "$server_log" || true
if [ -n "${HOLD_SERVER_UNTIL:-}" ]; then
  echo "holding server on port $port until $HOLD_SERVER_UNTIL exists"
  while [ ! -e "$HOLD_SERVER_UNTIL" ]; do
    kill -0 $server 2>/dev/null || { echo "server exited while held"; tail -30 "$server_log"; exit 1; }
    sleep 1
  done
fi
