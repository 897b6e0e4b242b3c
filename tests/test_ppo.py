"""PPO: the loss on the padded rollout layout against numpy on each unpadded sequence, the rollout layout,
and `python -m maxlm.ppo` end to end (rollouts, reward model, updates, metrics, resume) on an imported
Hugging Face model with a reward model trained from it."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from maxlm import model, ppo, reward, sample
from maxlm import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    return C.override(C.default_config(), **{
        "model.vocab_size": 64, "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.max_seq_len": 64, "model.compute_dtype": "float32",
        "ppo.vf_coef": 0.5, "ppo.entropy_coef": 0.01, "ppo.clip_eps": 0.2, "ppo.value_clip": 0.2})


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_layout_and_loss_match_unpadded_numpy():
    config = _config()
    params = {"actor": model.init(config, jax.random.key(0)), "critic": reward.init(config, jax.random.key(1))}
    params["critic"]["head"] = jax.random.normal(jax.random.key(2), params["critic"]["head"].shape)
    rng = np.random.default_rng(0)
    stop, pad, r = 5, 0, 6
    prompts = [[1, 7, 8], [1, 9, 10, 11, 12], [1, 13]]
    responses = np.array([[20, 21, stop, 3, 3, 3], [22, 23, 24, 25, 26, 27], [stop, 4, 4, 4, 4, 4]])
    batch, mask, lists = ppo._layout(prompts, responses, 8, pad, stop)
    assert lists == [[20, 21, stop], [22, 23, 24, 25, 26, 27], [stop]]  # the stop token is an action too
    np.testing.assert_array_equal(mask.sum(1), [3, 6, 1])
    assert batch["inputs"].shape == (3, 8 + r - 1)
    b = mask.shape[0]
    rollout = dict(batch, old_logprobs=rng.normal(-2, 0.3, (b, r)).astype(np.float32),
                   old_values=rng.normal(0, 1, (b, r)).astype(np.float32),
                   advantages=rng.normal(0, 1, (b, r)).astype(np.float32),
                   returns=rng.normal(0, 1, (b, r)).astype(np.float32))
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


def test_sampled_tokens_are_the_policys_own():
    """Rollout log-probabilities recomputed on the layout equal those of the sampler's own cached decode."""
    config = _config()
    actor = model.init(config, jax.random.key(3))
    prompts = [[1, 7, 8], [1, 9]]
    tokens, positions, segments = sample.left_pad(prompts, 8, 0)
    out = np.asarray(sample.sample_padded(config, actor, tokens, positions, segments, rng=jax.random.key(0),
                                          max_new_tokens=5, eos_id=None))
    batch, mask, lists = ppo._layout(prompts, out, 8, 0, None)
    stats = ppo._score(config, actor, actor, reward.from_lm(actor), None, batch)
    for i, (prompt, response) in enumerate(zip(prompts, lists)):
        logits = np.asarray(model.apply(config, actor, jnp.asarray([prompt + response])))[0]
        want = [_log_softmax(logits[len(prompt) - 1 + j])[t] for j, t in enumerate(response)]
        np.testing.assert_allclose(np.asarray(stats["logprobs"][i]), want, atol=1e-4)
    np.testing.assert_array_equal(stats["logprobs"], stats["ref_logprobs"])


def test_ppo_cli_end_to_end_and_resume(hf_base, reward_run, tmp_path):
    rm_dir, done = reward_run
    assert done.returncode == 0, done.stderr[-3000:]
    work = str(tmp_path / "ppo")
    small = ["--config.data.seq_len=192", "--config.optim.warmup_steps=1", "--config.sft.task_train_size=200"]
    flags = [f"--config.ppo.policy={hf_base}", f"--config.ppo.reward_model={rm_dir}", "--config.ppo.rollout_batch=8",
             "--config.data.batch_size=4", "--config.ppo.max_new_tokens=6", "--config.ppo.epochs=2",
             "--config.ppo.eval_every=2", "--config.ppo.eval_items=4", "--config.checkpoint.every_steps=1", *small]
    run = lambda iterations: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "maxlm.ppo", "--config=configs/ppo_tiny.py", f"--workdir={work}",
         f"--config.ppo.iterations={iterations}", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    done = run(2)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [0, 1, 2]
    first = records[1]
    for key in ("iteration", "reward_mean", "kl", "kl_coef", "entropy", "policy_clipfrac", "value_clipfrac",
                "value_loss", "explained_variance", "response_length", "true_score", "time_sampling",
                "time_scoring", "time_training"):
        assert key in first and np.isfinite(first[key]), key
    assert abs(first["kl"]) < 1e-4  # the actor is the reference before its first update
    assert 0 < first["response_length"] <= 6 and "eval_true_score" in records[2]
    assert records[2]["kl_coef"] < first["kl_coef"]  # KL below its target: the controller lowers beta
    assert os.path.exists(os.path.join(work, "ppo.png"))

    done = run(3)  # resumes after iteration 2
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed after iteration 2" in done.stderr + done.stdout
    steps = [json.loads(line)["step"] for line in open(os.path.join(work, "metrics.jsonl"))]
    assert steps == [0, 1, 2, 3]

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
    from maxlm import tasks, tokenizer
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
