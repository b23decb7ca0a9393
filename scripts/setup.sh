#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh Debian machine for quantlab:
# Debian packages (demo data, text corpora, Chromium for the UI browser test, a C compiler
# for the CPU statistics loop),
# a virtual environment in .venv, PyTorch (CPU) and quantlab with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS="dataset-fashion-mnist fortunes wordnet-base chromium chromium-driver gcc libc6-dev"
missing=""
for p in $DEBS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.quantlab-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU build of torch 2.13.0 (a wheel on this kind of machine's disk); other
  # machines get it from PyPI.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[onnx,ui,hf,lightning,dev,vision]"
  touch "$stamp"
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, quantlab; print("torch", torch.__version__, "quantlab", quantlab.__version__)'))"
