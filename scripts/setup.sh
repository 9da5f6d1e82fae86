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
# llama-cpp-python compiles llama.cpp (minutes, once per machine: pip's wheel cache keeps the build); where it
# cannot be built, the llama.cpp tests skip saying so and everything else works
.venv/bin/python -m pip install -q -e ".[dev,llama]" \
    || echo "note: llama-cpp-python could not be built; the llama.cpp tests will skip"
.venv/bin/python -c "import torch, rwkv, gradio, rwkv_state_hub; print('ready: torch', torch.__version__)"
