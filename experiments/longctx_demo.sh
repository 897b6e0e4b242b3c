#!/usr/bin/env bash
# Context extension, from nothing (configs/longctx_tiny.py): the tiny model trained at L = 128 tokens, then a
# 100-step stage at 4L = 512 with YaRN-scaled RoPE, the Pallas flash kernel and 2-way sequence parallelism
# (two CPU devices); perplexity on held-out documents at L and 4L before and after.
#
#   bash experiments/longctx_demo.sh WORKDIR
#
# Rerunning resumes (a finished run only re-measures). Last line: one JSON object with ppl_short,
# ppl_long_before, ppl_long_after (and ppl_long_scaled_only, ppl_short_after, the ratios, `passed`).
set -euo pipefail
W=${1:?usage: bash experiments/longctx_demo.sh WORKDIR}
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2"
start=$SECONDS
$PY -m maxlm.train --config=configs/longctx_tiny.py --workdir="$W" >&2
echo "== training: $((SECONDS - start)) s" >&2
$PY experiments/longctx_demo.py --workdir="$W" --before_step=600
