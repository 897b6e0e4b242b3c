#!/usr/bin/env bash
# The sweep acceptance run: the README's example sweep (experiments/sweeps/tiny_lr_width.py: peak lr 1e-3 / 3e-3
# x width 64 / 128 of configs/tiny.py) at STEPS steps, 2 trials at a time, then the same command again (it
# must skip all four), then --launcher=slurm into W/slurm (an sbatch array, nothing run). Last line: one JSON
# object (first_wall_s, rerun_wall_s, rerun_ratio, trials, finished, rows, best, slurm_array).
#
#   bash experiments/sweep_demo.sh W            # STEPS=200 by default
#
# Measured 2026-12-06, 2 CPU cores (4m45s in all): first run 281.7 s (trials 110-141 s each, one core each), rerun
# 2.0 s (ratio 0.007, all four skipped), best peak_lr=0.003,d_model=128 at eval_loss 4.402, "#SBATCH --array=0-3".
set -euo pipefail
W=${1:?usage: sweep_demo.sh WORKDIR}
mkdir -p "$W"
W=$(cd "$W" && pwd)
STEPS=${STEPS:-200}
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
export JAX_PLATFORMS=cpu
args=(--config=configs/tiny.py --sweep=experiments/sweeps/tiny_lr_width.py
      --config.train.num_steps="$STEPS" --config.train.eval_every=100 --config.checkpoint.every_steps=100)
t0=$(date +%s.%N)
"$PY" -m maxlm.sweep "${args[@]}" --workdir="$W/sweep" --parallel=2 > "$W/first.log"
t1=$(date +%s.%N)
"$PY" -m maxlm.sweep "${args[@]}" --workdir="$W/sweep" --parallel=2 > "$W/rerun.log"
t2=$(date +%s.%N)
"$PY" -m maxlm.sweep "${args[@]}" --workdir="$W/slurm" --launcher=slurm > /dev/null
cat "$W/sweep/results.md"
"$PY" - "$W" "$t0" "$t1" "$t2" <<'PY'
import csv, json, sys
w, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
first = json.loads(open(w + "/first.log").read().strip().splitlines()[-1])
rerun = json.loads(open(w + "/rerun.log").read().strip().splitlines()[-1])
rows = list(csv.DictReader(open(f"{w}/sweep/results.csv")))
array = [l.strip() for l in open(f"{w}/slurm/sweep.sbatch") if l.startswith("#SBATCH --array")]
print(json.dumps({"first_wall_s": round(t1 - t0, 1), "rerun_wall_s": round(t2 - t1, 1),
                  "rerun_ratio": round((t2 - t1) / (t1 - t0), 3), "trials": first["trials"],
                  "finished": first["finished"], "rerun_ran": rerun["ran"], "rerun_skipped": rerun["skipped"],
                  "rows": len(rows), "best": first["best"], "slurm_array": array[0] if array else None}))
PY
