#!/usr/bin/env bash
# Wheels that SGLang 0.5.14's HTTP server (launch_server) imports but the shared offline GPU bundle
# (../shared/gpu-host/bundle.sh) leaves out: jsonschema (OpenAI chat serving) and soundfile (realtime
# sessions), with their dependencies. Found by importing sglang.srt.entrypoints.http_server on a CPU venv.
# Usage: bash tools/gpu_extra_wheels.sh [DIR]   (default .whl-extra; add it to .git/info/exclude and `carry`)
# On the GPU host: pip install -q --no-deps --no-index --target /tmp/site DIR/*.whl
set -euo pipefail
dir=${1:-.whl-extra}
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" jsonschema jsonschema-specifications referencing rpds-py soundfile cffi pycparser
ls "$dir"
