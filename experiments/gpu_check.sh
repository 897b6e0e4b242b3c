#!/usr/bin/env bash
# The GPU check a session runs first when it is lent a GPU machine: the flash-attention kernels compiled for
# the GPU (Triton) against the float32 reference -- every GPU-family test of tests/test_flash_attention.py,
# not interpreted -- then the sliding-window benchmark. Needs only jax (no maxlm dependencies beyond
# `kernels`), so it runs on the device image as it is.
#
#   bash experiments/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp}}
PY=${PYTHON:-python3}
nvidia-smi -L || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
$PY -m pytest -q --noconftest -p no:cacheprovider tests/test_flash_attention.py -k "gpu or skipping" 2>&1 \
  | tee "$OUT/flash_tests.log" | tail -15
$PY experiments/bench_window.py 2>&1 | tee "$OUT/bench_window.log"
