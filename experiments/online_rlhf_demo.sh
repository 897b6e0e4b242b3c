#!/usr/bin/env bash
# Online RLHF (InternLM2, section 4.3) against single-round PPO at the same number of PPO iterations, from
# nothing on CPU, on the RLHF demo's models (experiments/rlhf_demo.sh: the partial SFT policy on sort and the
# conditional reward model; the same WORKDIR shares them and the single-round run W/ppo).
#
#   bash experiments/online_rlhf_demo.sh WORKDIR        (SEED=1 for a second seed: W/online_seed1, W/ppo_seed1;
#                                                        NAME=x keeps a variant in W/x)
#
# Single round: PPO for ROUNDS x ROUND_ITERATIONS iterations against the first reward model. Online: ROUNDS
# rounds of
#   1. PPO, ROUND_ITERATIONS iterations against the current reward model, starting from the last round's policy
#      (the KL term's reference stays the SFT policy; its adaptive coefficient continues from the last
#      round's, or with KL_CARRY=0 restarts at ppo.init_kl_coef);
#   2. the judge (python -m maxlm.online): the reward model's accuracy on the new policy's own replies and the
#      RM-vs-true gap, then fresh comparisons of its replies labelled by the checker, each hack written 4x;
#   3. the reward model continues (reward.init_from) on a replay of the built-in pairs + all new comparisons.
# Prints, as its last line, one JSON object: true_score_single_round, true_score_online (held-out exact match
# after the last iteration), kl_single_round, kl_online, rm_policy_accuracy / rm_true_gap /
# sampled_true_score / true_score (lists, one per round), seconds_online.
# Measured on 2 CPU cores shared with other runs (2026-12-06), held-out exact match from 0.436, 6 rounds of 50
# iterations (the defaults):
#   seed 0: single round 0.638 (KL 2.04); online 0.526 / 0.498 / 0.628 / 0.658 / 0.684 / 0.704 (KL 2.35), RM
#           accuracy on the policy's own replies 0.710 / 0.749 / 0.817 / 0.857 / 0.887 / 0.911, RM-vs-true gap
#           0.175 -> 0.035; 3786 s for the online part.
#   seed 1: single round 0.660 (KL 1.89); online 0.488 / 0.540 / 0.614 / 0.632 / 0.672 / 0.704 (KL 2.06), RM
#           accuracy 0.638 / 0.714 / 0.826 / 0.862 / 0.890 / 0.886, gap 0.226 -> 0.055; 3743 s.
# Three rounds of 100 (ROUNDS=3 ROUND_ITERATIONS=100 KL_CARRY=0) ended 0.660 and 0.632 (+2.2, -2.8 points):
# each refresh first costs ground, and shorter rounds pay it while the hacks are few (README, "Online RLHF").
set -euo pipefail
W=${1:?usage: bash experiments/online_rlhf_demo.sh WORKDIR}
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
SFT_STEPS=${SFT_STEPS:-1200}
PARTIAL=${PARTIAL:-400}
ROUNDS=${ROUNDS:-6}
ROUND_ITERATIONS=${ROUND_ITERATIONS:-50}
RM_STEPS=${RM_STEPS:-600}
SEED=${SEED:-0}
NAME=${NAME:-online}  # the online run's folder (W/NAME, W/NAME_seedN)
# 1 (the default): each round's adaptive KL controller starts where the last round's stopped, as it would
# within one PPO run; 0: every round starts again at ppo.init_kl_coef.
KL_CARRY=${KL_CARRY:-1}
SUFFIX=""; [ "$SEED" = 0 ] || SUFFIX="_seed$SEED"
O="$W/$NAME$SUFFIX"
mkdir -p "$W"
# The SFT policy, both reward models and (seed 0) the single-round PPO run, as the RLHF demo makes them.
PPO_ITERATIONS=$((ROUNDS * ROUND_ITERATIONS)) SFT_STEPS=$SFT_STEPS PARTIAL=$PARTIAL \
    bash experiments/rlhf_demo.sh "$W" > "$W/rlhf_demo.json"
ppo() {  # ppo WORKDIR ITERATIONS SEED POLICY REWARD_MODEL [more maxlm.ppo flags]
  $PY -m maxlm.ppo --config=configs/ppo_tiny.py --workdir="$1" --config.ppo.iterations="$2" --config.train.seed="$3" \
      --config.ppo.policy="$4" --config.ppo.policy_step="$([ "$4" = "$W/sft" ] && echo "$PARTIAL" || echo -1)" \
      --config.ppo.reference="$W/sft" --config.ppo.reference_step="$PARTIAL" --config.ppo.reward_model="$5" \
      "${@:6}" >&2
}
last_kl_coef() {  # the adaptive KL coefficient a PPO workdir's last iteration ended with
  $PY -c 'import json, sys; print([json.loads(l) for l in open(sys.argv[1])][-1]["kl_coef"])' "$1/metrics.jsonl"
}
if [ "$SEED" != 0 ]; then
  echo "== single-round PPO, seed $SEED ($W/ppo$SUFFIX)" >&2
  ppo "$W/ppo$SUFFIX" $((ROUNDS * ROUND_ITERATIONS)) "$SEED" "$W/sft" "$W/rm_conditional"
