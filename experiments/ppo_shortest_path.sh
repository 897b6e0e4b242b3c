#!/usr/bin/env bash
# PPO on a task with a known optimum (after trlX's random-walks benchmark), from nothing, on CPU:
# random walks through a fixed 21-node directed graph -> a tiny walker pretrained on them -> PPO with a
# programmatic reward (distance-to-goal / walk length for valid walks that reach the goal, else 0; the
# optimal policy scores exactly 1 per start) -> 16 walks sampled from every start, scored
# (the mean reward of the policy itself, as a fraction of the optimum).
#
#   bash experiments/ppo_shortest_path.sh WORKDIR
#
# Reuses whatever WORKDIR already has. Prints, as its last line, one JSON object with fraction_of_optimal
# (after PPO), fraction_of_optimal_before, kl and ppo_seconds.
set -euo pipefail
W=${1:?usage: bash experiments/ppo_shortest_path.sh WORKDIR}
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
mkdir -p "$W"
[ -s "$W/walks.jsonl" ] || $PY -m maxlm.graph --out="$W/walks.jsonl" --n=20000 --seed=0 --nodes=21 --graph_seed=0 \
    --max_len=10 >&2
echo "== pretraining the walker ($W/walker)" >&2
$PY -m maxlm.train --config=configs/graph_tiny.py --workdir="$W/walker" --config.data.path="$W/walks.jsonl" >&2
echo "== PPO ($W/ppo)" >&2
start=$SECONDS
$PY -m maxlm.ppo --config=configs/ppo_graph.py --workdir="$W/ppo" --config.ppo.policy="$W/walker" \
    --config.data.path="$W/walks.jsonl" ${PPO_FLAGS:-} >&2
[ -s "$W/ppo_seconds" ] || echo $((SECONDS - start)) > "$W/ppo_seconds"

$PY - "$W" <<'PY'
import json, os, sys

w = sys.argv[1]
by_step = {}  # by iteration (the record before training, at step 0, has none)
for line in open(os.path.join(w, "ppo", "metrics.jsonl")):
    r = json.loads(line)
    by_step[r.get("iteration", 0)] = r
evals = [by_step[s] for s in sorted(by_step) if "eval_true_score" in by_step[s]]
last = by_step[max(by_step)]
result = {"fraction_of_optimal": evals[-1]["eval_true_score"], "fraction_of_optimal_before": evals[0]["eval_true_score"],
          "reward_mean_last": last["reward_mean"], "kl": last["kl"], "iterations": int(last["iteration"]),
          "ppo_seconds": int(open(os.path.join(w, "ppo_seconds")).read())}
print("PPO: iteration  reward(rollouts)  kl  fraction of optimal (sampled)", file=sys.stderr)
for r in evals:
    print(f"  {int(r.get('iteration', 0)):>4}  {r.get('reward_mean', float('nan')):.3f}  {r.get('kl', float('nan')):.3f}  "
          f"{r['eval_true_score']:.3f}", file=sys.stderr)
print(json.dumps(result))
PY
