#!/usr/bin/env bash
# Run on a machine with one CUDA GPU, torch, transformers, no network and no bitsandbytes: install the carried
# wheels (.whl/: bitsandbytes slimmed to its CUDA 13 library, peft), then
#   1. python -m bench.gpu_check: the CUDA path's init on a small Llama matches the CPU path's objective (within
#      1%), and peft's LoftQ beside our svd;
#   2. python -m bench.scale on Llama-2-7B's shape: load, plain QLoRA set-up + one step, calibration (128 x 2048
#      tokens) + svd + closed_form at rank 64, peft's LoftQ (one iteration, on the first 4 blocks: it is slow);
#      seconds and peak CUDA memory.
# Both run as modules from the repository root (the scripts' folder is the package `bench`; quailora_app and
# tests.helpers are imported from the checkout).
# Budget: under 8 minutes in all (each part has its own timeout; JSON lands in $OUT as each stage ends).
#   prepare here:  bash bench/gpu_check.sh --prepare     (downloads and slims the wheels into .whl/)
#   run there:     bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    bitsandbytes==0.50.2 peft==0.21.2
  whl=$(ls .whl/bitsandbytes-*.whl)
  zip -q -d "$whl" 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*' || true
  ls -la .whl
  exit 0
fi
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OUT
timeout 120 python3 -m bench.gpu_check
timeout 330 python3 -m bench.scale --shape 7b --methods svd closed_form --stages init qlora loftq --loftq-blocks 4 --stage-timeout 200 \
  --json "$OUT/scale-7b.json"
