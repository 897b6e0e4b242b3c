"""A workdir is one run: one writer (a lock naming its holder; stale locks taken over), and a rerun with another
model, data or stage refuses with one line and leaves every checkpoint as it was (issue 21)."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from maxlm import config as C
from maxlm.errors import WorkdirError
from maxlm.training import checkpoint, pretrain as train, workdir as workdir_lib
from tests.helpers import ROOT, small_config


@pytest.fixture(scope="module")
def tok_path(shared_tok_path):
    return shared_tok_path


def _cfg(corpus, tok_path, **extra):
    return small_config(corpus, **{"tokenizer.path": tok_path, "train.num_samples": 0, **extra})


def _tree_digest(folder):
    """Every file under `folder` (relative path -> sha256): checkpoints byte for byte."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _lock(workdir):
    return os.path.join(os.path.abspath(workdir), workdir_lib.LOCK_NAME)


def test_lock_names_its_holder_refuses_a_second_writer_and_is_released(tmp_path):
    work = str(tmp_path / "w")
    with workdir_lib.hold(work):
        holder = json.load(open(_lock(work)))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with workdir_lib.hold(work):  # re-entrant: the stage entry and the loop both hold it
            pass
        assert os.path.exists(_lock(work))
        # Another process is refused, naming this one.
        code = ("import sys\nfrom maxlm.training import workdir\nfrom maxlm.errors import WorkdirError\n"
                f"try:\n    workdir.hold({work!r}).__enter__()\nexcept WorkdirError as e:\n"
                "    print(e); sys.exit(3)\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 3, done.stderr[-2000:]
        assert f"is in use by PID {os.getpid()} on {socket.gethostname()}" in done.stdout
    assert not os.path.exists(_lock(work))
    assert os.listdir(work) == []  # no temporary files left


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(_lock(work), "w") as f:  # a holder killed with SIGKILL: same host, process gone
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "pid_start": "1", "started": "then",
                   "command": "maxlm.train"}, f)
    with workdir_lib.hold(str(work)):
        assert json.load(open(_lock(work)))["pid"] == os.getpid()
    assert f"taking over the lock of PID {dead.pid}" in capsys.readouterr().out
    # A live PID whose start time differs is a reused PID: stale as well.
    with open(_lock(work), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "pid_start": "-1", "started": "then"}, f)
    with workdir_lib.hold(str(work)):
        pass
    assert "no longer running" in capsys.readouterr().out
    # Another host's lock cannot be judged from here: refused, saying how to clear it.
    with open(_lock(work), "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "started": "then"}, f)
    with pytest.raises(WorkdirError, match="another host; if that run is gone, delete"):
        with workdir_lib.hold(str(work)):
            pass
    assert json.load(open(_lock(work)))["host"] == "elsewhere"


def test_changed_keys_ignore_run_knobs_and_name_identity():
    base = C.default_config()
    knobs = C.override(base, **{"train.num_steps": 5, "optim.peak_lr": 1.0, "mesh.fsdp": 2,
                                "model.compute_dtype": "float32", "checkpoint.every_steps": 7,
                                "ppo.iterations": 3})
    assert workdir_lib.changed_keys(base, knobs) == []
    other = C.override(base, **{"model.d_model": 64, "data.path": "x", "tokenizer.path": "t", "train.seed": 1})
    assert workdir_lib.changed_keys(base, other) == ["data.path", "model.d_model", "tokenizer.path", "train.seed"]
    staged = C.override(base, **{"data.seq_len": 4096, "model.rope_theta": 1e6})
    assert workdir_lib.changed_keys(base, staged) == ["data.seq_len", "model.rope_theta"]
    assert workdir_lib.changed_keys(base, staged, stage_boundary=True) == []
    with pytest.raises(WorkdirError, match="holds a sft run"):
        workdir_lib.check_resume(base, "sft", base, "pretrain", "w")


def test_a_rerun_with_another_model_refuses_and_loses_nothing(shared_corpus, tok_path, tmp_path):
    work = str(tmp_path / "w")
    first = train.train(_cfg(shared_corpus, tok_path, **{"train.num_steps": 6}), work)
    before = _tree_digest(checkpoint.checkpoint_dir(work))
    with pytest.raises(WorkdirError, match=r"another config \(model.d_model: 64 -> 32\).*new workdir"):
        train.train(_cfg(shared_corpus, tok_path, **{"train.num_steps": 9, "model.d_model": 32}), work)
    # Overriding the check does not make other shapes restorable: refused again, nothing set aside.
    with pytest.raises(WorkdirError, match=r"parameters have other shapes \(\['embedding'\] \(320, 64\) saved"):
        train.train(_cfg(shared_corpus, tok_path, **{"train.num_steps": 9, "model.d_model": 32,
                                                     "checkpoint.allow_config_change": True}), work)
    other = tmp_path / "other.jsonl"
    other.write_bytes(open(shared_corpus, "rb").read())
    with pytest.raises(WorkdirError, match=r"data.path: .* -> '.*other.jsonl'"):
        train.train(_cfg(shared_corpus, tok_path, **{"train.num_steps": 9, "data.path": str(other)}), work)
    assert _tree_digest(checkpoint.checkpoint_dir(work)) == before
    assert not os.path.exists(_lock(work))
    # The run itself resumes: same steps as an uninterrupted 9-step run.
    resumed = train.train(_cfg(shared_corpus, tok_path, **{"train.num_steps": 9}), work)
    assert [r["step"] for r in first + resumed] == list(range(1, 10))


def test_readers_fall_back_and_set_asides_never_collide(shared_corpus, tok_path, tmp_path):
    cfg = _cfg(shared_corpus, tok_path, **{"train.num_steps": 4, "checkpoint.every_steps": 2})
    work = str(tmp_path / "w")
    train.train(cfg, work)
    step4 = os.path.join(checkpoint.checkpoint_dir(work), "4")
    os.makedirs(step4 + ".damaged")  # an earlier set-aside of the same step
    with open(os.path.join(step4, "meta", "metadata"), "w") as f:
        f.write("{not json")
    # Sampling (and every reader of checkpoint.load_latest) takes step 2, says so, and moves nothing.
    done = subprocess.run([sys.executable, "-m", "maxlm.sample", f"--workdir={work}", "--prompt=a", "--greedy",
                           "--max_new_tokens=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"warning: checkpoint {step4} cannot be read" in done.stderr and "using step 2" in done.stderr
    assert os.path.isdir(step4)
    with pytest.raises(Exception):  # an explicit step is that step or an error
        checkpoint.load_latest(work, step=4)
    history = train.train(_cfg(shared_corpus, tok_path, **{"train.num_steps": 5, "checkpoint.every_steps": 2}), work)
    assert [r["step"] for r in history] == [3, 4, 5]
    assert os.path.isdir(step4 + ".damaged.2") and os.path.isdir(step4 + ".damaged")


def test_a_second_trainer_refuses_within_seconds_and_the_first_is_unharmed(shared_corpus, tok_path, tmp_path):
    flags = [f"--config.data.path={shared_corpus}", f"--config.tokenizer.path={tok_path}",
             "--config.data.source=jsonl", "--config.data.eval_fraction=0.0", "--config.model.vocab_size=320",
             "--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.num_heads=4",
             "--config.model.num_kv_heads=2", "--config.model.mlp_dim=128", "--config.model.max_seq_len=64",
             "--config.model.compute_dtype=float32", "--config.data.seq_len=64", "--config.data.batch_size=8",
             "--config.train.num_steps=30", "--config.train.log_every=1", "--config.train.num_samples=0",
             "--config.checkpoint.every_steps=10", "--config.optim.warmup_steps=5"]

    def command(work):
        return [sys.executable, "-m", "maxlm.train", "--config=configs/tiny.py", f"--workdir={work}", *flags]

    work = tmp_path / "shared"
    first = subprocess.Popen(command(work), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(_lock(work)) and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert os.path.exists(_lock(work)), first.communicate()[1][-2000:]
    t0 = time.time()
    second = subprocess.run(command(work), cwd=ROOT, capture_output=True, text=True, timeout=120)
    refused_in = time.time() - t0
    assert first.poll() is None, "the first run ended before the second tried; the test proves nothing"
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert lines[0].startswith(f"error: {work} is in use by PID {first.pid}"), lines
    assert refused_in < 30, refused_in
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    lone = subprocess.run(command(tmp_path / "lone"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert lone.returncode == 0, lone.stderr[-2000:]

    def losses(w):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(w, "metrics.jsonl")))]
    assert losses(work) == losses(tmp_path / "lone") and len(losses(work)) == 30
    assert not os.path.exists(_lock(work))
