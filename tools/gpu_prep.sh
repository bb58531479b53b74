#!/usr/bin/env bash
# Prepare the GPU host for a run (see ../shared/gpu-host/README.md): install the offline SGLang bundle
# (.whl), the HTTP-server extras (.whl-extra, tools/gpu_extra_wheels.sh) and this project into /tmp/site,
# and restore the FlashInfer/Triton compile caches from .cache/fi.tgz. Idempotent on a warm machine.
# Usage: source tools/gpu_prep.sh   (then: tar czf $OUT/cache.tgz -C ~ .cache/flashinfer .triton/cache)
if [ ! -f /tmp/sglang-env.sh ] || [ ! -d /tmp/site/sglang ]; then
  bash .whl/install.sh >/dev/null 2>&1 || { echo "bundle install failed"; return 1 2>/dev/null || exit 1; }
fi
. /tmp/sglang-env.sh
if [ -d .whl-extra ] && [ ! -d /tmp/site/jsonschema ]; then
  pip install -q --no-deps --no-index --target /tmp/site .whl-extra/*.whl >/dev/null 2>&1
fi
pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site --upgrade . >/dev/null 2>&1 \
  || { echo "project install failed"; return 1 2>/dev/null || exit 1; }
# xz: a third of gzip's size, under the carry limit. .cache64/ holds extra modules (tools/warm_flashinfer.py).
if [ ! -f ~/.cache/flashinfer/.restored ]; then
  for cache_tar in .cache/fi.txz .cache/fi.tgz .cache64/*.txz; do
    [ -f "$cache_tar" ] && python -c 'import os, sys, tarfile; tarfile.open(sys.argv[1]).extractall(os.path.expanduser("~"))' "$cache_tar"
  done
  # FlashInfer re-runs ninja on every first use, and ninja rebuilt the restored kernels anyway (~2-3 min).
  # A module whose .so sits in FlashInfer's AOT directory is loaded without ninja: put the cached ones there.
  aot=$(python -c 'import flashinfer.jit.env as e; print(e.FLASHINFER_AOT_DIR)' 2>/dev/null)
  for so in ~/.cache/flashinfer/*/*/cached_ops/*/*.so; do
    [ -f "$so" ] || continue
    name=$(basename "$(dirname "$so")")
    [ "$(basename "$so")" = "$name.so" ] && mkdir -p "$aot/$name" && cp "$so" "$aot/$name/"
  done
  mkdir -p ~/.cache/flashinfer && touch ~/.cache/flashinfer/.restored
fi
echo "gpu_prep: $(python -c 'import torch;print(torch.cuda.get_device_name())') ready"
