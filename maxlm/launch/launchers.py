"""Where a sweep's trials run: this machine (`local`), a SLURM job array (`slurm`), TPU slices (`xpk`, `gcloud`).

`local` runs `parallel` trials at once, each a child process with its share of the machine: the CPU cores are
divided between the slots (the child's affinity, which XLA:CPU's thread pools follow) and so are the GPUs
(`CUDA_VISIBLE_DEVICES`; where there are fewer GPUs than slots, slots share them, each with a fraction of
the memory). A TPU host runs one trial at a time: its chips form one device set (a slice per trial is what
`xpk` does). The cluster launchers only write or print what to submit -- the scheduler runs the trials, each
as `python -m maxlm.sweep --workdir=W --trial=i`, which reads the plan from W and runs trial i there.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

from maxlm.launch import report as report_lib
from maxlm.launch.sweep import Plan, SweepError, Trial, command, record_attempt, trial_state

LAUNCHERS = ("local", "slurm", "xpk", "gcloud")


@dataclasses.dataclass(frozen=True)
class Slot:
    """One trial's share of this machine."""
    cores: tuple[int, ...]
    env: dict[str, str]

    def describe(self) -> str:
        gpus = self.env.get("CUDA_VISIBLE_DEVICES")
        return f"cores {_ranges(self.cores)}" + (f", GPUs {gpus}" if gpus is not None else "")


def _ranges(cores: tuple[int, ...]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 and cores[-1] - cores[0] == len(cores) - 1 else \
        ",".join(map(str, cores))


def _gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
    return []


def _has_tpu() -> bool:
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def slots(parallel: int) -> list[Slot]:
    """This machine divided into `parallel` slots (cores, and GPUs where there are any)."""
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    if parallel > 1 and _has_tpu():
        raise SweepError("a TPU host runs one trial at a time (its chips are one device set): use --parallel=1, "
                         "or --launcher=xpk for a slice per trial")
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // parallel)
    gpus = _gpus()
    out = []
    for i in range(parallel):
        mine = tuple(cores[(i * per) % len(cores):(i * per) % len(cores) + per])
        env = {}
        if gpus:
            if len(gpus) >= parallel:
                g = len(gpus) // parallel
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * g:(i + 1) * g])
            else:  # slots share GPUs: round robin, each with its share of the memory
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
                sharing = -(-parallel // len(gpus))
                env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / sharing:.2f}"
        out.append(Slot(mine, env))
    return out


def run_local(plan: Plan, workdir: str, parallel: int, log: Callable[[str], None] = print) -> dict[str, int]:
    """Run the plan's unfinished trials, `parallel` at a time; returns counts {ran, skipped} and, of the trials
    run, how many ended {finished, failed, stopped}.

    Ctrl-C / SIGTERM stops the sweep cleanly: running trials get SIGTERM (they checkpoint and exit 0), and a
    rerun resumes them."""
    todo = [t for t in plan.trials if trial_state(workdir, t, command(plan, t, workdir)) != "finished"]
    counts = {"ran": 0, "skipped": len(plan.trials) - len(todo), "finished": 0, "failed": 0, "stopped": 0}
    if counts["skipped"]:
        log(f"skipping {counts['skipped']} finished trial(s)")
    free = slots(min(parallel, max(len(todo), 1)))
    running: dict[int, tuple[Trial, subprocess.Popen, list[str], float, float, Slot]] = {}
    walls: list[float] = []
    queue = list(todo)
    done = 0
    stopping = False
    signalled: set[int] = set()

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while running or (queue and not stopping):
            while queue and free and not stopping:
                trial, slot = queue.pop(0), free.pop(0)
                trial_dir = os.path.join(workdir, trial.name)
                os.makedirs(trial_dir, exist_ok=True)
                logfile = open(os.path.join(trial_dir, "trial.log"), "ab")
                env = {**os.environ, **slot.env}
                started = time.time()
                cmd = command(plan, trial, workdir)
                proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, cwd=plan.cwd,
                                        start_new_session=True)
                logfile.close()
                try:
                    os.sched_setaffinity(proc.pid, slot.cores)  # before jax starts its thread pools
                except OSError:
                    pass  # the child already exited
                running[proc.pid] = (trial, proc, cmd, time.perf_counter(), started, slot)
                counts["ran"] += 1
                log(f"[{trial.index + 1}/{len(plan.trials)}] {trial.name}: started ({slot.describe()})")
            if stopping:
                for pid, (_, proc, *_) in running.items():
                    if pid not in signalled and proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)  # each trial saves a checkpoint and exits 0
                        signalled.add(pid)
            time.sleep(0.2)
            for pid, (trial, proc, cmd, t0, started, slot) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[pid]
                free.append(slot)
                wall = time.perf_counter() - t0
                record_attempt(workdir, trial, rc, wall, started, cmd)
                state = trial_state(workdir, trial)
                counts[state if state in ("finished", "stopped") else "failed"] += 1
                done += 1
                walls.append(wall)
                left = len(queue) + len(running)
                eta = sum(walls) / len(walls) * left / max(len(free) + len(running), 1)
                summary = report_lib.trial_summary(plan, workdir, trial)
                tail = f"; see {os.path.join(workdir, trial.name, 'trial.log')}" if state == "failed" else ""
                log(f"[{trial.index + 1}/{len(plan.trials)}] {trial.name}: {state} (exit {rc}) in {wall:.0f}s"
                    f"{summary}{tail}; {done}/{len(todo)} done" + (f", eta {eta:.0f}s" if left else ""))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if stopping:
        log(f"stopped: {counts['stopped']} trial(s) interrupted after a checkpoint, {len(queue)} not started; "
            "rerun the same command to go on")
    return counts


