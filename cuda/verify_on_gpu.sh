#!/usr/bin/env bash
# One command for a GPU machine: check/install what the CUDA WKV kernels need, build them, run their tests
# (tests/test_cuda.py: kernels vs the reference loops, the model on cuda vs cpu) and the GPU benchmark
# (benchmarks/gpu_speed.py), and print one summary with the benchmark's table.
#
#   bash cuda/verify_on_gpu.sh                   # everything (about 10-20 minutes on an H100/H200)
#   STEPS=2 MODELS=7-0.1B,7-1.5B bash cuda/verify_on_gpu.sh
#   PYTHON=/path/to/python bash cuda/verify_on_gpu.sh
#
# Environment: PYTHON (a python whose torch has CUDA; default: the first of .venv/bin/python, GPU_VENV,
# python3 that has one), GPU_VENV (where a CUDA build of torch is installed if none is found; default
# ~/.cache/rwkv-state-hub/venv-gpu), TORCH_INDEX_URL (its wheel index; default cu128),
# MODELS, CONFIGS, STEPS, CTX (passed to the benchmark), LOG_DIR (default runs/gpu-verify).
# The log of every step is kept in LOG_DIR; the exit status is non-zero when a test failed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "verify_on_gpu: $*"; }
die() { echo "verify_on_gpu: $*" >&2; exit 1; }

LOG_DIR=${LOG_DIR:-runs/gpu-verify}
GPU_VENV=${GPU_VENV:-$HOME/.cache/rwkv-state-hub/venv-gpu}
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PIP=(-m pip install -q --retries 1 --timeout 15)  # fail fast where there is no network

has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' 2>/dev/null; }

# 1. a python whose torch is a CUDA build and sees the GPU
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in .venv/bin/python "$GPU_VENV/bin/python" python3; do
        if command -v "$candidate" >/dev/null 2>&1 && has_cuda_torch "$candidate"; then PY=$candidate; break; fi
    done
fi
if [ -z "$PY" ]; then
    command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi: this machine has no NVIDIA driver (run this on a GPU machine)"
    nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi sees no GPU"
    say "no python with a CUDA build of torch found: installing one into $GPU_VENV"
    python3 -m venv --system-site-packages "$GPU_VENV" || die "python3 -m venv $GPU_VENV failed"
    "$GPU_VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$GPU_VENV/bin/python" "${PIP[@]}" torch --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" \
        || die "could not install a CUDA build of torch (no network? set PYTHON to a python that has one)"
    PY=$GPU_VENV/bin/python
fi
has_cuda_torch "$PY" || die "$PY: torch has no CUDA or sees no GPU ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))"

# 2. ninja, nvcc and the package's own imports
if ! command -v ninja >/dev/null 2>&1 && ! "$PY" -c 'import ninja' 2>/dev/null; then
    say "installing ninja"
    "$PY" "${PIP[@]}" ninja || die "ninja is missing and could not be installed (pip install ninja)"
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ] && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    die "no CUDA toolkit: nvcc not on PATH, CUDA_HOME unset, no /usr/local/cuda (install the toolkit matching torch's CUDA)"
fi
if ! "$PY" -c 'import rwkv_state_hub, pytest' 2>/dev/null; then
    say "installing the package and pytest"
    "$PY" "${PIP[@]}" -e ".[dev]" || die "could not install the package: $("$PY" -c 'import rwkv_state_hub, pytest' 2>&1 | tail -1)"
fi
if ! "$PY" -c 'import fla' 2>/dev/null; then
    "$PY" "${PIP[@]}" flash-linear-attention >/dev/null 2>&1 || say "flash-linear-attention not installed (the benchmark leaves it out)"
fi

GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo unknown)
TORCH=$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')
NVCC=$( (command -v nvcc >/dev/null 2>&1 && nvcc --version || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version) | tail -1) \
    || NVCC="nvcc: version unknown"
say "GPU $GPU; torch $TORCH; $NVCC"

# 3. build the kernels (cached for later runs)
START=$(date +%s)
"$PY" -c 'import sys; from rwkv_state_hub.wkv import cuda; sys.exit(cuda.load() is None)' 2>&1 | tee "$LOG_DIR/build.log" \
    || die "the CUDA kernels did not build: see $LOG_DIR/build.log"
BUILD_S=$(( $(date +%s) - START ))

# 4. the tests, then the benchmark (it runs even when a test fails, to show what it can)
set +e
"$PY" -m pytest -q -rs tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$LOG_DIR/tests.log"
TESTS_RC=${PIPESTATUS[0]}
BENCH_ARGS=(--steps "${STEPS:-3}" --ctx "${CTX:-1024}")
[ -n "${MODELS:-}" ] && BENCH_ARGS+=(--models "$MODELS")
[ -n "${CONFIGS:-}" ] && BENCH_ARGS+=(--configs "$CONFIGS")
"$PY" benchmarks/gpu_speed.py "${BENCH_ARGS[@]}" 2>"$LOG_DIR/benchmark.err" | tee "$LOG_DIR/benchmark.log"
BENCH_RC=${PIPESTATUS[0]}
set -e

# 5. one summary
echo
echo "==================== rwkv-state-hub CUDA verification ===================="
echo "GPU:        $GPU"
echo "software:   torch $TORCH; $NVCC; kernels built in ${BUILD_S}s"
echo "tests:      $(tail -1 "$LOG_DIR/tests.log")  (tests/test_cuda.py, exit $TESTS_RC)"
echo "benchmark:  exit $BENCH_RC (stderr in $LOG_DIR/benchmark.err)"
cat "$LOG_DIR/benchmark.log"
echo "logs:       $LOG_DIR/"
echo "=========================================================================="
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
