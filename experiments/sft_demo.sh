#!/usr/bin/env bash
# The SFT demonstration, from nothing: the tiny base (configs/tiny.py) -> held-out accuracy on the built-in
# task suite -> full fine-tuning and LoRA (rank 8) fine-tuning (configs/sft_tiny.py) -> held-out accuracy.
#
#   bash experiments/sft_demo.sh WORKDIR
#
# Reuses whatever WORKDIR already has (a finished stage is not rerun). Prints a table and, as its last line,
# one JSON object: accuracy_before / accuracy_after / accuracy_after_lora per task, the fine-tuning wall
# times, and LoRA's optimizer state as a fraction of full fine-tuning's.
set -euo pipefail
W=${1:?usage: bash experiments/sft_demo.sh WORKDIR}
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
mkdir -p "$W"
# LoRA rank 8 on the attention projections, the MLP's up and the LM head, within the issue's budget of 5%
# of full fine-tuning's optimizer state (4.97% at d_model 128). The head is needed: on the tiny base the
# output columns of letters rare in pretraining have collapsed together, and adapters below a frozen head
# cannot separate them (see maxlm/model/lora.py). The markers' rows are left frozen to stay in budget.
# LoRA learns more slowly per step than full fine-tuning (its loss after N steps is full fine-tuning's after
# ~N/3), and the issue sets LoRA no time budget, so it gets three times the steps (same step time). lr 2e-3:
# 4e-3 and 1e-2 were worse; LoRA+ (lora.lr_ratio 4 at 1e-3) was no better in short probes.
LORA_STEPS=${LORA_STEPS:-42000}
LORA_FLAGS=(--config.lora.rank=8 --config.lora.alpha=16 "--config.lora.targets=('q','k','v','o','up','lm_head')"
            --config.lora.train_template_tokens=False --config.optim.peak_lr="${LORA_LR:-2e-3}"
            --config.train.num_steps="$LORA_STEPS" --config.train.eval_every="$((LORA_STEPS / 4))")

if [ ! -d "$W/base/checkpoints" ]; then
  echo "== pretraining the tiny base ($W/base)" >&2
  $PY -m maxlm.train --config=configs/tiny.py --workdir="$W/base" >&2
fi

evaluate() {  # evaluate WORKDIR OUT.json
  $PY -m maxlm.evaluate --workdir="$1" --task=all | tail -n 1 > "$2"
}

finetune() {  # finetune WORKDIR SECONDS_FILE [flags...]
  local dir=$1 seconds=$2; shift 2
  local start=$SECONDS
  $PY -m maxlm.sft --config=configs/sft_tiny.py --workdir="$dir" --config.sft.base="$W/base" "$@" >&2
  [ -s "$seconds" ] || echo $((SECONDS - start)) > "$seconds"
}

echo "== held-out accuracy of the base" >&2
[ -s "$W/before.json" ] || evaluate "$W/base" "$W/before.json"
echo "== full fine-tuning ($W/sft)" >&2
finetune "$W/sft" "$W/sft_seconds"
evaluate "$W/sft" "$W/after.json"
echo "== LoRA fine-tuning ($W/sft_lora)" >&2
finetune "$W/sft_lora" "$W/sft_lora_seconds" "${LORA_FLAGS[@]}"
evaluate "$W/sft_lora" "$W/after_lora.json"

$PY - "$W" <<'PY'
import json, os, sys

w = sys.argv[1]
read = lambda name: json.load(open(os.path.join(w, name)))
before, after, lora = read("before.json"), read("after.json"), read("after_lora.json")
full_mem, lora_mem = read("sft/memory.json"), read("sft_lora/memory.json")
acc = lambda r: {t: v["accuracy"] for t, v in r["tasks"].items()}
seconds = lambda name: int(open(os.path.join(w, name)).read())
result = {"accuracy_before": acc(before), "accuracy_after": acc(after), "accuracy_after_lora": acc(lora),
          "n_per_task": after["tasks"][next(iter(after["tasks"]))]["n"],
          "sft_seconds": seconds("sft_seconds"), "sft_lora_seconds": seconds("sft_lora_seconds"),
          "lora_opt_state_fraction": lora_mem["opt_state"] / full_mem["opt_state"]}
print(f"{'task':<10}{'before':>8}{'full SFT':>10}{'LoRA r8':>10}", file=sys.stderr)
for t in result["accuracy_before"]:
    print(f"{t:<10}{result['accuracy_before'][t]:>8.3f}{result['accuracy_after'][t]:>10.3f}"
          f"{result['accuracy_after_lora'][t]:>10.3f}", file=sys.stderr)
print(f"fine-tuning wall time: full {result['sft_seconds']} s, LoRA {result['sft_lora_seconds']} s; LoRA optimizer "
      f"state = {100 * result['lora_opt_state_fraction']:.2f}% of full fine-tuning's", file=sys.stderr)
print(json.dumps(result))
PY
