"""PPO: the loss on the padded rollout layout against numpy on each unpadded sequence, the rollout layout,
and `python -m maxlm.ppo` end to end (rollouts, reward model, updates, metrics, resume) on an imported
Hugging Face model with a reward model trained from it."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as C
from maxlm.model import decoder as model, sampler as sample
from maxlm.posttrain import ppo, reward
from tests.helpers import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    return C.override(C.default_config(), **{
        "model.vocab_size": 64, "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.max_seq_len": 64, "model.compute_dtype": "float32",
        "ppo.vf_coef": 0.5, "ppo.entropy_coef": 0.01, "ppo.clip_eps": 0.2, "ppo.value_clip": 0.2})


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


STOP, PAD, R = 5, 0, 6
PROMPTS = [[1, 7, 8], [1, 9, 10, 11, 12], [1, 13]]


def _rollout(config):
    """Parameters {actor, critic} and a rollout of 3 responses of 3, 6 and 1 tokens (stop included)."""
    params = {"actor": random_params(model.abstract_params(config), 0, std=0.1),
              "critic": random_params(reward.abstract_params(config), 1, std=0.3)}
    rng = np.random.default_rng(0)
    responses = np.array([[20, 21, STOP, 3, 3, 3], [22, 23, 24, 25, 26, 27], [STOP, 4, 4, 4, 4, 4]])
    batch, mask, lists = ppo._layout(PROMPTS, responses, 8, PAD, STOP)
    b = mask.shape[0]
    rollout = dict(batch, old_logprobs=rng.normal(-2, 0.3, (b, R)).astype(np.float32),
                   old_values=rng.normal(0, 1, (b, R)).astype(np.float32),
                   advantages=rng.normal(0, 1, (b, R)).astype(np.float32),
                   returns=rng.normal(0, 1, (b, R)).astype(np.float32))
    return params, rollout, mask, lists


def test_layout_and_loss_match_unpadded_numpy():
    config = _config()
    params, rollout, mask, lists = _rollout(config)
    prompts, stop = PROMPTS, STOP
    assert lists == [[20, 21, stop], [22, 23, 24, 25, 26, 27], [stop]]  # the stop token is an action too
    np.testing.assert_array_equal(mask.sum(1), [3, 6, 1])
    assert rollout["inputs"].shape == (3, 8 + R - 1)
    loss, sums = jax.jit(lambda p, x: ppo.ppo_loss(p, config, x))(params, rollout)

    expected = {"loss": 0.0, "policy_clipfrac": 0.0, "value_clipfrac": 0.0, "weight": 0.0}
    for i, (prompt, response) in enumerate(zip(prompts, lists)):
        seq = jnp.asarray([prompt + response])
        logits = np.asarray(model.apply(config, params["actor"], seq))[0, len(prompt) - 1:-1]
        values = np.asarray(reward.token_values(config, params["critic"], seq))[0, len(prompt) - 1:-1]
        logp_all = _log_softmax(logits.astype(np.float64))
        for j, token in enumerate(response):
            old, adv, ret, old_v = (rollout[k][i, j] for k in ("old_logprobs", "advantages", "returns", "old_values"))
            ratio = np.exp(logp_all[j, token] - old)
            pg = max(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
            v_clip = old_v + np.clip(values[j] - old_v, -0.2, 0.2)
            vf = 0.5 * max((values[j] - ret) ** 2, (v_clip - ret) ** 2)
            entropy = -(np.exp(logp_all[j]) * logp_all[j]).sum()
            expected["loss"] += pg + 0.5 * vf - 0.01 * entropy
            expected["policy_clipfrac"] += float(-adv * np.clip(ratio, 0.8, 1.2) > -adv * ratio)
            expected["value_clipfrac"] += float((v_clip - ret) ** 2 > (values[j] - ret) ** 2)
            expected["weight"] += 1
    np.testing.assert_allclose(float(loss), expected["loss"], rtol=2e-4, atol=2e-4)
    for k in ("weight", "policy_clipfrac", "value_clipfrac"):
        assert float(sums[k]) == expected[k], k
    # Whatever sits in the padding of the rollout does not change the loss.
    junk = dict(rollout, **{k: np.where(mask > 0, rollout[k], 1e3).astype(np.float32)
                            for k in ("old_logprobs", "old_values", "advantages", "returns")})
    np.testing.assert_allclose(float(ppo.ppo_loss(params, config, junk)[0]), float(loss), rtol=1e-6)


def test_ptx_adds_the_mean_language_model_loss():
    """PPO-ptx (InstructGPT eq. 2): the loss gains ptx_coef x the mean cross-entropy of the pretraining batch
    over its weighted tokens (numpy on the actor's logits, ragged weights), scaled per response token."""
    config = _config()
    params, rollout, mask, _ = _rollout(config)
    rng = np.random.default_rng(1)
    inputs, targets = rng.integers(1, 64, (2, 2, 9)).astype(np.int32)
    weights = np.ones((2, 9), np.float32)
    weights[0, 6:] = 0.0  # a padded tail: 15 weighted tokens in all
    ptx = {"ptx_inputs": inputs, "ptx_targets": targets, "ptx_loss_weights": weights,
           "ptx_positions": np.tile(np.arange(9, dtype=np.int32), (2, 1)),
           "ptx_segment_ids": np.ones((2, 9), np.int32)}
    plain, _ = ppo.ppo_loss(params, config, rollout)
    mixed, sums = ppo.ppo_loss(params, C.override(config, **{"ppo.ptx_coef": 0.7}), dict(rollout, **ptx))
    logits = np.asarray(model.apply(config, params["actor"], jnp.asarray(inputs)), np.float64)
    logp = _log_softmax(logits)
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mean_ce = float((ce * weights).sum() / weights.sum())
    tokens = float(mask.sum())
    np.testing.assert_allclose(float(mixed) - float(plain), 0.7 * mean_ce * tokens, rtol=1e-4)
    np.testing.assert_allclose(float(sums["ptx_loss"]) / tokens, mean_ce, rtol=1e-5)


def test_sampled_tokens_are_the_policys_own():
    """Rollout statistics on the padded layout -- the actor's and a *different* reference's log-probabilities,
    the critic's values -- equal those of each model run on the unpadded prompt + response alone."""
    config = _config()
    actor = random_params(model.abstract_params(config), 3, std=0.1)
    ref = random_params(model.abstract_params(config), 4, std=0.1)
    critic = random_params(reward.abstract_params(config), 5, std=0.3)
    prompts = [[1, 7, 8], [1, 9]]
    tokens, positions, segments = sample.left_pad(prompts, 8, 0)
    out = np.asarray(sample.sample_padded(config, actor, tokens, positions, segments, rng=jax.random.key(0),
                                          max_new_tokens=5, eos_id=None))
    batch, mask, lists = ppo._layout(prompts, out, 8, 0, None)
    stats = ppo._score(config, actor, ref, critic, None, batch)
    for i, (prompt, response) in enumerate(zip(prompts, lists)):
        seq = jnp.asarray([prompt + response])
        for key, params in (("logprobs", actor), ("ref_logprobs", ref)):
            logits = np.asarray(model.apply(config, params, seq))[0]
            want = [_log_softmax(logits[len(prompt) - 1 + j])[t] for j, t in enumerate(response)]
            np.testing.assert_allclose(np.asarray(stats[key][i]), want, atol=1e-4, err_msg=key)
        values = np.asarray(reward.token_values(config, critic, seq))[0, len(prompt) - 1:-1]
        np.testing.assert_allclose(np.asarray(stats["values"][i]), values, atol=1e-4)
    assert float(np.max(np.abs(np.asarray(stats["logprobs"]) - np.asarray(stats["ref_logprobs"])))) > 0.01


def _gae_loop(rewards, values, n, gamma, lam):
    """GAE over one response of n tokens (float64): A_t = sum_l (gamma lam)^l delta_{t+l}, V after the end 0."""
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** (u - t) * deltas[u] for u in range(t, n)) for t in range(n)]


