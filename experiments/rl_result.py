"""The JSON line of an RL demo (maxlm.ppo / maxlm.grpo workdir): held-out true score before and after, the last
iteration's KL and reward, and the run's wall time; prints the evaluation table to stderr.

    python experiments/rl_result.py WORKDIR/RUN SECONDS_FILE [key=value ...]   (extra keys join the JSON)
"""

import json
import os
import sys


def main(run: str, seconds_file: str, *extra: str) -> None:
    by_iteration = {}  # the record before training (step 0) has no iteration
    for line in open(os.path.join(run, "metrics.jsonl")):
        record = json.loads(line)
        by_iteration[record.get("iteration", 0)] = record
    evals = [by_iteration[i] for i in sorted(by_iteration) if "eval_true_score" in by_iteration[i]]
    last = by_iteration[max(by_iteration)]
    result = {"true_score_before": evals[0]["eval_true_score"], "true_score_after": evals[-1]["eval_true_score"],
              "kl": last["kl"], "reward_mean_last": last["reward_mean"], "iterations": int(last["iteration"]),
              "seconds": int(open(seconds_file).read())}
    result.update(dict(kv.split("=", 1) for kv in extra))
    print("iteration  reward(rollouts)  kl  held-out true score", file=sys.stderr)
    for r in evals:
        print(f"  {int(r.get('iteration', 0)):>4}  {r.get('reward_mean', float('nan')):+.3f}  {r.get('kl', float('nan')):.3f}"
              f"  {r['eval_true_score']:.3f}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