fi

mkdir -p "$O"
start=$SECONDS
rm_now="$W/rm_conditional"
policy="$W/sft"
for r in $(seq 1 "$ROUNDS"); do
  echo "== online round $r: PPO ($O/ppo$r) against $rm_now" >&2
  # Round 1 is the single-round run's first ROUND_ITERATIONS iterations; later rounds draw other prompts.
  kl=()
  if [ "$KL_CARRY" = 1 ] && [ "$r" -gt 1 ]; then kl=("--config.ppo.init_kl_coef=$(last_kl_coef "$policy")"); fi
  ppo "$O/ppo$r" "$ROUND_ITERATIONS" $((SEED + 1000 * (r - 1))) "$policy" "$rm_now" "${kl[@]}"
  echo "== online round $r: the judge ($O/judge$r)" >&2
  [ -s "$O/judge$r/online_eval.json" ] || $PY -m maxlm.online --config=configs/online_tiny.py --workdir="$O/judge$r" \
      --config.online.policy="$O/ppo$r" --config.online.reward_model="$rm_now" --config.online.round="$r" \
      --config.train.seed="$SEED" >&2
  if [ "$r" -lt "$ROUNDS" ]; then
    echo "== online round $r: the reward model continues ($O/rm$r)" >&2
    $PY -m maxlm.reward --config=configs/reward_tiny.py --workdir="$O/rm$r" --config.reward.base="$W/sft" \
        --config.reward.base_step="$SFT_STEPS" --config.reward.init_from="$rm_now" \
        "--config.reward.extra_data=$O/judge[1-$r]/pairs.jsonl" "--config.reward.domains=('correct','brief')" \
        --config.reward.train_size=2000 --config.reward.policy_samples=0 --config.train.num_steps="$RM_STEPS" \
        --config.optim.peak_lr=1e-4 --config.optim.warmup_steps=20 --config.checkpoint.every_steps="$RM_STEPS" >&2
    rm_now="$O/rm$r"
  fi
  policy="$O/ppo$r"
done
[ -s "$O/seconds" ] || echo $((SECONDS - start)) > "$O/seconds"

$PY - "$W/ppo$SUFFIX" "$O" "$ROUNDS" <<'PY'
import json, os, sys

single, online, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])


def records(run):
    by_iteration = {}
    for line in open(os.path.join(run, "metrics.jsonl")):
        r = json.loads(line)
        by_iteration[r.get("iteration", 0)] = r
    return [by_iteration[i] for i in sorted(by_iteration)]


def final(run):
    rs = records(run)
    return [r for r in rs if "eval_true_score" in r][-1]["eval_true_score"], rs[-1]["kl"]


judged = [json.load(open(os.path.join(online, f"judge{r}", "online_eval.json"))) for r in range(1, rounds + 1)]
scores = [final(os.path.join(online, f"ppo{r}")) for r in range(1, rounds + 1)]
single_score, single_kl = final(single)
result = {
    "true_score_single_round": single_score, "true_score_online": scores[-1][0],
    "kl_single_round": single_kl, "kl_online": scores[-1][1],
    "rm_policy_accuracy": [j["rm_policy_accuracy"] for j in judged], "rm_true_gap": [j["rm_true_gap"] for j in judged],
    "sampled_true_score": [j["sampled_true_score"] for j in judged], "true_score": [s for s, _ in scores],
    "new_comparisons": [j["new_comparisons"] for j in judged], "new_hacks": [j["new_hacks"] for j in judged],
    "seconds_online": int(open(os.path.join(online, "seconds")).read()),
}
print("round  held-out true score  KL  RM accuracy on the policy's replies  RM-vs-true gap", file=sys.stderr)
for r, ((s, kl), j) in enumerate(zip(scores, judged), 1):
    print(f"  {r}  {s:.3f}  {kl:.2f}  {j['rm_policy_accuracy']:.3f}  {j['rm_true_gap']:.3f}", file=sys.stderr)
print(f"single round ({single}): {single_score:.3f}, KL {single_kl:.2f}", file=sys.stderr)
print(json.dumps(result))
PY
