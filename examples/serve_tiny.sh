#!/usr/bin/env bash
# Launch an SGLang server with --attention-backend mage on a dummy-weight tiny SDAR model, send one request,
# and stop the server. On a machine without a CUDA GPU, run MAGE's CPU reference path instead.
# Usage: bash examples/serve_tiny.sh [--text] [--clients] [extra launch_server flags, e.g. --mage-k 64]
#   --text     give the model a word-level tokenizer (examples/tiny_model.py) so text APIs work
#   --clients  (implies --text) also run examples/frontend_program.py and examples/openai_completions.py
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
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "No CUDA GPU here: running the CPU reference path (python -m sglang_mage.demo)."
  exec python3 -m sglang_mage.demo
fi
model_dir=$(mktemp -d)/tiny-sdar
port=${PORT:-30000}
if [ "$text" = 1 ]; then
  python3 "$here/tiny_model.py" "$model_dir" --tokenizer
  tokenizer_flags=()
else
  python3 "$here/tiny_model.py" "$model_dir"
  tokenizer_flags=(--skip-tokenizer-init)
fi
python3 -m sglang.launch_server --model-path "$model_dir" --load-format dummy "${tokenizer_flags[@]}" \
  --dllm-algorithm LowConfidence --attention-backend mage --mage-k 64 --mage-min-context 256 \
  --max-running-requests 4 --port "$port" "$@" > /tmp/mage-server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $server 2>/dev/null || { tail -50 /tmp/mage-server.log; exit 1; }
  sleep 1
done
python3 - "$port" <<'PY'
import json, random, sys, urllib.request
port = sys.argv[1]
ids = [random.Random(0).randrange(100, 150000) for _ in range(1000)]
body = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": 16}}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", body, {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=600))
print("generated:", out.get("output_ids", out.get("text")))
PY
if [ "$clients" = 1 ]; then
  python3 "$here/frontend_program.py" --url "http://127.0.0.1:$port"
  python3 "$here/openai_completions.py" --url "http://127.0.0.1:$port/v1"
fi
grep -m1 "sglang-mage: k=" /tmp/mage-server.log || true
