#!/usr/bin/env bash
# The GPU backend measured on one CUDA GPU (H100 or H200; no network, no bitsandbytes, hqq, datasets, plotly or
# gradio there: they travel as wheels in .whl/). Five parts, each a module run from the repository root with its
# own timeout, each writing its JSON under $OUT (default /tmp/gpu_check) as it ends, the device named in each:
#   1. gpu_check.json       python -m bench.gpu_check: the CUDA path's init on a small Llama against the CPU path's
#                           calibrated objective, layer by layer (within 1%), with peft's LoftQ beside our svd;
#   2. scale-7b.json        python -m bench.scale --shape 7b: Llama-2-7B's shape (32 blocks, random bf16 weights,
#                           NF4): closed_form at rank 64 on 128 x 2048 calibration tokens, its seconds and peak CUDA
#                           memory, beside one QLoRA step at batch 1 x 2048 and peft's replace_lora_weights_loftq
#                           (one iteration, on the first 4 blocks: compared per block);
#   3. gpu_train.json       python -m bench.gpu_train: qlora4 against quailora4 fine-tuning of a ~1B-parameter Llama
#                           from a config, 20 steps: tokens/s and peak-memory ratios;
#   4. gpu_app.json         python -m bench.gpu_app: the app launched, driven by gradio_client: the init flow and 5
#                           fine-tuning steps of a small config model on the GPU (without gradio: the same through the
#                           flows, and the JSON says the app was not launched);
#   5. gpu_quantizers.json  python -m bench.gpu_quantizers: replace_lora_weights_quailora on a small model per
#                           quantizer: bitsandbytes 4-bit, 8-bit and HQQ.
# Then summary.json (each part's exit code and seconds) and log.txt (this script's output): 7 files, within the 8
# a call brings back. Under 9 minutes in all: a deadline 530 s after the start cuts each part's timeout to what is
# left. Order: parts 1, 5, 4 (short, while the 7B checkpoint is written in the background), then 2, then 3.
#
#   here, once:         bash bench/gpu_check.sh --prepare   (downloads and slims the wheels into .whl/; sizes; needs)
#   on the GPU machine: bash bench/gpu_check.sh             (run: carry=[".whl"], timeout_s 600)
#   here, on the CPU:   bash bench/gpu_check.sh --small     (the same parts on tiny shapes, the CUDA side on the CPU,
#                                                            under a simulation of the machine's packages)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODE=${1:-}

if [ "$MODE" = "--prepare" ]; then
  PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl)
  rm -rf .whl && mkdir -p .whl
  grep -qx '/.whl/' .gitignore 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # the engine: bitsandbytes (only its CUDA 13 and CPU libraries kept), peft, hqq (+ termcolor; einops is there),
  # datasets (+ dill, multiprocess), plotly; the app: gradio and what it needs that the image lacks
  "${PIP[@]}" bitsandbytes==0.50.2 peft==0.21.2 termcolor==3.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    plotly==7.1.0 gradio==6.31.0 gradio_client==2.7.2 hf-gradio==0.4.1 brotli==1.2.1 fastapi==0.165.0 groovy==0.1.2 \
    orjson==3.13.0 pydantic==2.14.4 pydantic-core==2.50.5 pydub==0.25.1 python-multipart==0.0.34 pytz==2026.6 \
    safehttpx==0.1.7 semantic-version==2.10.0 starlette==1.10.0 tomlkit==0.14.0 uvicorn==0.55.0 \
    annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.3 2> >(grep -v 'is ignored' >&2) \
    || exit 1
  # hqq is published as a source archive only: build its pure-Python wheel (no CUDA kernels: DISABLE_CUDA)
  DISABLE_CUDA=1 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl hqq==0.2.8.post1 \
    2> >(grep -v 'is ignored' >&2) || exit 1
  zip -q -d .whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_rocm*' \
    'bitsandbytes/libbitsandbytes_xpu*' || true
  # gradio: the browser's ffmpeg (wasm), the server-side-rendering node bundle, sample media and tests are unused by
  # a server that gradio_client drives
  zip -q -d .whl/gradio-*.whl 'gradio/templates/frontend/static/ffmpeg/*' 'gradio/templates/node/*' \
    'gradio/media_assets/*' 'gradio/test_data/*' 'gradio/CHANGELOG.md' || true
  python3 -m bench.gpu_image check .whl
  exit $?
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  QUAILORA_PERPLEXITY_CACHE=off GRADIO_ANALYTICS_ENABLED=False
START=$(date +%s)
DEADLINE=$((START + 530))

