#!/usr/bin/env bash
# The GPU check a session runs first when it is lent a GPU machine (H100/H200), in at most ten minutes:
#   1. the environment (GPU, driver, jax and its CUDA plugin, the Python packages used here);
#   2. the flash-attention kernels compiled for the GPU (Triton) against the float32 reference: every
#      GPU-family test of tests/test_flash_attention.py, not interpreted;
#   3. attention: Pallas vs cuDNN vs XLA at T = 4k and 16k, head dim 128, causal, bf16, forward and fwd+bwd;
#   4. training: llama_1b in bf16, MFU with two remat policies (experiments/bench_train.py, JAX only);
#   5. decoding: llama_1b tokens/s at batch 1 and 32 against the HBM roofline (experiments/bench_decode.py);
# then OUT/gpu_check.md (one table per part) and OUT/gpu_check.json. Every part has its own time limit, so
# one that hangs costs its limit, not the check.
#
#   bash experiments/gpu_check.sh [OUT_DIR]          QUICK=1: small shapes (a dry run, e.g. on a CPU)
#
# The device image has jax 0.11 for CUDA, flax, optax, orbax and transformers but not ml_collections: put its
# wheel in .whl/ and carry it (README, "GPU check"); it is installed into /tmp/site here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false
QUICK=${QUICK:-0}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY - <<'PY'
import importlib.metadata as md, platform, jax
print("python", platform.python_version(), "| jax", jax.__version__, "| devices", jax.devices())
for name in ("jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "ml_collections",
             "transformers", "torch", "triton", "sentencepiece", "tokenizers"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
} 2>&1 | tee "$OUT/env.txt"

if [ "$QUICK" = 1 ]; then
  SEQS=256,512; TRAIN=(--config=configs/tiny.py --steps=2); DECODE=(--config=configs/tiny.py --new_tokens=16 --prompt_len=16 --batch_sizes=1,4)
  FLASH_K="gpu and not bfloat16 and not slow"
else
  SEQS=4k,16k; TRAIN=(--config=configs/llama_1b.py --steps=5 --config.data.batch_size=8); DECODE=(--config=configs/llama_1b.py)
  FLASH_K="gpu or skipping"
fi

echo "== flash kernels compiled for the GPU, against the reference"
timeout 200 $PY -m pytest -q --noconftest -p no:cacheprovider tests/test_flash_attention.py -k "$FLASH_K" 2>&1 \
  | tee "$OUT/flash_tests.log" | tail -5

echo "== attention: Pallas vs cuDNN vs XLA"
timeout 150 $PY experiments/bench_attention.py --seqs=$SEQS --head_dims=128 --impls=pallas,cudnn,xla \
  --json_out="$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -12

for remat in dots_with_no_batch_dims full; do
  echo "== train step, remat $remat"
  timeout 120 $PY experiments/bench_train.py "${TRAIN[@]}" --notorch --config.model.compute_dtype=bfloat16 \
    --config.model.remat_policy=$remat --config.mesh.data=1 --config.mesh.fsdp=1 2>&1 \
    | tee "$OUT/train_$remat.log" | tail -4
done

echo "== decode"
timeout 120 $PY experiments/bench_decode.py "${DECODE[@]}" --config.model.compute_dtype=bfloat16 2>&1 \
  | tee "$OUT/decode.log" | tail -6

$PY experiments/gpu_check_report.py "$OUT"
