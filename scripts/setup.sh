#!/usr/bin/env bash
# Create (or update) .venv with everything the project needs. Idempotent.
# torch==2.13.0 goes in FIRST: on these machines that pin is a local CPU build, while a bare `torch`
# requirement would pull a multi-GB CUDA build. Every other requirement is satisfiable by it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, rwkv, gradio, rwkv_state_hub; print('ready: torch', torch.__version__)"