def test_advantages_penalise_the_policys_excess_log_probability():
    """PPO's rollout math end to end (`ppo._advantages`) against numpy written here: per-token reward
    -beta * (log pi - log pi_ref) with the score added at the last real token only, GAE returns = A + V from
    the *unwhitened* advantages, advantages whitened over all real tokens of the batch (unbiased variance),
    per-sequence KL = sum of (log pi - log pi_ref)."""
    config = C.override(_config(), **{"ppo.gamma": 0.9, "ppo.lam": 0.8, "ppo.whiten_advantages": True})
    lengths, r, beta = (5, 2, 3, 1), 6, 0.3
    rng = np.random.default_rng(7)
    mask = np.zeros((len(lengths), r), np.float32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logprobs = rng.normal(-2.0, 0.5, mask.shape).astype(np.float32)
    ref_logprobs = rng.normal(-2.0, 0.5, mask.shape).astype(np.float32)
    logprobs[0, :5] = ref_logprobs[0, :5] + 1.0  # row 0: the policy is e times likelier than the reference
    values = rng.normal(0.0, 1.0, mask.shape).astype(np.float32)
    values[0] = 0.0
    scores = np.asarray([0.0, 2.0, -1.0, 0.5], np.float32)
    stats = {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values}
    out = jax.jit(lambda s, st, m, b: ppo._advantages(config, s, st, m, b))(scores, stats, mask, jnp.float32(beta))

    adv, ret, kl = [], [], []
    for i, n in enumerate(lengths):
        rewards = [-beta * (float(logprobs[i, t]) - float(ref_logprobs[i, t])) for t in range(n)]
        rewards[n - 1] += float(scores[i])
        a = _gae_loop(rewards, [float(v) for v in values[i, :n]], n, 0.9, 0.8)
        adv += [a]
        ret += [[a[t] + float(values[i, t]) for t in range(n)]]
        kl += [sum(float(logprobs[i, t]) - float(ref_logprobs[i, t]) for t in range(n))]
    # The sign, spelled out: row 0 has score 0, zero values and log pi - log pi_ref = 1 at each of its 5
    # tokens, so every one of its rewards is -beta and its first return is -beta * sum_k (gamma lam)^k.
    np.testing.assert_allclose(float(out["returns"][0, 0]), -beta * sum(0.72 ** k for k in range(5)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["kl"]), kl, rtol=1e-5)
    assert float(out["kl"][0]) == pytest.approx(5.0, rel=1e-5)
    flat = np.concatenate([np.asarray(a) for a in adv])
    whitened = (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8)
    got_adv = np.asarray(out["advantages"])
    got_ret = np.asarray(out["returns"])
    np.testing.assert_allclose(np.concatenate([got_adv[i, :n] for i, n in enumerate(lengths)]), whitened,
                               rtol=1e-4, atol=1e-5)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got_ret[i, :n], ret[i], rtol=1e-5, atol=1e-5)
        assert np.all(got_adv[i, n:] == 0) and np.all(got_ret[i, n:] == 0)
    flat_ret = np.concatenate(ret)
    flat_v = np.concatenate([values[i, :n] for i, n in enumerate(lengths)])
    np.testing.assert_allclose(float(out["explained_variance"]),
                               1.0 - np.var(flat_ret - flat_v) / np.var(flat_ret), rtol=1e-4)


