"""Staged training (`train.stages`, InternLM2's 4k -> 32k): the plan a config expands to, its errors, each
stage's own lr schedule, and a staged run that resumes exactly however it is interrupted."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxlm import config as C
from maxlm.training import checkpoint, optim, pretrain as train
from tests.helpers import ROOT, small_config

LONG = ("name=long steps=8 data.seq_len=256 data.batch_size=2 model.max_seq_len=256 model.rope_scaling=yarn "
        "model.rope_factor=4 optim.peak_lr=1e-3 optim.warmup_steps=2")


def _staged(corpus, tok_path, stages=(LONG,), **extra):
    return small_config(corpus, **{"tokenizer.path": tok_path, "train.num_steps": 12, "checkpoint.every_steps": 4,
                                   "checkpoint.max_to_keep": 10, "train.num_samples": 0, "train.stages": stages,
                                   **extra})


def test_plan_applies_overrides_on_the_previous_stage():
    stages = ("steps=50 name=4x data.seq_len=512 model.rope_scaling=yarn model.rope_factor=4",
              "steps=20 data.seq_len=1024 model.rope_factor=8 'data.path=a b.jsonl' "
              "optim.schedule_start=0 mesh.sequence=2 checkpoint.async_save=false")
    c = C.override(C.default_config(), **{"train.num_steps": 100, "data.seq_len": 128, "model.max_seq_len": 1024,
                                          "data.shuffle_seed": 7, "train.stages": stages})
    plan = C.stage_plan(C.validate(c))
    assert [(s.index, s.name, s.start, s.end) for s in plan] == [(0, "stage 0", 0, 100), (1, "4x", 100, 150),
                                                                 (2, "stage 2", 150, 170)]
    first, second, third = (s.config for s in plan)
    assert first is c
    assert (second.data.seq_len, second.model.rope_scaling, second.model.rope_factor) == (512, "yarn", 4.0)
    assert second.model.rope_original_max_len == 128  # the previous stage's length, since none was set
    assert (second.train.num_steps, second.optim.schedule_start, second.data.shuffle_seed) == (150, 100, 8)
    # stage 3 inherits stage 2's scaling and original length; overrides win over the implied keys
    assert (third.model.rope_scaling, third.model.rope_factor, third.model.rope_original_max_len) == ("yarn", 8.0, 128)
    assert (third.train.num_steps, third.optim.schedule_start, third.data.shuffle_seed) == (170, 0, 9)
    assert (third.data.path, third.mesh.sequence, third.checkpoint.async_save) == ("a b.jsonl", 2, False)
    assert c.data.seq_len == 128 and c.train.num_steps == 100  # the given config is not modified


@pytest.mark.parametrize("entry, key, words", [
    ("data.seq_len=512", "train.stages[0].steps", "steps=<positive int>"),
    ("steps=0", "train.stages[0].steps", "steps=<positive int>"),
    ("steps=5 model.d_model=256", "train.stages[0].model.d_model", "parameter tree"),
    ("steps=5 tokenizer.path=x", "train.stages[0].tokenizer.path", "parameter tree"),
    ("steps=5 data.seqlen=4", "train.stages[0].data.seqlen", "no such key"),
    ("steps=5 data.seq_len=long", "train.stages[0].data.seq_len", "cannot read"),
    ("steps=5 data.seq_len", "train.stages[0]", "not key=value"),
    ("steps=5 data.seq_len=4096", "train.stages[0].data.seq_len", "exceeds model.max_seq_len"),
    ("steps=5 model.rope_scaling=xpos", "train.stages[0].model.rope_scaling", "must be one of"),
    (("steps", 5), "train.stages[0]", "string of key=value"),
])
def test_bad_stages_name_the_key(entry, key, words):
    c = C.override(C.default_config(), **{"train.stages": ("steps=3", entry)})
    with pytest.raises(C.ConfigError) as e:
        C.validate(c)
    assert e.value.key == key.replace("[0]", "[1]") and words in str(e.value)


def test_stage_schedule_starts_at_the_stage():
    c = C.override(C.default_config(), **{"train.num_steps": 100, "train.stages": (
        "steps=40 optim.peak_lr=1e-3 optim.warmup_steps=10 optim.end_lr_ratio=0.1",)})
    stage = C.stage_plan(c)[1].config
    lr = optim.schedule(stage)
    for step in (100, 105, 110, 125, 140):
        k = step - 100
        want = 1e-3 * k / 10 if k < 10 else 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 10) / 30)))
        assert float(lr(step)) == pytest.approx(want, rel=1e-5), step


def test_mesh_of_every_stage_checked_before_training(tmp_path):
    c = C.override(C.default_config(), **{"train.stages": (f"steps=3 mesh.sequence={2 * jax.device_count()}",)})
    with pytest.raises(C.ConfigError) as e:
        train.train(c, str(tmp_path / "w"))
    assert e.value.key == "train.stages[0].mesh"
    assert not os.path.exists(tmp_path / "w")  # nothing was written, no tokenizer trained


def _params(workdir, step=None):
    config, params, step = checkpoint.load_latest(workdir, step)
    return config, jax.tree.leaves(params), step


def test_staged_run_resumes_exactly(shared_corpus, shared_tok_path, tmp_path):
    """One uninterrupted staged run; the same in two invocations (the short config alone, then with the long
    stage: the second resumes the first's checkpoint); and the run 'killed' mid-stage and at the stage
    boundary (the newer checkpoints deleted). All end with identical parameters and identical losses."""
    full_dir = str(tmp_path / "full")
    full = train.train(_staged(shared_corpus, shared_tok_path), full_dir)
    assert [r["step"] for r in full] == list(range(1, 21))
    config, want, step = _params(full_dir)
    assert step == 20
    assert (config.data.seq_len, config.model.rope_scaling, config.model.rope_original_max_len) == (256, "yarn", 64)
    records = {r["step"]: r for r in full}
    # each checkpoint carries the config of the stage that wrote it
    boundary = checkpoint.load_latest(full_dir, 12)[0]
    assert (boundary.data.seq_len, boundary.data.batch_size, boundary.model.rope_scaling) == (64, 8, "none")
    # the stage's own warmup: step 13 runs at schedule count 12 = 0 steps into the stage, step 14 at half the peak
    assert records[13]["lr"] == 0.0 and records[14]["lr"] == pytest.approx(5e-4)

    two_dir = str(tmp_path / "two")
    first = train.train(_staged(shared_corpus, shared_tok_path, stages=()), two_dir)
    assert [r["step"] for r in first] == list(range(1, 13))
    second = train.train(_staged(shared_corpus, shared_tok_path), two_dir)
    assert [r["step"] for r in second] == list(range(13, 21))

    killed = {}
    for name, keep in (("mid", 16), ("boundary", 12)):
        d = str(tmp_path / name)
        shutil.copytree(full_dir, d)
        for s in os.listdir(os.path.join(d, "checkpoints")):
            if s.isdigit() and int(s) > keep:
                shutil.rmtree(os.path.join(d, "checkpoints", s))
        killed[name] = train.train(_staged(shared_corpus, shared_tok_path), d)
        assert [r["step"] for r in killed[name]] == list(range(keep + 1, 21))

    for name, d, again in (("two", two_dir, second), ("mid", str(tmp_path / "mid"), killed["mid"]),
                           ("boundary", str(tmp_path / "boundary"), killed["boundary"])):
        got = _params(d)[1]
        assert all(np.array_equal(a, b) for a, b in zip(want, got)), name
        for r in again:
            assert r["loss"] == records[r["step"]]["loss"], (name, r["step"])


def test_cli_stages_override(shared_corpus, shared_tok_path, tmp_path):
    """`--config.train.stages=(...)` from the command line, and a bad entry as one line, exit 2."""
    work = tmp_path / "cli"
    base = [sys.executable, "-m", "maxlm.train", "--config=configs/tiny.py", f"--workdir={work}",
            "--config.data.source=jsonl", f"--config.data.path={shared_corpus}",
            f"--config.tokenizer.path={shared_tok_path}",
            "--config.model.vocab_size=320", "--config.model.num_layers=1", "--config.train.num_steps=2",
            "--config.data.batch_size=2", "--config.data.seq_len=32", "--config.train.num_samples=0",
            "--config.train.eval_every=0", "--config.data.eval_fraction=0"]
    done = subprocess.run(base + ["--config.train.stages=('steps=2 data.seq_len=64 model.rope_scaling=ntk',)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stage 2/2 'stage 1': steps 3..4, T=64 B=2" in done.stdout + done.stderr
    with open(work / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f][-1] == 4
    bad = subprocess.run(base + ["--config.train.stages=('steps=2 model.num_layers=2',)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "train.stages[0].model.num_layers" in bad.stderr
    assert "Traceback" not in bad.stderr
