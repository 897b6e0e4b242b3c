#!/usr/bin/env bash
# RL on a task with a known optimum (after trlX's random-walks benchmark), from nothing, on CPU, by algorithm:
# random walks through a fixed 21-node directed graph -> a tiny walker pretrained on them -> RL with a
# programmatic reward (distance-to-goal / walk length for valid walks that reach the goal, else 0; the optimal
# policy scores exactly 1 per start) -> 16 walks sampled from every start, scored (the mean reward of the policy
# itself, as a fraction of the optimum).
#
#   bash experiments/rl_shortest_path.sh WORKDIR ALGO      ALGO: ppo | grpo | rloo | dapo
#
#   ppo   maxlm.ppo, configs/ppo_graph.py (a critic on the policy's trunk, GAE)
#   grpo  maxlm.grpo, configs/grpo_graph.py: group-normalised advantages, per-reply token means, k3 KL 0.04
#   rloo  leave-one-out advantages (Ahmadian et al. 2024), a token-level mean
#   dapo  DAPO (Yu et al. 2025): clip-higher 0.28, token-level mean, no KL, dynamic sampling, soft overlong penalty
#
# Measured on 2 CPU cores (2026-12-05, 100 iterations, from 0.603): ppo 0.896 (146 s), grpo 0.981 (124 s),
# rloo 0.985 (131 s; with GRPO's KL weight 0.04 it stalled at 0.945: its unnormalised advantages are several
# times smaller, so the same KL weight holds it back more), dapo 1.000 (154 s).
#
# Reuses whatever WORKDIR already has (the walks, the walker, each ALGO's run). Prints, as its last line, one
# JSON object with fraction_of_optimal (after RL), fraction_of_optimal_before, kl, seconds and algo.
set -euo pipefail
W=${1:?usage: bash experiments/rl_shortest_path.sh WORKDIR ALGO}
ALGO=${2:?usage: bash experiments/rl_shortest_path.sh WORKDIR ppo|grpo|rloo|dapo}
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
case $ALGO in
  ppo) cmd=(-m maxlm.ppo --config=configs/ppo_graph.py) ;;
  grpo) cmd=(-m maxlm.grpo --config=configs/grpo_graph.py) ;;
  rloo) cmd=(-m maxlm.grpo --config=configs/grpo_graph.py --config.grpo.advantage=rloo --config.grpo.loss_agg=token_mean
             --config.grpo.kl_coef=0.01) ;;
  dapo) cmd=(-m maxlm.grpo --config=configs/grpo_graph.py --config.grpo.loss_agg=token_mean --config.grpo.clip_high=0.28
             --config.grpo.kl_coef=0 --config.grpo.dynamic_sampling=True --config.grpo.overlong_buffer=3) ;;
  *) echo "ALGO must be ppo, grpo, rloo or dapo, got $ALGO" >&2; exit 2 ;;
esac
mkdir -p "$W"
[ -s "$W/walks.jsonl" ] || $PY -m maxlm.graph --out="$W/walks.jsonl" --n=20000 --seed=0 --nodes=21 --graph_seed=0 \
    --max_len=10 >&2
echo "== pretraining the walker ($W/walker)" >&2
$PY -m maxlm.train --config=configs/graph_tiny.py --workdir="$W/walker" --config.data.path="$W/walks.jsonl" >&2
echo "== $ALGO ($W/$ALGO)" >&2
start=$SECONDS
$PY "${cmd[@]}" --workdir="$W/$ALGO" --config.ppo.policy="$W/walker" --config.data.path="$W/walks.jsonl" \
    ${RL_FLAGS:-${PPO_FLAGS:-}} >&2
[ -s "$W/${ALGO}_seconds" ] || echo $((SECONDS - start)) > "$W/${ALGO}_seconds"
$PY experiments/rl_result.py "$W/$ALGO" "$W/${ALGO}_seconds" "algo=$ALGO" | $PY -c '
import json, sys
r = json.loads(sys.stdin.read().strip().splitlines()[-1])
r["fraction_of_optimal"], r["fraction_of_optimal_before"] = r.pop("true_score_after"), r.pop("true_score_before")
if r["algo"] == "ppo":
    r["ppo_seconds"] = r["seconds"]
print(json.dumps(r))'
