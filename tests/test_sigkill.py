"""Crash safety: SIGKILL a training process at 20 random moments, restart it each time, compare bitwise.

The acceptance check for resumable training: a harness kills `python -m maxlm.train` with SIGKILL at 20
random moments -- while it starts up and compiles, while it trains, and (watching the checkpoint directory
for an Orbax temporary directory) while a checkpoint is being written -- and reruns the same command after
each kill. Every restart must succeed (one that is killed is fine; one that exits on its own with a
non-zero status is a failure), and the last one runs to the end. Every loss the killed run logged (a step
is logged again when a restart redoes it) and the final parameters must equal those of an uninterrupted
run of the same length bit for bit (CPU).
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from maxlm.training import checkpoint
from tests.helpers import ROOT, write_corpus

NUM_KILLS = 20
NUM_STEPS = 100
SEED = 1234
ATTEMPT_TIMEOUT_S = 120.0
TMP_MARKER = "tmp"  # Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete


def _command(workdir, corpus) -> list[str]:
    return [sys.executable, "-m", "maxlm.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            "--config.data.source=jsonl", f"--config.data.path={corpus}", "--config.data.eval_fraction=0.0",
            "--config.model.vocab_size=320", "--config.model.num_layers=1", "--config.model.d_model=64",
            "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=128",
            "--config.model.max_seq_len=64", "--config.data.seq_len=64", "--config.data.batch_size=8",
            "--config.tokenizer.train_max_bytes=200000", "--config.optim.warmup_steps=5",
            f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.train.num_samples=0", "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=True",
            "--config.checkpoint.max_to_keep=2"]


def _losses(workdir) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _metric_lines(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _tmp_dirs(workdir) -> set[tuple[str, int]]:
    """(name, inode) of every Orbax temporary entry in the checkpoint directory."""
    directory = checkpoint.checkpoint_dir(workdir)
    found = set()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return found
    for name in names:
        if TMP_MARKER in name:
            try:
                found.add((name, os.stat(os.path.join(directory, name)).st_ino))
            except FileNotFoundError:  # renamed away just now: the save completed
                pass
    return found


def _wait_for(proc: subprocess.Popen, condition, timeout: float) -> bool:
    """Poll `condition` every 2 ms until it holds (True) or the process exits or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def _leaves(tree) -> list[tuple[str, object]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _phase(stdout: str, logged: bool) -> str:
    """How far the killed process had got, from its console output."""
    if logged:
        return "training"
    if "compiled the train step" in stdout:
        return "first step"
    if "mesh {" in stdout:
        return "restore/compile"
    return "startup"


def _tail(path, n: int = 3000) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


@pytest.mark.slow
def test_sigkill_20_times_then_bitwise_equal_to_uninterrupted(tmp_path):
    t_start = time.monotonic()
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    ref, killed, logs = tmp_path / "reference", tmp_path / "killed", tmp_path / "logs"
    logs.mkdir()

    # Uninterrupted reference run; it also trains the tokenizer that the killed run then reuses.
    with open(logs / "reference.err", "w") as err:
        proc = subprocess.Popen(_command(ref, corpus), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    t0 = time.monotonic()
    _wait_for(proc, lambda: _metric_lines(ref) > 0, 600)
    first_step_s = time.monotonic() - t0  # start to first logged step, an estimate for startup kills
    assert proc.wait(timeout=600) == 0, _tail(logs / "reference.err")
    killed.mkdir()
    for name in ("tokenizer.model", "tokenizer.vocab"):
        shutil.copy(ref / name, killed / name)

    # The kind of moment each kill aims at, in a seeded random order; the delays are random too.
    rng = random.Random(SEED)
    plan = ["startup"] * 5 + ["train"] * 8 + ["save"] * 7
    rng.shuffle(plan)
    kills = []
    for attempt, kind in enumerate(plan):
        before_tmp = _tmp_dirs(killed)  # left behind by earlier kills mid-save
        before_lines = _metric_lines(killed)
        err_path, out_path = logs / f"attempt{attempt:02d}.err", logs / f"attempt{attempt:02d}.out"
        with open(err_path, "w") as err, open(out_path, "w") as out:
            proc = subprocess.Popen(_command(killed, corpus), cwd=ROOT, stdout=out, stderr=err,
                                    start_new_session=True)
        t0 = time.monotonic()
        if kind == "startup":  # imports, tokenizer, restore, compile: before (or just into) the first step
            reached = _wait_for(proc, lambda: False, rng.uniform(0.05, 1.0) * first_step_s) or proc.poll() is None
        elif kind == "train":  # a random moment within the first few steps (bounded progress per restart)
            reached = _wait_for(proc, lambda: _metric_lines(killed) > before_lines, ATTEMPT_TIMEOUT_S)
            first_step_s = time.monotonic() - t0
            steps = rng.randint(0, 8)
            reached = reached and _wait_for(proc, lambda: _metric_lines(killed) > before_lines + steps,
                                            ATTEMPT_TIMEOUT_S)
            reached = reached and (_wait_for(proc, lambda: False, rng.uniform(0.0, 0.1)) or proc.poll() is None)
        else:  # as soon as (or a few ms after) the 1st, 2nd or 3rd checkpoint of this process starts being written
            saves = rng.randint(1, 3)
            seen: set[tuple[str, int]] = set()

            def started_saves() -> bool:
                seen.update(_tmp_dirs(killed) - before_tmp)
                return len(seen) >= saves

            reached = _wait_for(proc, started_saves, ATTEMPT_TIMEOUT_S)
            reached = reached and (_wait_for(proc, lambda: False, rng.uniform(0.0, 0.02)) or proc.poll() is None)
        during_save = bool(_tmp_dirs(killed) - before_tmp)
        phase = _phase(_tail(out_path, 10**6), _metric_lines(killed) > before_lines)
        resumed = re.search(r"resumed from step (\d+)", _tail(out_path, 10**6))
        if proc.poll() is not None:
            rc = proc.wait()
            pytest.fail(f"attempt {attempt} ({kind}) exited on its own with status {rc} before its kill "
                        f"(reached={reached}):\n{_tail(err_path)}")
        os.killpg(proc.pid, signal.SIGKILL)  # the session (and process group) this harness started
        rc = proc.wait()
        assert rc == -signal.SIGKILL, (attempt, rc, _tail(err_path))
        kills.append({"attempt": attempt, "kind": kind, "after_s": round(time.monotonic() - t0, 3),
                      "phase": phase, "during_save": during_save, "resumed_from": int(resumed[1]) if resumed else None,
                      "logged_lines": _metric_lines(killed) - before_lines})

    # The last restart runs to the end on its own.
    with open(logs / "final.err", "w") as err:
        proc = subprocess.run(_command(killed, corpus), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, timeout=600)
    assert proc.returncode == 0, _tail(logs / "final.err")

    for path in sorted(logs.iterdir()):  # no restart met an error it survived, nor a damaged checkpoint
        assert "Traceback" not in _tail(path, 10**7), (path.name, _tail(path))
        assert "is damaged" not in _tail(path, 10**7), (path.name, _tail(path))

    during_saves = sum(k["during_save"] for k in kills)
    phases = {p: sum(k["phase"] == p for k in kills) for p in ("startup", "restore/compile", "first step", "training")}
    print(f"\n{NUM_KILLS} kills, {during_saves} during a save, by phase {phases}; "
          f"harness {time.monotonic() - t_start:.0f}s")
    for k in kills:
        print(k)
    assert len(kills) == NUM_KILLS
    assert during_saves >= 5, kills

    reference = dict(_losses(ref))
    assert sorted(reference) == list(range(1, NUM_STEPS + 1))
    logged = _losses(killed)
    assert {step for step, _ in logged} == set(reference)
    mismatches = [(step, loss, reference[step]) for step, loss in logged if loss != reference[step]]
    assert not mismatches, mismatches[:10]

    _, ref_params, ref_step = checkpoint.load_latest(str(ref))
    _, killed_params, killed_step = checkpoint.load_latest(str(killed))
    assert ref_step == killed_step == NUM_STEPS
    ref_leaves = _leaves(ref_params)
    killed_leaves = _leaves(killed_params)
    assert [path for path, _ in ref_leaves] == [path for path, _ in killed_leaves]
    for (path, a), (_, b) in zip(ref_leaves, killed_leaves):
        assert np.array_equal(np.asarray(a), np.asarray(b)), path
