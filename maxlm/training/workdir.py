"""A workdir is one run: one writer at a time, and a rerun resumes only the run it holds.

Two ways of losing a run that no checkpoint format prevents (both found by probing maxlm as a hostile tester
would): two processes writing one workdir -- the same command launched twice, a scheduler retrying a job that
still runs -- and a rerun with a changed config, whose checkpoints then fail to restore and used to be set
aside as damaged before a fresh model trained in their place. `hold` makes the first impossible: a lock file,
created atomically, names its holder (host, PID, the PID's start time, command); a second writer refuses with
that name, and a lock whose holder is gone (same host, process dead or its PID reused) is taken over with a
warning. `check_resume` refuses the second before anything is restored, naming the differing keys.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from maxlm import config as config_lib
from maxlm.errors import WorkdirError
from maxlm.training.metrics import log_line

LOCK_NAME = "maxlm.lock"
# A lock file that cannot be parsed is a holder's half-written one only for an instant (it is linked into
# place complete, see `_acquire`); older than this it is garbage and taken over.
UNREADABLE_GRACE_S = 30.0

_held: dict[str, int] = {}  # lock path -> nesting depth in this process (the stage entry and the loop both hold)


def _process_start(pid: int) -> str | None:
    """The PID's start time in clock ticks since boot (/proc/PID/stat field 22): with the PID, a process's
    identity -- a PID reused by a later process has another start time. None where /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) and {"host", "pid"} <= holder.keys() else None
    except (OSError, ValueError):
        return None


def _alive(holder: dict) -> bool | None:
    """Whether the lock's holder still runs: None when it is on another host (not knowable from here)."""
    if holder["host"] != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    start = holder.get("pid_start")
    return start is None or _process_start(int(holder["pid"])) in (None, start)


def describe_holder(holder: dict) -> str:
    return f"PID {holder['pid']} on {holder['host']} since {holder.get('started', '?')} ({holder.get('command', '')!r})"


def _acquire(path: str) -> None:
    me = _identity()
    tmp = f"{path}.{me['host']}.{me['pid']}.tmp"
    for _ in range(5):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(me, f)
        try:
            os.link(tmp, path)  # atomic, and fails if a lock exists: the file appears whole or not at all
            return
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
        holder = _read(path)
        if holder is None:
            try:
                age = time.time() - os.stat(path).st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            if age < UNREADABLE_GRACE_S:
                raise WorkdirError(f"{os.path.dirname(path)} is locked by another run ({path} is being written); "
                                   "use another workdir or wait")
            stale = "an unreadable lock file"
        else:
            alive = _alive(holder)
            if alive is None:
                raise WorkdirError(f"{os.path.dirname(path)} is in use by {describe_holder(holder)}, another host; "
                                   f"if that run is gone, delete {path}")
            if alive:
                raise WorkdirError(f"{os.path.dirname(path)} is in use by {describe_holder(holder)}; wait for it, "
                                   "stop it, or use another workdir")
            stale = f"the lock of {describe_holder(holder)}, which is no longer running"
        # Take the stale lock over: move it aside under our own name, then check that what was moved is the
        # lock judged stale -- another process may have taken it over in between; then its live lock goes back.
        aside = f"{path}.stale.{me['host']}.{me['pid']}"
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            continue
        if _read(aside) != holder:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            os.remove(aside)
            continue
        os.remove(aside)
        log_line(f"warning: taking over {stale} ({path})")
    raise WorkdirError(f"could not lock {os.path.dirname(path)}: its lock file {path} keeps changing")


