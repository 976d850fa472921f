#!/usr/bin/env bash
# Run on a machine with one CUDA GPU, torch, no network and no bitsandbytes: install the carried wheels
# (.whl/: bitsandbytes slimmed to its CUDA 13 library, transformers, peft, huggingface_hub), then the check.
#   prepare here:  bash bench/gpu_check.sh --prepare     (downloads and slims the wheels into .whl/)
#   run there:     bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2 huggingface_hub==2.4.0
  whl=$(ls .whl/bitsandbytes-*.whl)
  zip -q -d "$whl" 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*' || true
  ls -la .whl
  exit 0
fi
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 bench/gpu_check.py
