#!/usr/bin/env bash
# DPO from nothing, on CPU, with no reward model: tiny base -> the RLHF demo's partial SFT policy on sort
# (experiments/partial_sft.sh; held-out exact match ~0.45) -> DPO (configs/dpo_tiny.py) on the policy's own
# sampled replies, a wrong one rejected against a right one by the task checker -> held-out exact match again,
# and the policy's KL to the SFT reference on its own sampled replies (the same figure as PPO's kl).
#
#   bash experiments/dpo_demo.sh WORKDIR [extra maxlm.dpo flags, e.g. --config.dpo.loss=ipo]
#
# Reuses whatever WORKDIR already has (the same WORKDIR as rlhf_demo.sh shares its base and SFT runs).
# Prints, as its last line, one JSON object: true_score_before, true_score_after, kl, accuracy (the implicit
# reward's pairwise accuracy on held-out pairs), steps and dpo_seconds.
# Measured on 2 CPU cores (2026-12-05, configs/dpo_tiny.py: on-policy pairs + RPO's NLL term, 300 steps):
# held-out 0.454 -> 0.788, KL 2.06 (seed 0); 0.454 -> 0.770, KL 2.18, 462 s (seed 1, --config.train.seed=1).
set -euo pipefail
W=${1:?usage: bash experiments/dpo_demo.sh WORKDIR [maxlm.dpo flags]}
shift
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
SFT_STEPS=${SFT_STEPS:-1200}
PARTIAL=${PARTIAL:-400}
DPO=${DPO_DIR:-dpo}
SFT_STEPS=$SFT_STEPS PARTIAL=$PARTIAL bash experiments/partial_sft.sh "$W"

echo "== DPO ($W/$DPO)" >&2
start=$SECONDS
$PY -m maxlm.dpo --config=configs/dpo_tiny.py --workdir="$W/$DPO" --config.dpo.base="$W/sft" \
    --config.dpo.base_step="$PARTIAL" "$@" >&2
[ -s "$W/${DPO}_seconds" ] || echo $((SECONDS - start)) > "$W/${DPO}_seconds"

$PY - "$W" "$DPO" <<'PY'
import json, os, sys

w, name = sys.argv[1], sys.argv[2]
records = [json.loads(line) for line in open(os.path.join(w, name, "metrics.jsonl"))]
evals = [r for r in records if "eval_true_score" in r]
result = {"true_score_before": evals[0]["eval_true_score"], "true_score_after": evals[-1]["eval_true_score"],
          "kl": evals[-1]["eval_kl"], "accuracy": evals[-1].get("eval_accuracy"), "steps": int(records[-1]["step"]),
          "dpo_seconds": int(open(os.path.join(w, f"{name}_seconds")).read())}
print("DPO: step  held-out true score  KL  held-out pair accuracy", file=sys.stderr)
for r in evals:
    print(f"  {int(r['step']):>4}  {r['eval_true_score']:.3f}  {r['eval_kl']:.3f}  {r.get('eval_accuracy', float('nan')):.3f}",
          file=sys.stderr)
print(json.dumps(result))
PY