def test_ppo_iterations_raise_a_programmatic_score():
    """The RLHF demos' claim at unit scale (they are slow tests): PPO's own pieces -- temperature-1 rollouts
    from the KV-cache sampler, `_score`, `_advantages` (KL to the frozen start, GAE, whitening) and the
    trainer's jitted clipped-loss step -- raise a reward that counts one target token in 4-token replies
    from ~1/16 under the random policy to more than 0.4 in 6 iterations, while the KL to the reference grows."""
    from maxlm.training import pretrain as train

    target, r = 9, 4
    config = C.override(_config(), **{
        "model.vocab_size": 16, "ppo.init_kl_coef": 0.01, "ppo.gamma": 1.0, "ppo.lam": 0.95, "ppo.epochs": 2,
        "data.batch_size": 16, "optim.schedule": "constant", "optim.peak_lr": 1e-2, "optim.warmup_steps": 0,
        "optim.weight_decay": 0.0, "ppo.entropy_coef": 0.0, "train.num_steps": 100})
    ref = model.init(config, jax.random.key(0))
    trainer = train.Trainer(config, objective=ppo.OBJECTIVE)
    state = trainer.init_state(jax.random.key(1), params={"actor": ref, "critic": reward.from_lm(ref)},
                               frozen={"reference": ref, "reward_model": reward.from_lm(ref)})
    score_fn = jax.jit(lambda a, c, b: ppo._score(config, a, ref, c, None, b))
    advantage_fn = jax.jit(lambda s, st, m: ppo._advantages(config, s, st, m, jnp.float32(0.01)))
    prompts = [[1, 2 + i % 5] for i in range(32)]
    tokens, positions, segments = sample.left_pad(prompts, 4, 0)
    means, kls = [], []
    for it in range(6):
        out = np.asarray(sample.sample_padded(config, state["params"]["actor"], tokens, positions, segments,
                                              rng=jax.random.key(100 + it), max_new_tokens=r, eos_id=None))
        batch, mask, _ = ppo._layout(prompts, out, 4, 0, None)
        scores = (out == target).mean(1).astype(np.float32)  # the "reward model": a count of the target
        stats = score_fn(state["params"]["actor"], state["params"]["critic"], batch)
        extra = advantage_fn(jnp.asarray(scores), stats, jnp.asarray(mask))
        rollout = dict(batch, old_logprobs=np.asarray(stats["logprobs"]), old_values=np.asarray(stats["values"]),
                       advantages=np.asarray(extra["advantages"]), returns=np.asarray(extra["returns"]))
        for _ in range(config.ppo.epochs):
            for rows in np.split(np.random.default_rng(it).permutation(32), 2):
                state, _ = trainer.step(state, trainer.device_batch({k: v[rows] for k, v in rollout.items()}))
        means.append(float(scores.mean()))
        kls.append(float(jnp.mean(extra["kl"])))
    assert means[0] < 0.1 and means[-1] > 0.4 and means == sorted(means), means  # 0.05 -> 0.68 measured
    assert kls[0] == pytest.approx(0.0, abs=1e-5) and kls[-1] > 0.1, kls


