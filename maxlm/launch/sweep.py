"""A sweep: trials of one entry point, each the base config plus a dict of overrides, in one folder.

A sweep file defines `get_sweep()` returning a list of override dicts, usually built with the helpers here:

    from maxlm.sweep import product, zipped

    def get_sweep():
        return product({"optim.peak_lr": [1e-3, 3e-3]}, {"model.d_model": [32, 64]})

Each trial trains in `<sweep workdir>/<name>`, its name made from its overrides (`peak_lr=0.001,d_model=64`),
so a rerun of the sweep -- even after the sweep file grew -- finds the trials it already ran: a finished
one is skipped, an unfinished one is resumed by rerunning its command (every entry point resumes from the
newest checkpoint of its workdir). The plan -- config, entry point, shared overrides, trials -- is written to
`<sweep workdir>/sweep.json`, which is all a scheduler's array task (`--trial=i`) and `--report` need.
What a trial reached is read from files its run leaves: `status.json` (the training loop's; `complete` once
it reached `train.num_steps`) and `trial.json` (the sweep's: exit status and wall time of every attempt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import sys
from typing import Any

import ml_collections

from maxlm import config as config_lib
from maxlm.errors import ConfigError, UserError
from maxlm.training.workdir import write_json_atomic

# The entry points a sweep runs: their module, and the metric a trial is judged by (the report's default;
# `--metric` picks another). The posttraining stages are judged by the task checker's held-out score.
ENTRIES = {
    "train": ("maxlm.train", "eval_loss"),
    "sft": ("maxlm.sft", "eval_loss"),
    "reward": ("maxlm.reward", "eval_accuracy"),
    "dpo": ("maxlm.dpo", "eval_true_score"),
    "grpo": ("maxlm.grpo", "eval_true_score"),
    "ppo": ("maxlm.ppo", "eval_true_score"),
}
PLAN_FILE = "sweep.json"
TRIAL_FILE = "trial.json"


class SweepError(UserError):
    """A sweep file or plan that cannot be run as written: one line for the user."""


# ----------------------------------------------------------------------------------------------------------
# Helpers for sweep files


def _as_trials(part: dict | list) -> list[dict]:
    """A part of a sweep: a dict of lists (its grid) or a list of override dicts (as is)."""
    if isinstance(part, dict):
        return grid(part)
    if isinstance(part, (list, tuple)) and all(isinstance(t, dict) for t in part):
        return [dict(t) for t in part]
    raise SweepError(f"a sweep part is a dict of value lists or a list of override dicts, got {part!r}")


def grid(axes: dict[str, list]) -> list[dict]:
    """Every combination of the axes' values: grid({"a": [1, 2], "b": [3, 4]}) -> 4 dicts, `a` outermost."""
    keys = list(axes)
    for k in keys:
        if not isinstance(axes[k], (list, tuple)):
            raise SweepError(f"sweep axis {k}: expected a list of values, got {axes[k]!r}")
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def product(*parts: dict | list) -> list[dict]:
    """The cross product of parts (each a dict of value lists or a list of override dicts), merged left to
    right: product({"optim.peak_lr": [1e-3, 3e-3]}, {"model.d_model": [32, 64]}) -> the 2x2 grid."""
    out = [{}]
    for part in parts:
        out = [{**a, **b} for a in out for b in _as_trials(part)]
    return out


