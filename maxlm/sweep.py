"""`python -m maxlm.sweep`: run a config sweep -- here, on a SLURM job array, or on TPU slices.

    python -m maxlm.sweep --config=configs/tiny.py --sweep=experiments/sweeps/tiny_lr_width.py \\
        --workdir=runs/sweep [--parallel=2] [--launcher=local|slurm|xpk|gcloud] [--entry=train|sft|dpo|grpo|...] \\
        [--config.train.num_steps=200 ...]              # shared by every trial
    python -m maxlm.sweep --report=runs/sweep            # rebuild results.csv / results.md / sweep.png

A sweep file defines `get_sweep()` returning override dicts (the helpers `product`, `zipped`, `chain`, `grid`
are importable from here). Each trial runs in `<workdir>/<name from its overrides>`; rerunning the command
skips finished trials and resumes the others. The last line printed is one JSON object: the counts and the
best trial. `--launcher=slurm` writes `<workdir>/sweep.sbatch` (a job array) and runs nothing; `xpk` and
`gcloud` print one command per trial. Details: maxlm/launch/.
"""

import json
import os
import sys
import time

from absl import flags

from maxlm import cli
from maxlm.launch import launchers
from maxlm.launch import report as report_lib
from maxlm.launch.sweep import (ENTRIES, Plan, SweepError, chain, grid, load_sweep, make_plan, product,  # noqa: F401
                                zipped)

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("sweep", "", "A Python file whose get_sweep() returns a list of override dicts.")
    flags.DEFINE_string("workdir", "", "(required) The sweep's folder: one sub-folder per trial, sweep.json, "
                        "results.csv / results.md, sweep.png.")
    flags.DEFINE_enum("entry", "train", list(ENTRIES), "The entry point every trial runs.")
    flags.DEFINE_integer("parallel", 1, "local: trials run at once (the machine's cores and GPUs divided between "
                         "them); slurm: the array's cap on simultaneous trials (%N).")
    flags.DEFINE_enum("launcher", "local", list(launchers.LAUNCHERS), "local runs the trials here; slurm writes an "
                      "sbatch job array; xpk / gcloud print the commands for TPU slices.")
    flags.DEFINE_string("metric", "", "The metric of the table and plot (default: the entry's own, e.g. eval_loss "
                        "for train, eval_true_score for dpo / grpo / ppo).")
    flags.DEFINE_string("report", "", "A sweep workdir: rebuild its table and plot from what its trials wrote, "
                        "and run nothing.")
    flags.DEFINE_integer("trial", -1, "Run only trial i of the plan in --workdir (what a scheduler's array "
                         "task runs).")
    flags.DEFINE_bool("distributed", False, "With --trial: start the trial's jax.distributed from the cluster "
                      "environment (multi-node trials).")
    flags.DEFINE_integer("nodes", 1, "slurm: nodes per trial.")
    flags.DEFINE_integer("gpus_per_node", 0, "slurm: GPUs per node (0 writes no --gpus-per-node).")
    flags.DEFINE_string("time", "04:00:00", "slurm: each trial's time limit.")
    flags.DEFINE_string("partition", "", "slurm: the partition.")
    flags.DEFINE_string("account", "", "slurm: the account.")
    flags.DEFINE_string("tpu_type", "v5p-8", "xpk: the slice type per trial.")
    flags.DEFINE_string("cluster", "$CLUSTER", "xpk: the GKE cluster.")
    flags.DEFINE_string("tpu_name", "$TPU_NAME", "gcloud: the TPU VM (slice) the trials run on.")
    flags.DEFINE_string("zone", "$ZONE", "gcloud: its zone.")


def _finish(plan: Plan, workdir: str, counts: dict, wall: float) -> None:
    rows, markdown = report_lib.write(plan, workdir)
    print(markdown, end="")
    print(f"table: {os.path.join(workdir, 'results.md')} (and .csv); plot: {os.path.join(workdir, 'sweep.png')}")
    scored = [r for r in rows if r["best"] == r["best"]]
    best = None
    if scored:
        pick = min if report_lib.lower_is_better(rows[0]["metric"]) else max
        top = pick(scored, key=lambda r: r["final"] if r["final"] == r["final"] else r["best"])
        best = {"trial": top["trial"], "metric": top["metric"], "final": top["final"]}
    states = [r["state"] for r in rows]
    print(json.dumps({"trials": len(rows), "finished": states.count("finished"), "failed": states.count("failed"),
                      "ran": counts.get("ran", 0), "skipped": counts.get("skipped", 0), "wall_s": round(wall, 1),
                      "best": best}))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SweepError(f"unexpected arguments {argv[1:]}")
    t0 = time.perf_counter()
    if FLAGS.report:
        plan = Plan.load(FLAGS.report)
        if FLAGS.metric:
            plan = Plan(plan.config, plan.entry, plan.base_args, plan.trials, FLAGS.metric, plan.cwd)
        _finish(plan, FLAGS.report, {}, time.perf_counter() - t0)
        return
    if not FLAGS.workdir:
        raise SweepError("--workdir is required")
    if FLAGS.trial >= 0:
        sys.exit(launchers.run_trial(Plan.load(FLAGS.workdir), FLAGS.workdir, FLAGS.trial, FLAGS.distributed))
    if not FLAGS.sweep:
        raise SweepError("--sweep=<file with get_sweep()> is required (or --report=<workdir>, --trial=<i>)")
    base_args = [a for a in sys.argv[1:] if a.startswith("--config.")]
    plan = make_plan(FLAGS["config"].config_filename, FLAGS.config, load_sweep(FLAGS.sweep), FLAGS.entry, base_args,
                     FLAGS.metric)
    plan.save(FLAGS.workdir)
    print(f"maxlm.sweep: {len(plan.trials)} trial(s) of {plan.entry} on {plan.config}; swept "
          f"{', '.join(plan.swept_keys()) or 'nothing'}; workdir {FLAGS.workdir}", flush=True)
    if FLAGS.launcher == "slurm":
        path = os.path.join(FLAGS.workdir, "sweep.sbatch")
        with open(path, "w", encoding="utf-8") as f:
            f.write(launchers.slurm_script(plan, FLAGS.workdir, parallel=FLAGS.parallel if FLAGS["parallel"].present
                                           else 0, nodes=FLAGS.nodes, gpus_per_node=FLAGS.gpus_per_node,
                                           time_limit=FLAGS.time, partition=FLAGS.partition, account=FLAGS.account))
        print(f"wrote {path}: submit it with `sbatch {path}`; then python -m maxlm.sweep --report={FLAGS.workdir}")
        return
    if FLAGS.launcher in ("xpk", "gcloud"):
        print("\n".join(launchers.tpu_commands(plan, FLAGS.workdir, FLAGS.launcher, tpu_type=FLAGS.tpu_type,
                                               cluster=FLAGS.cluster, tpu_name=FLAGS.tpu_name, zone=FLAGS.zone)))
        return
    counts = launchers.run_local(plan, FLAGS.workdir, FLAGS.parallel, log=lambda m: print(m, flush=True))
    _finish(plan, FLAGS.workdir, counts, time.perf_counter() - t0)


if __name__ == "__main__":
    cli.define_config_flag()
    flags.declare_key_flag("config")
    _define_flags()
    cli.run(main)
