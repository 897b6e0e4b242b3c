"""`python -m maxlm.sweep`: the sweep helpers against itertools, trial names, plans that fail before any trial
starts, and the acceptance run -- a 2 x 2 sweep of the tiny config, 2 trials at a time, its table and plot,
a rerun that runs nothing, a killed trial resumed, and a SLURM array written without running anything."""

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest

from maxlm import config as C
from maxlm.launch import sweep as S

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
TINY = os.path.join(ROOT, "configs", "tiny.py")


def test_helpers_against_itertools():
    lrs, widths, seeds = [1e-3, 3e-3, 1e-2], [32, 64], [0, 1]
    assert S.product({"optim.peak_lr": lrs}, {"model.d_model": widths}) == [
        {"optim.peak_lr": a, "model.d_model": b} for a, b in itertools.product(lrs, widths)]
    assert S.grid({"optim.peak_lr": lrs, "model.d_model": widths}) == S.product({"optim.peak_lr": lrs},
                                                                                 {"model.d_model": widths})
    pairs = S.zipped({"model.d_model": widths, "optim.peak_lr": lrs[:2]})
    assert pairs == [{"model.d_model": w, "optim.peak_lr": lr} for w, lr in zip(widths, lrs[:2])]
    # a product of a zip with a grid: every (width, lr) pair with every seed
    crossed = S.product(pairs, {"train.seed": seeds})
    assert crossed == [{**p, "train.seed": s} for p, s in itertools.product(pairs, seeds)]
    assert S.chain(pairs, [{"model.d_model": 128}]) == pairs + [{"model.d_model": 128}]
    with pytest.raises(S.SweepError, match="one length"):
        S.zipped({"a": [1, 2], "b": [1]})
    with pytest.raises(S.SweepError, match="list of values"):
        S.grid({"a": 1})


def test_trial_names():
    keys = ["optim.peak_lr", "model.d_model"]
    assert S.trial_name({"optim.peak_lr": 0.001, "model.d_model": 64}, keys) == "peak_lr=0.001,d_model=64"
    # two swept keys ending alike keep their full names; odd characters become '_'
    keys = ["sft.base", "reward.base", "sft.tasks"]
    assert S.trial_name({"sft.base": "runs/a b", "reward.base": "x", "sft.tasks": ("sort", "add")}, keys) == \
        "sft.base=runs_a_b,reward.base=x,tasks=sort-add"
    long = S.trial_name({"sft.data_path": "x" * 300}, ["sft.data_path"])
    assert len(long) <= 100 and long != S.trial_name({"sft.data_path": "x" * 299}, ["sft.data_path"])
    assert S.trial_name({}, []) == "base"
    assert S.cli_value(True) == "true" and S.cli_value((5, 8)) == "(5, 8)" and float(S.cli_value(1 / 3)) == 1 / 3


