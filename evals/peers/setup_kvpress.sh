#!/usr/bin/env bash
# Builds .venv-kvpress: NVIDIA kvpress in its own virtualenv, because kvpress 0.5.5 pins
# transformers<5.3 while combllama runs 5.23. The harness talks to it only through JSON files
# (evals/peers/run_kvpress.py). torch goes in FIRST and pinned: an open range would pull the
# multi-GB CUDA build on a CPU machine (the +cpu wheel comes from the local wheelhouse / index).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
VENV=${KVPRESS_VENV:-.venv-kvpress}
TORCH=${TORCH:-torch==2.13.0}
KVPRESS=${KVPRESS:-kvpress==0.5.5}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH"
"$VENV/bin/pip" install -q "$KVPRESS" "$TORCH"
"$VENV/bin/python" -c "import kvpress, transformers, torch; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '?', 'transformers', transformers.__version__, 'torch', torch.__version__)"
