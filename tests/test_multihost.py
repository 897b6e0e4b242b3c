"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) train exactly like one
process x 8 devices on the same mesh: same global batches (each host packs only its rows), same losses --
for pretraining (with a second, longer stage) and for supervised fine-tuning."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.helpers import ROOT

ARGS = ["--config=configs/tiny.py", "--config.train.num_steps=20", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.num_samples=1", "--config.train.sample_tokens=8",
        "--config.tokenizer.train_max_bytes=300000", "--config.mesh.data=8",
        "--config.train.stages=('steps=4 data.seq_len=256 data.batch_size=8',)"]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_and_two(cmd: list[str], one, two) -> list[tuple[str, str]]:
    """Run `cmd` as one process x 8 devices in `one`, then as two processes x 4 in `two`; (stdout, stderr)
    of the two processes."""
    proc = subprocess.run([*cmd, f"--workdir={one}"], cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two.mkdir()
    shutil.copy(one / "tokenizer.model", two / "tokenizer.model")  # the same vocabulary, trained once
    port = _free_port()
    procs = [subprocess.Popen([*cmd, f"--workdir={two}", f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=_env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    outs = _one_and_two([sys.executable, "-m", "maxlm.train", *ARGS], one, two)
    assert "on 8 cpu device(s)" in outs[0][0] and "--- sample" in outs[0][0]
    assert "stage 2/2 'stage 1': steps 21..24, T=256 B=8" in outs[0][0]
    assert "step 24/24" not in outs[1][0]  # only process 0 logs
    single, multi = _losses(one), _losses(two)
    assert len(single) == len(multi) == 24
    assert max(abs(a - b) for a, b in zip(single, multi)) <= 1e-5
    assert os.path.isdir(two / "checkpoints" / "20") and os.path.isdir(two / "checkpoints" / "24")


@pytest.mark.slow  # 56 s; pretraining on two hosts stays in the default run
def test_two_processes_fine_tune_like_one(hf_base, tmp_path):
    """maxlm.sft from a Hugging Face base on the built-in tasks: same losses, and the end-of-run held-out
    scoring (sampling with parameters gathered from both hosts) gives the same accuracies."""
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "maxlm.sft", "--config=configs/sft_tiny.py", f"--config.sft.base={hf_base}",
           "--config.sft.task_train_size=200", "--config.sft.task_eval_size=16", "--config.sft.eval_items=4",
           "--config.data.batch_size=8", "--config.train.num_steps=6", "--config.train.log_every=1",
           "--config.train.eval_every=3", "--config.train.eval_batches=2", "--config.checkpoint.every_steps=3",
           "--config.mesh.data=8"]
    _one_and_two(cmd, one, two)
    single, multi = _losses(one), _losses(two)
    assert len(single) == len(multi) == 6
    assert max(abs(a - b) for a, b in zip(single, multi)) <= 1e-5
    evals = [json.load(open(d / "sft_eval.json")) for d in (one, two)]
    assert set(evals[0]) == {"format", "reverse", "sort", "add"} and evals[0] == evals[1]


@pytest.mark.slow  # 116 s with its reward model
def test_two_processes_run_ppo_like_one(hf_base, reward_run, tmp_path):
    """maxlm.ppo against a reward model: rollouts sampled on both hosts' devices, the same rewards, KL and
    held-out scores as one process."""
    rm_dir, done = reward_run
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "maxlm.ppo", "--config=configs/ppo_tiny.py", f"--config.ppo.policy={hf_base}",
           f"--config.ppo.reward_model={rm_dir}", "--config.ppo.rollout_batch=16", "--config.data.batch_size=8",
           "--config.ppo.max_new_tokens=6", "--config.ppo.epochs=1", "--config.ppo.iterations=2",
           "--config.ppo.eval_every=2", "--config.ppo.eval_items=4", "--config.data.seq_len=192",
           "--config.optim.warmup_steps=1", "--config.sft.task_train_size=200", "--config.mesh.data=8"]
    _one_and_two(cmd, one, two)
    records = [[json.loads(line) for line in open(d / "metrics.jsonl")] for d in (one, two)]
    # step counts optimizer updates (2 minibatches x 1 epoch per iteration): one record per iteration
    assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]] == [0, 2, 4]
    for key in ("reward_mean", "kl", "value_loss", "true_score", "eval_true_score"):
        assert any(key in r for r in records[0]), key  # every compared metric is logged somewhere
    for a, b in zip(*records):
        for key in ("reward_mean", "kl", "value_loss", "true_score", "eval_true_score"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])


@pytest.mark.slow  # 110 s; the PPO test above runs the reward model's forward on two hosts by default
def test_two_processes_train_a_reward_model_like_one(hf_base, tmp_path):
    """maxlm.reward on the built-in pairs: each host reads its rows of every pair batch; same losses and the
    same held-out accuracy as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "maxlm.reward", "--config=configs/reward_tiny.py", f"--config.reward.base={hf_base}",
           "--config.reward.domains=('correct','brief')", "--config.reward.train_size=32",
           "--config.reward.eval_size=8",
           "--config.data.batch_size=8", "--config.data.seq_len=192", "--config.train.num_steps=4",
           "--config.train.log_every=1", "--config.train.eval_every=4", "--config.train.eval_batches=2",
           "--config.checkpoint.every_steps=2", "--config.optim.warmup_steps=1", "--config.mesh.data=8"]
    _one_and_two(cmd, one, two)
    records = [[json.loads(line) for line in open(d / "metrics.jsonl")] for d in (one, two)]
    assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]] == [1, 2, 3, 4]
    for key in ("loss", "accuracy", "eval_loss", "eval_accuracy"):
        assert any(key in r for r in records[0]), key  # every compared metric is logged somewhere
    for a, b in zip(*records):
        for key in ("loss", "accuracy", "eval_loss", "eval_accuracy"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    evals = [json.load(open(d / "reward_eval.json")) for d in (one, two)]
    assert evals[0]["by_domain"].keys() == evals[1]["by_domain"].keys()
    for domain, a in evals[0]["by_domain"].items():
        b = evals[1]["by_domain"][domain]
        assert (a["n"], a["accuracy"]) == (b["n"], b["accuracy"]) and abs(a["loss"] - b["loss"]) <= 1e-6, domain
