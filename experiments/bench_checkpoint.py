"""Training step time with no checkpointing, asynchronous saves and synchronous saves.

    python experiments/bench_checkpoint.py --config=configs/tiny.py [--steps=100] [--every=10] [--log_every=10]
        [--repeats=1] [--workdir=DIR] [--config.tokenizer.path=runs/tiny/tokenizer.model ...]

What is measured: the real training loop, `maxlm.train.train(config, workdir)`, run in this process for
`--steps` steps in a fresh workdir per mode, with eval and samples off:
  none   `checkpoint.every_steps` = steps + 1, so no save happens before the final step;
  async  a save every `--every` steps with `checkpoint.async_save=True` (Orbax copies the arrays off the
         step's buffers, then writes them on a background thread while training continues);
  sync   a save every `--every` steps with `checkpoint.async_save=False` (the loop waits for each write),
         for contrast.
Every mode uses the same data order, initialisation and tokenizer (trained once, or `tokenizer.path`).

Step time comes from the loop's own log records: each record's `step_time` is the wall time of its
interval of `--log_every` steps divided by their number, measured from after compilation, and includes
everything the loop does in that interval -- the steps, fetching the next batch, and the time `save`
blocks the loop, as well as any slowdown of later steps by the background writer competing for the CPU
(with `--every` a multiple of `--log_every`, each interval of a saving mode holds the same number of
saves). The first interval (first-step warm-up) and the last (which every mode, `none` included, ends with
a save of the final step) are left out; the table gives the median and mean over the remaining intervals,
pooled across `--repeats` (which run the modes round-robin, so that drift in machine load spreads evenly),
and the overhead of each mode's median over that of `none`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from typing import Any

import jax
import ml_collections
from absl import flags

from maxlm import cli
from maxlm import config as config_lib
from maxlm import tokenizer as tokenizer_lib
from maxlm.training import pretrain as train

flags.DEFINE_integer("steps", 100, "Training steps per run.")
flags.DEFINE_integer("every", 10, "Checkpoint every this many steps in the async and sync modes.")
flags.DEFINE_integer("log_every", 10, "Steps per timed interval (train.log_every).")
flags.DEFINE_integer("repeats", 1, "Runs per mode, interleaved round-robin.")
flags.DEFINE_string("workdir", "", "Scratch directory for the runs (default: a temporary directory, removed).")
FLAGS = flags.FLAGS
MODES = ("none", "async", "sync")


def mode_config(config: ml_collections.ConfigDict, mode: str, steps: int, every: int,
                log_every: int) -> ml_collections.ConfigDict:
    """The config of one benchmark run: `config` with the mode's checkpoint settings, eval and samples off."""
    return config_lib.override(config, **{
        "train.num_steps": steps, "train.log_every": log_every, "train.eval_every": 0, "train.num_samples": 0,
        "checkpoint.every_steps": steps + 1 if mode == "none" else every,
        "checkpoint.async_save": mode != "sync"})


def interval_step_times(history: list[dict[str, Any]]) -> list[float]:
    """Seconds per step of each logged interval but the first (warm-up) and the last (final save)."""
    return [r["step_time"] for r in history[1:-1]]


def run_mode(config: ml_collections.ConfigDict, workdir: str) -> tuple[list[float], float]:
    """(per-interval step times, final loss) of one training run in a fresh `workdir`."""
    shutil.rmtree(workdir, ignore_errors=True)
    history = train.train(config, workdir)
    return interval_step_times(history), history[-1]["loss"]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    if FLAGS.steps < 3 * FLAGS.log_every:
        raise config_lib.ConfigError("steps", f"needs at least 3 intervals of --log_every={FLAGS.log_every} steps "
                                              "(the first and last are not timed)")
    if FLAGS.every % FLAGS.log_every:
        raise config_lib.ConfigError("every", f"--every={FLAGS.every} must be a multiple of --log_every="
                                              f"{FLAGS.log_every}, so every interval holds the same saves")
    base = config_lib.validate(FLAGS.config)
    root = FLAGS.workdir or tempfile.mkdtemp(prefix="maxlm_bench_checkpoint_")
    os.makedirs(root, exist_ok=True)
    if not base.tokenizer.path:
        tok = tokenizer_lib.load_or_train(base, os.path.join(root, "tokenizer"))
        base = config_lib.override(base, **{"tokenizer.path": tok.path})

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    losses: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(FLAGS.repeats):
        for mode in MODES:
            config = mode_config(base, mode, FLAGS.steps, FLAGS.every, FLAGS.log_every)
            step_times, loss = run_mode(config, os.path.join(root, f"{mode}_{repeat}"))
            times[mode] += step_times
            losses[mode].append(loss)
    if not FLAGS.workdir:
        shutil.rmtree(root, ignore_errors=True)

    device = jax.devices()[0]
    print(f"\nmodel: {config_lib.describe(base)}")
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}), {os.cpu_count()} CPUs; "
          f"jax {jax.__version__}; {FLAGS.steps} steps x {FLAGS.repeats} repeat(s), saves every {FLAGS.every} "
          f"steps, {len(times['none'])} timed intervals of {FLAGS.log_every} steps per mode")
    none_median = statistics.median(times["none"])
    rows = {}
    print(f"\n{'mode':8}{'median ms':>12}{'mean ms':>10}{'min ms':>10}{'max ms':>10}{'overhead %':>12}")
    for mode in MODES:
        median = statistics.median(times[mode])
        rows[mode] = {"median_ms": 1e3 * median, "mean_ms": 1e3 * statistics.fmean(times[mode]),
                      "min_ms": 1e3 * min(times[mode]), "max_ms": 1e3 * max(times[mode]),
                      "overhead_pct": 100 * (median / none_median - 1), "final_losses": losses[mode],
                      "interval_ms": [1e3 * t for t in times[mode]]}
        r = rows[mode]
        print(f"{mode:8}{r['median_ms']:>12.1f}{r['mean_ms']:>10.1f}{r['min_ms']:>10.1f}{r['max_ms']:>10.1f}"
              f"{r['overhead_pct']:>12.1f}")
    print(json.dumps({"config": config_lib.describe(base), "device_kind": device.device_kind,
                      "cpu_count": os.cpu_count(), "jax_version": jax.__version__, "steps": FLAGS.steps,
                      "every": FLAGS.every, "log_every": FLAGS.log_every, "repeats": FLAGS.repeats, "modes": rows}))


if __name__ == "__main__":
    cli.define_config_flag()
    cli.run(main)