def test_ppo_cli_end_to_end_and_resume(hf_base, reward_run, tmp_path):
    rm_dir, done = reward_run
    assert done.returncode == 0, done.stderr[-3000:]
    work = str(tmp_path / "ppo")
    small = ["--config.data.seq_len=192", "--config.optim.warmup_steps=1", "--config.sft.task_train_size=200"]
    flags = [f"--config.ppo.policy={hf_base}", f"--config.ppo.reward_model={rm_dir}", "--config.ppo.rollout_batch=8",
             "--config.data.batch_size=4", "--config.ppo.max_new_tokens=6", "--config.ppo.epochs=2",
             "--config.ppo.eval_every=2", "--config.ppo.eval_items=4", "--config.checkpoint.every_steps=1",
             "--config.ppo.ptx_coef=0.5", *small]
    run = lambda iterations: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "maxlm.ppo", "--config=configs/ppo_tiny.py", f"--workdir={work}",
         f"--config.ppo.iterations={iterations}", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    done = run(2)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    # One step counter (optimizer updates: 2 minibatches x 2 epochs per iteration), a record per iteration.
    assert [(r["step"], r.get("iteration")) for r in records] == [(0, None), (4, 1), (8, 2)]
    first = records[1]
    for key in ("iteration", "reward_mean", "kl", "kl_coef", "entropy", "policy_clipfrac", "value_clipfrac",
                "value_loss", "explained_variance", "response_length", "true_score", "time_sampling",
                "time_scoring", "time_training"):
        assert key in first and np.isfinite(first[key]), key
    assert abs(first["kl"]) < 1e-4  # the actor is the reference before its first update
    assert 0 < first["response_length"] <= 6 and "eval_true_score" in records[2]
    # Ziegler et al.'s controller, written out: beta' = beta * (1 + clip(kl / 2 - 1, +-0.2) * 8 / 1000).
    for before, after in zip(records[1:], records[2:]):
        err = min(max(before["kl"] / 2.0 - 1.0, -0.2), 0.2)
        assert after["kl_coef"] == pytest.approx(before["kl_coef"] * (1 + err * 8 / 1000), rel=1e-6)
    assert records[2]["kl_coef"] < first["kl_coef"]  # KL below its target: the controller lowers beta
    assert first["lr"] == pytest.approx(1e-4)  # constant after 1 warmup step
    # PPO-ptx: a fresh pretraining batch per update; the model is a near-uniform random init, so its mean
    # language-model loss is ln(vocabulary size) plus about half the variance of its tiny logits (0.02 here).
    from maxlm import tokenizer

    vocab = tokenizer.load(os.path.join(hf_base, "tokenizer.model")).vocab_size
    assert first["ptx_loss"] == pytest.approx(np.log(vocab), abs=0.05)
    meta = [open(f).read() for f in glob.glob(os.path.join(work, "checkpoints", "8", "meta", "*"))]
    assert any('"ptx_data"' in text for text in meta), meta  # the pretraining data position is checkpointed
    assert os.path.exists(os.path.join(work, "ppo.png"))

    assert any('"stage": "ppo"' in text and '"policy": "actor"' in text for text in meta), meta
    # (Resuming -- after a SIGTERM too -- is tested on the shortest-path task: tests/test_ppo_workdir.py.)

    bad = subprocess.run([sys.executable, "-m", "maxlm.ppo", "--config=configs/ppo_tiny.py",
                          f"--workdir={tmp_path / 'bad'}", f"--config.ppo.policy={hf_base}",
                          "--config.ppo.reward_model=/no/such/rm"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "ppo.reward_model" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    for flag, key in (("--config.lora.rank=4", "lora.rank"), ("--config.train.stages=('steps=2',)", "train.stages")):
        bad = subprocess.run([sys.executable, "-m", "maxlm.ppo", "--config=configs/ppo_tiny.py",
                              f"--workdir={tmp_path / 'bad'}", f"--config.ppo.policy={hf_base}", flag],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and key in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_reward_model_sees_a_sampled_reply_as_it_was_trained(shared_tok_path):
    """PPO's reward-model input for a reply that stopped at the end marker is token for token the
    rendering `maxlm.reward` trains on, and the checker ignores the marker."""
    from maxlm.data import tasks
    from maxlm import tokenizer
    from maxlm.data import preference

    tok = tokenizer.load(shared_tok_path)
    config = C.override(C.default_config(), **{"sft.task_train_size": 20, "ppo.eval_items": 4})
    env = ppo.TaskEnvironment(config, tok)
    item = tasks.make_items("sort", "train", 1)[0]
    prompt = env.prompt(item)
    reply = tok.encode(item.answer) + [env.stop_id]
    trained, _ = preference.render_pair(env.template, tok, item.prompt, item.answer, "x",
                                        system=preference.DOMAINS["correct"])
    assert prompt.reward_ids + reply == trained.tolist()
    assert env.true_score(prompt, reply) == 1.0 and env.true_score(prompt, reply[:-2] + [env.stop_id]) == 0.0