def run_trial(plan: Plan, workdir: str, index: int, distributed: bool, log: Callable[[str], None] = print) -> int:
    """Trial `index` of the plan in this process's allocation (a scheduler's array task); exit status.

    On a multi-node allocation every node runs this (srun), and only the first task records the attempt."""
    if not 0 <= index < len(plan.trials):
        raise SweepError(f"--trial={index}: the sweep in {workdir} has trials 0..{len(plan.trials) - 1}")
    trial = plan.trials[index]
    first = int(os.environ.get("SLURM_PROCID", "0")) == 0
    cmd = command(plan, trial, workdir, distributed=distributed)
    if trial_state(workdir, trial, cmd) == "finished":
        log(f"{trial.name}: already finished")
        return 0
    started, t0 = time.time(), time.perf_counter()
    rc = subprocess.call(cmd, cwd=plan.cwd)
    if first:
        record_attempt(workdir, trial, rc, time.perf_counter() - t0, started, cmd)
    return rc


def slurm_script(plan: Plan, workdir: str, *, parallel: int = 0, nodes: int = 1, gpus_per_node: int = 0,
                 time_limit: str = "04:00:00", partition: str = "", account: str = "") -> str:
    """An sbatch script running the plan as a job array: one trial per array index, on `nodes` nodes each
    (one task per node; `srun` starts them and JAX's distributed runtime finds its peers from SLURM's
    environment). `parallel` > 0 caps how many trials run at once (`%N`)."""
    w = os.path.abspath(workdir)
    lines = ["#!/bin/bash",
             f"# maxlm sweep of {len(plan.trials)} trial(s) of `{plan.entry}` on {plan.config}; written by "
             "python -m maxlm.sweep.",
             f"# Submit: sbatch {os.path.join(w, 'sweep.sbatch')}; table: python -m maxlm.sweep --report={w}",
             f"#SBATCH --job-name=maxlm-{os.path.basename(w)}",
             f"#SBATCH --array=0-{len(plan.trials) - 1}" + (f"%{parallel}" if parallel > 0 else ""),
             f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --time={time_limit}",
             f"#SBATCH --output={w}/slurm-%A_%a.out"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    trial = f"{shlex.quote(sys.executable)} -m maxlm.sweep --workdir={shlex.quote(w)} --trial=$SLURM_ARRAY_TASK_ID"
    lines += ["set -euo pipefail", f"cd {shlex.quote(plan.cwd)}",
              f"srun {trial}" + (" --distributed" if nodes > 1 else "")]
    return "\n".join(lines) + "\n"


def tpu_commands(plan: Plan, workdir: str, launcher: str, *, tpu_type: str = "v5p-8", cluster: str = "$CLUSTER",
                 tpu_name: str = "$TPU_NAME", zone: str = "$ZONE") -> list[str]:
    """The commands that run each trial on a TPU slice: `xpk workload create` (a workload per trial, GKE
    schedules them) or `gcloud compute tpus tpu-vm ssh --worker=all` (trials one after another on one slice).
    The sweep workdir must be storage every host sees (a GCS FUSE mount, Filestore)."""
    w = os.path.abspath(workdir)
    out = []
    for trial in plan.trials:
        inner = f"python -m maxlm.sweep --workdir={w} --trial={trial.index} --distributed"
        if launcher == "xpk":
            out.append(f"xpk workload create --cluster={cluster} --workload={os.path.basename(w)}-{trial.index} "
                       f"--tpu-type={tpu_type} --num-slices=1 --command={shlex.quote(inner)}")
        else:
            out.append(f"gcloud compute tpus tpu-vm ssh {tpu_name} --zone={zone} --worker=all "
                       f"--command={shlex.quote(f'cd {plan.cwd} && {inner}')}")
    return out