def _release(path: str) -> None:
    holder = _read(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        os.remove(path)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Hold `workdir`'s lock for the block (creating the workdir): one writer per workdir. Re-entrant within a
    process; in a multi-host run process 0 holds it for all, and every process fails if it cannot."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    primary = jax.process_index() == 0
    if path in _held:
        _held[path] += 1
    else:
        error = None
        if primary:
            try:
                _acquire(path)
            except WorkdirError as e:
                error = e
        if jax.process_count() > 1:
            failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
            if failed and error is None and not primary:
                error = WorkdirError(f"process 0 could not lock {workdir} (see its error)")
        if error is not None:
            raise error
        _held[path] = 1
    try:
        yield
    finally:
        _held[path] -= 1
        if not _held[path]:
            del _held[path]
            if primary:
                _release(path)


def holding(fn):
    """Decorate a stage's `fn(config, workdir)`: the config is validated first (a bad key fails without
    creating the workdir), then `fn` runs holding the workdir."""
    @functools.wraps(fn)
    def wrapped(config: ml_collections.ConfigDict, workdir: str, *args, **kwargs):
        config_lib.validate(config)
        with hold(workdir):
            return fn(config, workdir, *args, **kwargs)
    return wrapped


# ----------------------------------------------------------------------------------------------------------
# Resuming

# What may differ between the config of a workdir's checkpoint and a rerun's: how long to train and how to
# log, the optimizer's hyperparameters, the mesh (checkpoints are resharded on restore), checkpointing, and
# how the weights are run. Everything else -- the model's shape, the tokenizer, the data, the stage's inputs
# -- says which run this is; a difference there is another run, refused unless checkpoint.allow_config_change.
FREE_SECTIONS = ("optim", "mesh", "checkpoint")
FREE_KEYS = {"model": config_lib.MODEL_RUN_KEYS,
             "train": ("num_steps", "log_every", "eval_every", "eval_batches", "num_samples", "sample_tokens",
                       "peak_tflops", "max_bad_steps", "inject_nan_at", "stages", "microbatches", "profile_steps",
                       "wandb_project", "wandb_entity", "wandb_group", "wandb_name"),
             "sft": ("eval_items",), "ppo": ("iterations", "eval_every", "eval_items")}


def _flat(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def changed_keys(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, stage_boundary: bool = False
                 ) -> list[str]:
    """The identity keys whose values differ. At a stage boundary (`train.stages`: the checkpoint is the
    previous stage's end) the keys a stage may set are free as well."""
    free_keys = {s: set(k) for s, k in FREE_KEYS.items()}
    free_sections = set(FREE_SECTIONS)
    if stage_boundary:
        free_sections |= set(config_lib.STAGE_SECTIONS)
        for section, keys in config_lib.STAGE_KEYS.items():
            free_keys.setdefault(section, set()).update(keys)
    a, b = _flat(saved), _flat(config)
    out = []
    for key in sorted(a.keys() | b.keys()):
        section, _, leaf = key.partition(".")
        if section in free_sections or leaf in free_keys.get(section, ()):
            continue
        if a.get(key) != b.get(key):
            out.append(key)
    return out


def write_json_atomic(path: str, value: Any) -> None:
    """`value` as JSON at `path`, written to a temporary file and renamed into place: a reader (an orchestrator
    polling a run's status, `maxlm.sweep --report` while trials run) never sees half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def check_resume(saved: ml_collections.ConfigDict, saved_stage: str, config: ml_collections.ConfigDict, stage: str,
                 workdir: str, stage_boundary: bool = False) -> None:
    """Raise WorkdirError (one line, nothing touched) when the workdir's newest checkpoint belongs to another
    run: another stage wrote it, or identity keys differ (unless checkpoint.allow_config_change)."""
    if saved_stage and stage and saved_stage != stage:
        raise WorkdirError(f"{workdir} holds a {saved_stage} run (its checkpoints were written by that stage); this "
                           f"is {stage}: use another workdir")
    diff = changed_keys(saved, config, stage_boundary)
    if not diff:
        return
    shown = ", ".join(f"{k}: {_short(_flat(saved).get(k))} -> {_short(_flat(config).get(k))}" for k in diff[:6])
    more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
    if config.checkpoint.allow_config_change:
        log_line(f"warning: resuming {workdir} with a changed config ({shown}{more}); checkpoint.allow_config_change")
        return
    raise WorkdirError(f"{workdir} holds a run with another config ({shown}{more}); use a new workdir, or pass "
                       "--config.checkpoint.allow_config_change=true to resume it with these changes")


def _short(value: Any) -> str:
    text = repr(value)  # a long value keeps its end: a path differs in its file name more often than its root
    return text if len(text) <= 90 else text[:25] + "..." + text[-60:]