def zipped(axes: dict[str, list]) -> list[dict]:
    """The axes' values taken together, position by position (lists of equal length): zipped({"model.d_model":
    [32, 64], "optim.peak_lr": [3e-3, 1e-3]}) -> 2 trials, each width with its own learning rate."""
    lengths = {k: len(v) for k, v in axes.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError(f"zipped axes need lists of one length, got {lengths}")
    keys = list(axes)
    return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def chain(*parts: dict | list) -> list[dict]:
    """The trials of each part one after another (e.g. a grid, then a few hand-picked points)."""
    return [t for part in parts for t in _as_trials(part)]


# ----------------------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass(frozen=True)
class Trial:
    index: int
    name: str
    overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `python -m maxlm.sweep` runs: `entry` on `config` (an absolute path) with `base_args` (the
    sweep's own `--config.*` flags, shared by every trial) and each trial's overrides."""
    config: str
    entry: str
    base_args: tuple[str, ...]
    trials: tuple[Trial, ...]
    metric: str
    cwd: str

    def to_json(self) -> dict:
        return {"config": self.config, "entry": self.entry, "base_args": list(self.base_args), "metric": self.metric,
                "cwd": self.cwd, "trials": [{"name": t.name, "overrides": t.overrides} for t in self.trials]}

    @staticmethod
    def from_json(d: dict) -> "Plan":
        trials = tuple(Trial(i, t["name"], {k: _from_json(v) for k, v in t["overrides"].items()})
                       for i, t in enumerate(d["trials"]))
        return Plan(d["config"], d["entry"], tuple(d["base_args"]), trials, d["metric"], d["cwd"])

    def save(self, workdir: str) -> None:
        os.makedirs(workdir, exist_ok=True)
        write_json_atomic(os.path.join(workdir, PLAN_FILE), self.to_json())

    @staticmethod
    def load(workdir: str) -> "Plan":
        path = os.path.join(workdir, PLAN_FILE)
        if not os.path.exists(path):
            raise SweepError(f"{workdir} holds no sweep ({PLAN_FILE} is missing): run python -m maxlm.sweep "
                             f"--config=... --sweep=... --workdir={workdir} first")
        return Plan.from_json(json.load(open(path, encoding="utf-8")))

    def swept_keys(self) -> list[str]:
        """The override keys in order of first appearance."""
        return list(dict.fromkeys(k for t in self.trials for k in t.overrides))


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def load_sweep(path: str) -> list[dict]:
    """The override dicts of a sweep file's `get_sweep()`."""
    if not os.path.isfile(path):
        raise SweepError(f"no such sweep file: {path}")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3] or "sweep", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_sweep"):
            raise SweepError(f"{path} defines no get_sweep()")
        trials = module.get_sweep()
    except SweepError:
        raise
    except Exception as e:  # noqa: BLE001  (the user's file: its error is the user's, in one line)
        raise SweepError(f"the sweep file {path} raised {type(e).__name__}: {e}") from None
    if not isinstance(trials, (list, tuple)) or not trials or not all(isinstance(t, dict) for t in trials):
        raise SweepError(f"get_sweep() in {path} must return a non-empty list of override dicts, got {trials!r}")
    for t in trials:
        for k, v in t.items():
            if not isinstance(k, str) or not isinstance(v, (bool, int, float, str, tuple, list)):
                raise SweepError(f"{path}: override {k!r}={v!r}: keys are dotted config names, values bool, int, "
                                 "float, str or tuple")
    return [{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()} for t in trials]


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "-".join(_format_value(x) for x in v)
    return str(v)


def trial_name(overrides: dict[str, Any], keys: list[str]) -> str:
    """A folder name from the overrides: `leaf=value` pairs joined by commas, a key's full dotted name where two
    swept keys share their last part; characters a shell or a file system dislikes become '_'; names past 100
    characters keep their start and a hash of the whole. "base" for a trial without overrides."""
    if not overrides:
        return "base"
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}
    name = ",".join(f"{short[k]}={_format_value(v)}" for k, v in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > 100:
        name = name[:90] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def cli_value(v: Any) -> str:
    """A value as `--config.a.b=` reads it back."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (tuple, list)):
        return repr(tuple(v))
    return repr(v) if isinstance(v, float) else str(v)


def make_plan(config_path: str, config: ml_collections.ConfigDict, overrides: list[dict], entry: str,
              base_args: list[str], metric: str = "") -> Plan:
    """The plan of a sweep, every trial checked first: its keys exist, its values have the key's type, and the
    trial's config passes `config.validate` -- so a typo fails the sweep before any trial starts, naming it."""
    if entry not in ENTRIES:
        raise SweepError(f"unknown --entry={entry}; one of {', '.join(ENTRIES)}")
    keys = list(dict.fromkeys(k for t in overrides for k in t))
    trials, seen = [], {}
    for i, t in enumerate(overrides):
        name = trial_name(t, keys)
        if name in seen:
            raise SweepError(f"trials {seen[name]} and {i} are the same run ({name}): drop the duplicate")
        seen[name] = i
        try:
            config_lib.validate(config_lib.override(config, **t))
        except (ConfigError, TypeError, KeyError) as e:
            reason = e.reason if isinstance(e, ConfigError) else " ".join(str(e).split())
            key = e.key if isinstance(e, ConfigError) else ", ".join(t)
            raise SweepError(f"trial {i} ({name}): invalid config: {key}: {reason}") from None
        trials.append(Trial(i, name, t))
    return Plan(os.path.abspath(config_path), entry, tuple(base_args), tuple(trials), metric or ENTRIES[entry][1],
                os.getcwd())


def command(plan: Plan, trial: Trial, workdir: str, distributed: bool = False) -> list[str]:
    """The trial's command line: the entry point on the config, the sweep's shared flags, the trial's
    overrides, its workdir, and its W&B group (the sweep) and name (the trial)."""
    sweep_name = os.path.basename(os.path.abspath(workdir))
    args = [sys.executable, "-m", ENTRIES[plan.entry][0], f"--config={plan.config}", *plan.base_args]
    args += [f"--config.{k}={cli_value(v)}" for k, v in trial.overrides.items()]
    if not any(a.startswith("--config.train.wandb_group=") for a in args):
        args.append(f"--config.train.wandb_group={sweep_name}")
    args += [f"--config.train.wandb_name={trial.name}",
             f"--workdir={os.path.join(os.path.abspath(workdir), trial.name)}"]
    if distributed:
        args.append("--distributed")
    return args


# ----------------------------------------------------------------------------------------------------------
# Where a trial stands


def trial_record(workdir: str, trial: Trial) -> dict:
    path = os.path.join(workdir, trial.name, TRIAL_FILE)
    if os.path.exists(path):
        return json.load(open(path, encoding="utf-8"))
    return {"name": trial.name, "overrides": trial.overrides, "attempts": []}


def run_status(workdir: str, trial: Trial) -> dict:
    """The training loop's status.json of the trial ({} before its first run ends)."""
    path = os.path.join(workdir, trial.name, "status.json")
    return json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}


