#!/usr/bin/env bash
# The starting point every post-training demo shares (rlhf_demo.sh, dpo_demo.sh): the tiny base
# (configs/tiny.py) and an SFT run on the built-in sort task whose checkpoint at step PARTIAL (of SFT_STEPS)
# is "partly trained" -- held-out exact match 0.454 on 500 items, room to improve -- and whose final
# checkpoint is a better judge for reward models. Reuses whatever WORKDIR already has.
#
#   bash experiments/partial_sft.sh WORKDIR      (sourced by the demos, which read SFT_STEPS and PARTIAL)
set -euo pipefail
W=${1:?usage: bash experiments/partial_sft.sh WORKDIR}
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
SFT_STEPS=${SFT_STEPS:-1200}
PARTIAL=${PARTIAL:-400}
mkdir -p "$W"
if [ ! -d "$W/base/checkpoints" ]; then
  echo "== pretraining the tiny base ($W/base)" >&2
  $PY -m maxlm.train --config=configs/tiny.py --workdir="$W/base" >&2
fi
echo "== partial SFT on sort ($W/sft, $SFT_STEPS steps)" >&2
$PY -m maxlm.sft --config=configs/sft_tiny.py --workdir="$W/sft" --config.sft.base="$W/base" \
    "--config.sft.tasks=('sort',)" --config.train.num_steps="$SFT_STEPS" --config.train.eval_every=100000 \
    --config.sft.eval_items=0 --config.checkpoint.every_steps="$PARTIAL" --config.checkpoint.keep_period="$PARTIAL" >&2
