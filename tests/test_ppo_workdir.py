"""PPO on the one trainer, on the shortest-path task (a programmatic reward: no reward model): SIGTERM
part-way exits 0 and the rerun logs the iterations of an uninterrupted run; bad-step reload comes from the
shared loop; and the PPO workdir's product -- the actor -- leaves it through `maxlm.sample`,
`maxlm.convert to_hf` (loaded back by transformers, logit for logit) and `maxlm.evaluate`."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxlm.interop import pretrained
from maxlm.model import decoder as model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ppo(policy, work, *extra, iterations=4):
    """The command line of a small PPO run (2 updates per iteration) on `policy`."""
    return [sys.executable, "-m", "maxlm.ppo", "--config=configs/ppo_graph.py", f"--workdir={work}",
            f"--config.ppo.policy={policy}", f"--config.ppo.iterations={iterations}", "--config.ppo.rollout_batch=8",
            "--config.data.batch_size=4", "--config.ppo.epochs=1", "--config.ppo.max_new_tokens=6",
            "--config.ppo.eval_every=100", "--config.optim.warmup_steps=1", "--config.optim.peak_lr=1e-2",
            # A random policy never reaches the goal (reward 0, advantages 0): the entropy bonus moves it.
            "--config.ppo.entropy_coef=0.05", *extra]


def _by_iteration(work):
    records = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    return {int(r["iteration"]): r for r in records if "iteration" in r}


@pytest.fixture(scope="module")
def full_run(hf_base, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("ppo") / "full")
    done = subprocess.run(_ppo(hf_base, work), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def test_sigterm_part_way_then_rerun_logs_the_uninterrupted_iterations(hf_base, full_run, tmp_path):
    work = str(tmp_path / "stopped")
    proc = subprocess.Popen(_ppo(hf_base, work), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = []
    for line in proc.stdout:  # the first iteration's log line: the second iteration is under way
        log.append(line)
        if line.startswith("step 2/8"):
            proc.send_signal(signal.SIGTERM)
            break
    log += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 0, "".join(log)[-3000:]
    assert any("SIGTERM: saved step" in line for line in log), "".join(log)[-3000:]
    stopped = _by_iteration(work)
    assert 1 <= max(stopped) < 4  # stopped part-way, at an iteration boundary
    done = subprocess.run(_ppo(hf_base, work), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from step {2 * max(stopped)} " in done.stdout + done.stderr
    resumed, full = _by_iteration(work), _by_iteration(full_run)
    assert sorted(resumed) == sorted(full) == [1, 2, 3, 4]
    for i in full:
        for key in ("reward_mean", "kl", "kl_coef", "true_score"):
            assert resumed[i][key] == pytest.approx(full[i][key], abs=1e-6), (i, key)
    # The actor moved: not a comparison of constants (the sampled KL estimate may come out either sign).
    assert abs(full[4]["kl"]) > 1e-3 and full[4]["grad_norm"] > 0


def test_bad_steps_reload_the_last_iteration(hf_base, tmp_path):
    """Steps 2 (the end of iteration 1, saved with the parameters it kept) and 3 are non-finite: the loop
    reloads step 2, the feed drops the rollouts of the discarded parameters, and iteration 3 samples afresh."""
    work = str(tmp_path / "bad")
    done = subprocess.run(_ppo(hf_base, work, "--config.train.inject_nan_at=(2,3)", "--config.train.max_bad_steps=2",
                               "--config.checkpoint.every_steps=1", iterations=2),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 non-finite steps in a row at step 3: reloaded step 2" in done.stdout + done.stderr
    records = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert [(r["step"], r.get("iteration"), r.get("reloads")) for r in records] == [
        (0, None, None), (2, 1, 0), (4, 3, 1)]
    assert all(np.isfinite(r["loss"]) for r in records[2:])


def test_the_actor_leaves_the_workdir(full_run, reward_run, tmp_path):
    config, params, step = pretrained.load_workdir(full_run)
    assert step == 8 and set(params) == set(model.abstract_params(config))
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    sampled = run("maxlm.sample", f"--workdir={full_run}", "--prompt=d", "--max_new_tokens=4", "--greedy")
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr[-2000:]

    out = str(tmp_path / "hf")
    exported = run("maxlm.convert", "to_hf", f"--workdir={full_run}", f"--out={out}")
    assert exported.returncode == 0, exported.stderr[-2000:]
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = np.array([[1, 5, 9, 14, 3, 7]], np.int32)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model.apply(config, jax.tree.map(np.asarray, params), tokens), np.float32)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)

    walks = tmp_path / "walks.jsonl"
    walks.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("d k f a", "b c a", "e a")))
    scored = run("maxlm.evaluate", f"--workdir={full_run}", "--task=ppl", f"--data={walks}")
    assert scored.returncode == 0, scored.stderr[-2000:]
    summary = json.load(open(os.path.join(full_run, "eval", "ppl_summary.json")))
    assert np.isfinite(summary["ppl"]) and summary["step"] == 8

    rm_dir, rm_done = reward_run  # a reward model is not a policy: a one-line refusal
    assert rm_done.returncode == 0, rm_done.stderr[-2000:]
    with pytest.raises(pretrained.BaseModelError, match="not a language model"):
        pretrained.load_workdir(rm_dir)
    refused = run("maxlm.sample", f"--workdir={rm_dir}", "--prompt=x", "--max_new_tokens=2")
    assert refused.returncode == 2 and "not a language model" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
