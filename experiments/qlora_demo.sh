#!/usr/bin/env bash
# QLoRA against LoRA (Dettmers et al. 2023): the same rank-8 adapters trained on the sort task for the same
# steps, once on the float32 base and once on the base held in int4 (groups of 32) -- and in int8 with
# QUANTS="int4 int8". From nothing on CPU (the tiny base is pretrained first unless W/base exists).
#
#   bash experiments/qlora_demo.sh WORKDIR        (STEPS=4000 adapter steps; QUANTS="int4")
#
# Prints, as its last line, one JSON object: sort_accuracy_lora, sort_accuracy_qlora_<q> (held-out greedy
# exact match, 200 items), frozen_base_bytes_lora / frozen_base_bytes_qlora_<q> (the frozen base in memory,
# from each run's memory.json), seconds_lora / seconds_qlora_<q>.
# Measured figures: README's "Quantisation and memory".
set -euo pipefail
W=${1:?usage: bash experiments/qlora_demo.sh WORKDIR}
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
STEPS=${STEPS:-4000}
QUANTS=${QUANTS:-int4}
mkdir -p "$W"
if [ ! -d "$W/base/checkpoints" ]; then
  echo "== pretraining the tiny base ($W/base)" >&2
  $PY -m maxlm.train --config=configs/tiny.py --workdir="$W/base" >&2
fi
# The sft demo's LoRA (rank 8 on attention, up and the LM head; see experiments/sft_demo.sh), on sort alone.
FLAGS=(--config.sft.base="$W/base" "--config.sft.tasks=('sort',)" --config.lora.rank=8 --config.lora.alpha=16
       "--config.lora.targets=('q','k','v','o','up','lm_head')" --config.lora.train_template_tokens=False
       --config.train.num_steps="$STEPS" --config.train.eval_every=0 --config.sft.eval_items=0
       --config.checkpoint.every_steps="$STEPS")
run() {  # run NAME [flags...]
  local name=$1; shift
  local start=$SECONDS
  if [ ! -s "$W/$name/sort.json" ]; then
    $PY -m maxlm.sft --config=configs/sft_tiny.py --workdir="$W/$name" "${FLAGS[@]}" "$@" >&2
    [ -s "$W/$name/seconds" ] || echo $((SECONDS - start)) > "$W/$name/seconds"
    $PY -m maxlm.evaluate --workdir="$W/$name" --task=sort --n=200 | tail -n 1 > "$W/$name/sort.json"
  fi
}
echo "== LoRA on the float32 base ($W/lora)" >&2
run lora
for q in $QUANTS; do
  echo "== QLoRA on the $q base ($W/qlora_$q)" >&2
  run "qlora_$q" --config.lora.base_quant="$q"
done

$PY - "$W" $QUANTS <<'PY'
import json, os, sys

w, quants = sys.argv[1], sys.argv[2:]
result = {}
for name in ["lora"] + [f"qlora_{q}" for q in quants]:
    result[f"sort_accuracy_{name}"] = json.load(open(os.path.join(w, name, "sort.json")))["accuracy"]
    result[f"frozen_base_bytes_{name}"] = json.load(open(os.path.join(w, name, "memory.json")))["frozen_base"]
    result[f"seconds_{name}"] = int(open(os.path.join(w, name, "seconds")).read())
    print(f"{name:<12} sort {result[f'sort_accuracy_{name}']:.3f}  frozen base "
          f"{result[f'frozen_base_bytes_{name}'] / 2**10:.0f} KiB  {result[f'seconds_{name}']} s", file=sys.stderr)
print(json.dumps(result))
PY