run_all() {
  local SMALL=() PY=python3 SHAPE=7b
  if [ "$MODE" = "--small" ]; then
    SMALL=(--small); SHAPE=tiny
    [ -x .venv/bin/python ] && PY=.venv/bin/python
    # the GPU machine's packages, simulated: what neither its image nor .whl/ holds is hidden from every process
    rm -rf /tmp/gpu_check_sim
    $PY -m bench.gpu_image simulate /tmp/gpu_check_sim .whl || return 1
    export PYTHONPATH=/tmp/gpu_check_sim
  else
    rm -rf /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || echo "WARNING: the carried wheels did not install (bash bench/gpu_check.sh --prepare here, and" \
                         "carry .whl): the parts that need them will fail"
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi
  $PY -c 'if True:
    import platform
    from importlib import metadata
    import torch, transformers
    def v(n):
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            return "absent"
    print("python", platform.python_version(), "| torch", torch.__version__, "| transformers",
          transformers.__version__, "| peft", v("peft"), "| bitsandbytes", v("bitsandbytes"), "| hqq", v("hqq"),
          "| gradio", v("gradio"), "| cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'

  # Llama-2-7B's shape: closed_form at rank 64 on 128 x 2048 tokens; the QLoRA step first (the memory to stay under),
  # LoftQ last (on the first 4 blocks). Its random-weight checkpoint (13.5 GB) is written in the background while
  # parts 1, 5 and 4 run.
  local SCALE=(--shape "$SHAPE" --methods closed_form --stages qlora init loftq --stage-timeout 200
               --loftq-blocks "$([ "$SHAPE" = 7b ] && echo 4 || echo 1)")
  timeout 240 "$PY" -m bench.scale "${SCALE[@]}" --make-only > /tmp/gpu_check_make.txt 2>&1 &
  local MAKE=$!

  declare -A RC SECS
  part() {  # part NAME LIMIT module args...: run with min(LIMIT, the time left before the deadline)
    local name=$1 limit=$2 t0 left
    shift 2
    left=$((DEADLINE - $(date +%s)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 5 ]; then
      echo "=== $name: skipped, no time left before the 530 s deadline"; RC[$name]=skipped; return
    fi
    echo "=== $name (timeout ${limit} s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$PY" -m "$@"
    RC[$name]=$?
    SECS[$name]=$(($(date +%s) - t0))
    echo "=== $name: exit ${RC[$name]} after ${SECS[$name]} s"
  }

  part cpu_vs_cuda 90 bench.gpu_check "${SMALL[@]}"
  part quantizers 60 bench.gpu_quantizers "${SMALL[@]}"
  part app 90 bench.gpu_app "${SMALL[@]}"
  wait $MAKE
  echo "checkpoint: exit $? ($(tail -1 /tmp/gpu_check_make.txt))"
  part "scale_$SHAPE" 300 bench.scale "${SCALE[@]}" --json "$OUT/scale-$SHAPE.json"
  part train_1b 150 bench.gpu_train "${SMALL[@]}"

  local sep="" name rc
  {
    echo "{"
    echo "  \"mode\": \"${MODE:-gpu}\", \"seconds\": $(($(date +%s) - START)),"
    echo "  \"parts\": {"
    for name in cpu_vs_cuda quantizers app "scale_$SHAPE" train_1b; do
      rc=${RC[$name]:-not run}; [[ "$rc" =~ ^[0-9]+$ ]] || rc="\"$rc\""
      printf '%s    "%s": {"exit": %s, "seconds": %s}' "$sep" "$name" "$rc" "${SECS[$name]:-null}"
      sep=$',\n'
    done
    printf '\n  }\n}\n'
  } > "$OUT/summary.json"
  cat "$OUT/summary.json"
  echo "total: $(($(date +%s) - START)) s; results in $OUT"
}

run_all 2>&1 | tee "$OUT/log.txt"
