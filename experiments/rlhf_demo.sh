#!/usr/bin/env bash
# The RLHF demonstration, from nothing (InstructGPT's pipeline on the built-in sort task, CPU):
#   tiny base (configs/tiny.py) -> partial SFT on sort (held-out exact match 30-60%) -> reward models on the
#   built-in preference pairs -> PPO against the reward model -> held-out exact match again.
#
#   bash experiments/rlhf_demo.sh WORKDIR
#
# Two reward models are trained on the same pairs from two conflicting domains ("correct": the right answer
# wins; "brief": a shorter, wrong answer wins): one sees each pair's domain as a system prompt (COOL RLHF's
# conditional reward prompts), the other does not. PPO uses the conditional one, queried under "correct".
# Reuses whatever WORKDIR already has (a finished stage is not rerun). Prints, as its last line, one JSON
# object: rm_accuracy, the per-domain accuracies of both reward models, true_score_before/after, kl, and
# ppo_seconds.
set -euo pipefail
W=${1:?usage: bash experiments/rlhf_demo.sh WORKDIR}
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
mkdir -p "$W"
# "Partly trained": the SFT run's checkpoint at step PARTIAL (of SFT_STEPS) is the policy and the reference
# (held-out exact match 0.436 on 500 items, on the tiny base). The reward models start from the finished SFT
# run (InstructGPT trains its RM from an SFT model; a better judge of sorting than the partial policy: held-out
# pairwise accuracy 0.97-0.99 after 2000 steps, vs 0.93 from step PARTIAL after 1000) and also see the partial
# policy's own sampled replies, judged by the checker (an RM that never saw them was exploited within 40 PPO
# iterations: reward up, true score flat). Measured on 2 CPU cores (2026-12-04): RMs correct 0.965 / brief 0.989
# with system prompts, 0.905 / 0.074 without; PPO 300 iterations in 972 s, held-out 0.436 -> 0.650, KL 2.12.
SFT_STEPS=${SFT_STEPS:-1200}
PARTIAL=${PARTIAL:-400}
PPO_ITERATIONS=${PPO_ITERATIONS:-300}
SFT_STEPS=$SFT_STEPS PARTIAL=$PARTIAL bash experiments/partial_sft.sh "$W"

for kind in conditional unconditional; do
  cond=True; [ $kind = unconditional ] && cond=False
  echo "== $kind reward model ($W/rm_$kind)" >&2
  $PY -m maxlm.reward --config=configs/reward_tiny.py --workdir="$W/rm_$kind" --config.reward.base="$W/sft" \
      --config.reward.base_step="$SFT_STEPS" --config.reward.sample_policy="$W/sft" \
      --config.reward.sample_policy_step="$PARTIAL" "--config.reward.domains=('correct','brief')" \
      --config.reward.conditional=$cond >&2
done

echo "== PPO ($W/ppo, $PPO_ITERATIONS iterations)" >&2
start=$SECONDS
$PY -m maxlm.ppo --config=configs/ppo_tiny.py --workdir="$W/ppo" --config.ppo.policy="$W/sft" \
    --config.ppo.policy_step="$PARTIAL" --config.ppo.reward_model="$W/rm_conditional" \
    --config.ppo.iterations="$PPO_ITERATIONS" >&2
[ -s "$W/ppo_seconds" ] || echo $((SECONDS - start)) > "$W/ppo_seconds"

$PY - "$W" <<'PY'
import json, os, sys

w = sys.argv[1]
rm = {k: json.load(open(os.path.join(w, f"rm_{k}", "reward_eval.json"))) for k in ("conditional", "unconditional")}
records = [json.loads(line) for line in open(os.path.join(w, "ppo", "metrics.jsonl"))]
by_step = {r.get("iteration", 0): r for r in records}  # by iteration (the record before training has none)
evals = [by_step[s] for s in sorted(by_step) if "eval_true_score" in by_step[s]]
last = by_step[max(by_step)]
result = {
    "rm_accuracy": rm["conditional"]["by_domain"]["correct"]["accuracy"],
    "rm_by_domain": {k: {d: r["accuracy"] for d, r in v["by_domain"].items()} for k, v in rm.items()},
    "true_score_before": evals[0]["eval_true_score"], "true_score_after": evals[-1]["eval_true_score"],
    "kl": last["kl"], "kl_target": last["kl_target"], "reward_mean_first": by_step[1]["reward_mean"],
    "reward_mean_last": last["reward_mean"], "iterations": int(last["iteration"]),
    "ppo_seconds": int(open(os.path.join(w, "ppo_seconds")).read()),
}
print("held-out accuracy of the reward models (pairs of both domains):", file=sys.stderr)
for k, v in result["rm_by_domain"].items():
    print(f"  {k:<14}" + "  ".join(f"{d} {a:.3f}" for d, a in v.items()), file=sys.stderr)
print("PPO: iteration  reward  kl  true(rollouts)  held-out", file=sys.stderr)
for r in records[1:]:
    if r["iteration"] % 10 == 0 or "eval_true_score" in r:
        print(f"  {int(r['iteration']):>4}  {r['reward_mean']:+.3f}  {r['kl']:.3f}  {r['true_score']:.3f}  "
              f"{r.get('eval_true_score', float('nan')):.3f}", file=sys.stderr)
print(json.dumps(result))
PY
