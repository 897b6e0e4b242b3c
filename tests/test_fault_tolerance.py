"""Recovery: non-finite steps skipped and reloaded, SIGTERM saves and exits 0, damaged checkpoints skipped,
checkpoints restored across meshes, and the checkpoint -> Hugging Face export CLI."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as C
from maxlm.interop import hf as convert
from maxlm.training import checkpoint, pretrain as train
from tests.helpers import ROOT, small_config


@pytest.fixture(scope="module")
def corpus(shared_corpus):
    return shared_corpus


@pytest.fixture(scope="module")
def tok_path(shared_tok_path):
    """One tokenizer for every run here (conftest.py; training it is most of a tiny run's start-up)."""
    return shared_tok_path


def _cfg(corpus, tok_path, **extra):
    return small_config(corpus, **{"tokenizer.path": tok_path, **extra})


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_one_bad_step_is_skipped(corpus, tok_path, tmp_path):
    clean = train.train(_cfg(corpus, tok_path, **{"train.num_steps": 4}), str(tmp_path / "clean"))
    cfg = _cfg(corpus, tok_path, **{"train.num_steps": 4, "train.inject_nan_at": (3,)})
    work = tmp_path / "nan"
    history = train.train(cfg, str(work))
    assert [r["bad_steps"] for r in history] == [0, 0, 1, 0]
    assert np.isnan(history[2]["grad_norm"]) and history[2]["reloads"] == 0
    # Steps 1-2 are the clean run's; step 3 changed nothing, so step 4 sees step 2's parameters.
    assert [r["loss"] for r in history[:3]] == [r["loss"] for r in clean[:3]]
    assert history[3]["loss"] != clean[3]["loss"]
    _, params, _ = checkpoint.load_latest(str(work))
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
    assert _records(work)[2]["bad_steps"] == 1  # visible in metrics.jsonl


def test_consecutive_bad_steps_reload_the_last_checkpoint(corpus, tok_path, tmp_path, capsys):
    cfg = _cfg(corpus, tok_path, **{"train.num_steps": 10, "train.inject_nan_at": (5, 6, 7),
                                  "train.max_bad_steps": 3, "checkpoint.every_steps": 2})
    work = tmp_path / "w"
    history = train.train(cfg, str(work))
    out = capsys.readouterr().out
    assert "3 non-finite steps in a row at step 7: reloaded step 6" in out
    records = _records(work)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10]
    assert [r["reloads"] for r in records] == [0] * 7 + [1] * 4
    assert sum(r["bad_steps"] for r in records) == 4  # 5, 6, 7, and 7 again (still in the injection list)
    assert history[-1]["step"] == 10 and np.isfinite(history[-1]["loss"])