def _flags(cmd: list[str]) -> list[str]:
    """A trial command without its interpreter and start-up flag (another venv or launcher, the same trial)."""
    return [a for a in (cmd[cmd.index("-m") + 1:] if "-m" in cmd else cmd) if a != "--distributed"]


def trial_state(workdir: str, trial: Trial, cmd: list[str] | None = None) -> str:
    """finished (the last attempt exited 0 and its run is complete), stopped (exited 0 before the end: a
    signal), failed (a non-zero exit), pending (never run); with `cmd`, a finished trial whose last attempt
    ran other flags (e.g. more `train.num_steps`) is "changed": to be run again (it resumes)."""
    attempts = trial_record(workdir, trial)["attempts"]
    if not attempts:
        return "pending"
    if attempts[-1]["rc"] != 0:
        return "failed"
    if not run_status(workdir, trial).get("complete"):
        return "stopped"
    if cmd is not None and attempts[-1].get("command") not in (None, _flags(cmd)):
        return "changed"
    return "finished"


def record_attempt(workdir: str, trial: Trial, rc: int, wall: float, started: float, cmd: list[str]) -> dict:
    record = trial_record(workdir, trial)
    record["attempts"].append({"rc": rc, "wall_s": round(wall, 3), "started": started, "command": _flags(cmd)})
    os.makedirs(os.path.join(workdir, trial.name), exist_ok=True)
    write_json_atomic(os.path.join(workdir, trial.name, TRIAL_FILE), record)
    return record