def test_trial_command_reads_back_through_the_real_flag_parser(tmp_path, monkeypatch):
    """Every value type survives `--config.a.b=<text>` as ml_collections' flag parser (what each entry point
    uses) reads it, beside the sweep's shared flags, the trial's workdir and its W&B group and name."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    overrides = {"optim.peak_lr": 1 / 3, "train.profile_steps": (5, 8), "model.tie_embeddings": True,
                 "sft.template": "internlm2", "model.d_model": 96}
    plan = S.make_plan(TINY, C.load_config_file(TINY), [overrides], "dpo", ["--config.train.num_steps=7"])
    cmd = S.command(plan, plan.trials[0], str(tmp_path / "sw"))
    assert cmd[1:3] == ["-m", "maxlm.dpo"] and cmd[-1] == f"--workdir={tmp_path / 'sw' / plan.trials[0].name}"
    argv = ["prog"] + [a for a in cmd if a.startswith("--config")]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv as it defines the flag
    values = absl_flags.FlagValues()
    config_flags.DEFINE_config_file("config", TINY, flag_values=values, lock_config=True)
    values(argv)
    cfg = values.config
    assert cfg.optim.peak_lr == 1 / 3 and cfg.train.profile_steps == (5, 8) and cfg.model.tie_embeddings is True
    assert cfg.sft.template == "internlm2" and cfg.model.d_model == 96 and cfg.train.num_steps == 7
    assert cfg.train.wandb_group == "sw" and cfg.train.wandb_name == plan.trials[0].name


def test_plan_fails_before_any_trial_naming_it():
    base = C.load_config_file(TINY)
    with pytest.raises(S.SweepError, match=r"trial 1 \(no_such=1\): invalid config: optim.no_such"):
        S.make_plan(TINY, base, [{"optim.peak_lr": 1e-3}, {"optim.no_such": 1}], "train", [])
    with pytest.raises(S.SweepError, match=r"trial 0 .*optim.peak_lr"):
        S.make_plan(TINY, base, [{"optim.peak_lr": "fast"}], "train", [])
    with pytest.raises(S.SweepError, match=r"trial 0 .*train.num_steps: must be positive"):
        S.make_plan(TINY, base, [{"train.num_steps": 0}], "train", [])
    with pytest.raises(S.SweepError, match="same run"):
        S.make_plan(TINY, base, [{"train.seed": 1}, {"train.seed": 1}], "train", [])
    with pytest.raises(S.SweepError, match="unknown --entry"):
        S.make_plan(TINY, base, [{"train.seed": 1}], "pretrain", [])


def _sweep(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "maxlm.sweep", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_by_two_sweep_two_at_a_time_rerun_resume_and_slurm(shared_corpus, shared_tok_path, tmp_path):
    sweep_file = tmp_path / "lr_width.py"
    sweep_file.write_text("from maxlm.sweep import product\n\n\ndef get_sweep():\n"
                          "    return product({'optim.peak_lr': [1e-3, 3e-3]}, {'model.d_model': [32, 64]})\n")
    work = str(tmp_path / "sweep")
    shared = [f"--config={TINY}", f"--sweep={sweep_file}", "--config.model.vocab_size=320",
              f"--config.tokenizer.path={shared_tok_path}", "--config.data.source=jsonl",
              f"--config.data.path={shared_corpus}", "--config.data.seq_len=64", "--config.data.batch_size=8",
              "--config.data.eval_fraction=0.2", "--config.model.num_layers=1", "--config.model.mlp_dim=64",
              "--config.train.num_steps=6", "--config.train.log_every=2", "--config.train.eval_every=3",
              "--config.train.eval_batches=1", "--config.train.num_samples=0", "--config.checkpoint.every_steps=3",
              "--config.checkpoint.async_save=false"]
    first = _sweep(*shared, f"--workdir={work}", "--parallel=2")
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["trials"] == summary["finished"] == summary["ran"] == 4 and summary["skipped"] == 0

    names = ["peak_lr=0.001,d_model=32", "peak_lr=0.001,d_model=64", "peak_lr=0.003,d_model=32",
             "peak_lr=0.003,d_model=64"]
    rows = list(csv.DictReader(open(os.path.join(work, "results.csv"))))
    assert [r["trial"] for r in rows] == names and all(r["state"] == "finished" for r in rows)
    assert all(r["metric"] == "eval_loss" and float(r["final"]) > 0 for r in rows)
    assert os.path.getsize(os.path.join(work, "sweep.png")) > 0
    assert open(os.path.join(work, "results.md")).read().count("\n") == 6  # header, rule, 4 rows
    for name in names:  # each trial ran its own overrides on the shared ones
        step = max(int(s) for s in os.listdir(os.path.join(work, name, "checkpoints")))
        saved = json.load(open(os.path.join(work, name, "checkpoints", str(step), "config", "metadata")))
        lr, width = name.split(",")
        assert saved["optim"]["peak_lr"] == float(lr.split("=")[1]) and saved["model"]["d_model"] == int(width[8:])
        assert saved["model"]["num_layers"] == 1 and saved["train"]["wandb_group"] == "sweep"
        assert saved["train"]["wandb_name"] == name
    # two at a time: the second trial started before the first one ended
    attempts = [json.load(open(os.path.join(work, n, "trial.json")))["attempts"] for n in names]
    assert all(len(a) == 1 and a[0]["rc"] == 0 for a in attempts)
    assert attempts[1][0]["started"] < attempts[0][0]["started"] + attempts[0][0]["wall_s"]

    # The rerun runs nothing.
    again = json.loads(_sweep(*shared, f"--workdir={work}", "--parallel=2").stdout.strip().splitlines()[-1])
    assert again["ran"] == 0 and again["skipped"] == 4 and again["finished"] == 4
    assert all(len(json.load(open(os.path.join(work, n, "trial.json")))["attempts"]) == 1 for n in names)

    # A trial killed after its step-3 checkpoint (its last checkpoint and end status gone) is resumed from it.
    killed = os.path.join(work, names[2])
    shutil.rmtree(os.path.join(killed, "checkpoints", "6"))
    with open(os.path.join(killed, "status.json"), "w") as f:
        json.dump({"complete": False, "step": 3, "num_steps": 6}, f)
    again = json.loads(_sweep(*shared, f"--workdir={work}", "--parallel=2").stdout.strip().splitlines()[-1])
    assert again["ran"] == 1 and again["skipped"] == 3 and again["finished"] == 4
    assert "resumed from step 3" in open(os.path.join(killed, "trial.log")).read()
    assert len(json.load(open(os.path.join(killed, "trial.json")))["attempts"]) == 2

    # --report rebuilds the table from the trials' files.
    os.remove(os.path.join(work, "results.csv"))
    report = json.loads(_sweep(f"--report={work}").stdout.strip().splitlines()[-1])
    assert report["finished"] == 4 and len(list(csv.DictReader(open(os.path.join(work, "results.csv"))))) == 4

    # SLURM: the array script, and nothing run.
    slurm = str(tmp_path / "slurm")
    _sweep(*shared, f"--workdir={slurm}", "--launcher=slurm", "--nodes=2", "--gpus_per_node=8")
    script = open(os.path.join(slurm, "sweep.sbatch")).read()
    assert "#SBATCH --array=0-3\n" in script and "#SBATCH --nodes=2" in script
    assert "srun" in script and "--trial=$SLURM_ARRAY_TASK_ID --distributed" in script
    assert sorted(os.listdir(slurm)) == ["sweep.json", "sweep.sbatch"]


def test_bad_sweep_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_sweep():\n    return [{'optim.peak_lr': 1e-3}, {'optim.peek_lr': 1e-3}]\n")
    proc = _sweep(f"--config={TINY}", f"--sweep={bad}", f"--workdir={tmp_path / 'w'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: trial 1 (peek_lr=0.001): invalid config: optim.peek_lr: no such key in the config schema "
        "(see maxlm/config.py)"], proc.stderr
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_sigterm_stops_the_trials_after_a_checkpoint_and_a_rerun_resumes(shared_corpus, shared_tok_path, tmp_path):
    """SIGTERM to the sweep reaches the running trials: each saves at its next step and exits 0, the sweep
    exits 0 with them 'stopped', and the same command resumes them to the end."""
    import signal
    import time

    sweep_file = tmp_path / "seeds.py"
    sweep_file.write_text("def get_sweep():\n    return [{'train.seed': 0}, {'train.seed': 1}, {'train.seed': 2}]\n")
    work = str(tmp_path / "sweep")
    args = [sys.executable, "-m", "maxlm.sweep", f"--config={TINY}", f"--sweep={sweep_file}", f"--workdir={work}",
            "--parallel=2", "--config.model.vocab_size=320", f"--config.tokenizer.path={shared_tok_path}",
            "--config.data.source=jsonl", f"--config.data.path={shared_corpus}", "--config.data.seq_len=64",
            "--config.data.batch_size=8", "--config.model.num_layers=1", "--config.model.mlp_dim=64",
            "--config.train.num_steps=2000", "--config.train.log_every=2", "--config.train.eval_every=0",
            "--config.train.num_samples=0", "--config.checkpoint.every_steps=1000"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    logs = [os.path.join(work, f"seed={s}", "trial.log") for s in (0, 1)]
    deadline = time.time() + 300
    while not all(os.path.exists(p) and "step 2/2000" in open(p).read() for p in logs):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped: 2 trial(s) interrupted after a checkpoint, 1 not started" in out, out
    for p in logs:
        assert "SIGTERM: saved step" in open(p).read()
    assert not os.path.exists(os.path.join(work, "seed=2"))
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["finished"] == 3 and summary["ran"] == 3
    for p in logs:
        assert "resumed from step" in open(p).read()