def test_sigterm_saves_exits_zero_and_resumes(corpus, tok_path, tmp_path, capsys):
    """SIGTERM mid-run: the process saves the step it is at and exits 0; resuming from that checkpoint for two more
    steps gives, with the killed process's own log, the per-step losses and final parameters of an uninterrupted
    run of the same config, bit for bit."""
    work = tmp_path / "w"
    args = [sys.executable, "-m", "maxlm.train", "--config=configs/tiny.py", f"--workdir={work}",
            "--config.data.source=jsonl", f"--config.data.path={corpus}", "--config.data.eval_fraction=0",
            "--config.model.vocab_size=320", "--config.model.num_layers=2", "--config.model.d_model=64",
            "--config.model.mlp_dim=128", "--config.data.seq_len=64", "--config.data.batch_size=8",
            f"--config.tokenizer.path={tok_path}", "--config.train.log_every=1", "--config.optim.decay_steps=100000",
            "--config.train.eval_every=0", "--config.train.num_samples=0", "--config.checkpoint.every_steps=1000"]
    proc = subprocess.Popen([*args, "--config.train.num_steps=100000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (work / "metrics.jsonl").exists():
        time.sleep(0.5)
    while time.time() < deadline and len(_records(work)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    killed = _records(work)
    last = killed[-1]["step"]
    assert [r["step"] for r in killed] == list(range(1, last + 1))
    assert f"SIGTERM: saved step {last}" in out
    assert checkpoint.Checkpointer(str(work), _cfg(corpus, tok_path)).latest_step() == last
    config, _, _ = checkpoint.load_latest(str(work))  # the killed run's config, as its command line built it
    config = C.override(config, **{"train.num_steps": last + 2})
    capsys.readouterr()
    resumed = train.train(config, str(work))
    assert f"resumed from step {last}" in capsys.readouterr().out
    assert [r["step"] for r in resumed] == [last + 1, last + 2]
    reference = train.train(config, str(tmp_path / "reference"))
    assert [(r["step"], r["loss"]) for r in reference] == [(r["step"], r["loss"]) for r in killed + resumed]
    (_, a, _), (_, b, _) = (checkpoint.load_latest(str(w)) for w in (work, tmp_path / "reference"))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


def test_damaged_checkpoint_is_skipped(corpus, tok_path, tmp_path, capsys):
    cfg = _cfg(corpus, tok_path, **{"train.num_steps": 4, "checkpoint.every_steps": 2})
    work = str(tmp_path / "w")
    train.train(cfg, work)
    ckpt_dir = checkpoint.checkpoint_dir(work)
    damaged = os.path.join(ckpt_dir, "4")
    for folder, _, files in os.walk(os.path.join(damaged, "params")):
        for name in files:  # overwrite every data file of step 4's parameters with garbage
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"\0garbage")
    trainer = train.Trainer(cfg)
    ckpt = checkpoint.Checkpointer(work, cfg)
    params, _, meta = ckpt.restore_latest(trainer.abstract_state["params"], trainer.abstract_state["opt_state"])
    ckpt.close()
    assert meta["step"] == 2
    assert f"checkpoint {damaged} is damaged and is skipped" in capsys.readouterr().err
    assert os.path.isdir(damaged + ".damaged") and not os.path.exists(damaged)
    history = train.train(_cfg(corpus, tok_path, **{"train.num_steps": 5, "checkpoint.every_steps": 2}), work)
    assert [r["step"] for r in history] == [3, 4, 5]  # resumed from step 2 without a crash


def test_restore_across_meshes(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "reshard_check.py"), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = re.findall(r"RESULT (\S+) step=(\d+) diff=(\S+) placed=(\S+)", proc.stdout)
    assert [r[0] for r in results] == ["1dev", "data2xtensor2", "fsdp4xtensor2-zero1", "pipeline2xfsdp2xtensor2",
                                       "pipeline2-to-1dev"]
    for _, step, diff, placed in results:
        assert step == "7" and float(diff) == 0.0 and placed == "True"


def test_convert_cli_exports_a_checkpoint(corpus, tok_path, tmp_path):
    work, out = tmp_path / "w", tmp_path / "hf"
    train.train(_cfg(corpus, tok_path, **{"train.num_steps": 2}), str(work))
    proc = subprocess.run([sys.executable, "-m", "maxlm.convert", "to_hf", f"--workdir={work}", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer.model").exists()
    _, params, _ = checkpoint.load_latest(str(work))
    _, back = convert.from_hf(str(out))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)
    bad = subprocess.run([sys.executable, "-m", "maxlm.convert", "to_hf", f"--workdir={work}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "--out" in bad.stderr


def test_keeps_the_last_k_and_every_mth(corpus, tok_path, tmp_path):
    cfg = _cfg(corpus, tok_path, **{"train.num_steps": 9, "checkpoint.every_steps": 1, "checkpoint.max_to_keep": 2,
                                  "checkpoint.keep_period": 4, "train.num_samples": 0})
    train.train(cfg, str(tmp_path / "w"))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "w"), cfg)
    assert sorted(ckpt.manager.all_steps()) == [4, 8, 9]
    ckpt.close()
