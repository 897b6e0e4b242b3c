#!/usr/bin/env bash
# GRPO from nothing, on CPU, rewarded by the task's own checker (a verifiable reward: no reward model): tiny
# base -> the RLHF demo's partial SFT policy on sort (experiments/partial_sft.sh; held-out exact match ~0.45)
# -> GRPO (configs/grpo_tiny.py: 8 prompts x 8 replies per iteration) -> held-out exact match again.
#
#   bash experiments/grpo_demo.sh WORKDIR [extra maxlm.grpo flags, e.g. --config.grpo.advantage=rloo]
#
# Reuses whatever WORKDIR already has (the same WORKDIR as rlhf_demo.sh shares its base and SFT runs; set
# RUN=name to keep several variants side by side). Prints, as its last line, one JSON object:
# true_score_before, true_score_after, kl (per reply, to the SFT reference, on the last iteration's
# rollouts), reward_mean_last, iterations, seconds.
# Measured on 2 CPU cores shared with other runs (2026-12-06; configs/grpo_tiny.py: GRPO advantages with DAPO's
# token-mean loss, clip-higher and dynamic sampling): held-out 0.436 -> 0.814 (seed 0, KL 3.48, 1639 s) and
# -> 0.782 (--config.train.seed=1, KL 0.91, 1325 s). Plain GRPO (2026-12-05): 0.454 -> 0.698, KL 1.93, 1048 s.
# RLOO advantages with the same options (RUN=rloo ... --config.grpo.advantage=rloo): 0.436 -> 0.780, KL 2.32, 1461 s.
set -euo pipefail
W=${1:?usage: bash experiments/grpo_demo.sh WORKDIR [maxlm.grpo flags]}
shift
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
SFT_STEPS=${SFT_STEPS:-1200}
PARTIAL=${PARTIAL:-400}
RUN=${RUN:-grpo}
SFT_STEPS=$SFT_STEPS PARTIAL=$PARTIAL bash experiments/partial_sft.sh "$W"

echo "== GRPO ($W/$RUN)" >&2
start=$SECONDS
$PY -m maxlm.grpo --config=configs/grpo_tiny.py --workdir="$W/$RUN" --config.ppo.policy="$W/sft" \
    --config.ppo.policy_step="$PARTIAL" "$@" >&2
[ -s "$W/${RUN}_seconds" ] || echo $((SECONDS - start)) > "$W/${RUN}_seconds"
$PY experiments/rl_result.py "$W/$RUN" "$W/${RUN}_seconds"
