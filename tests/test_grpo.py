"""Critic-free RL (`maxlm.grpo`): the step's loss against numpy loops over each reply run alone through the model
(every loss aggregation, ragged reply lengths, asymmetric clipping, the KL term), the collect phase's groups,
advantages and dynamic-sampling refill against numpy, and the command end to end with an exact resume."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as C
from maxlm import tokenizer
from maxlm.interop import pretrained
from maxlm.model import decoder as model, sampler as sample
from maxlm.posttrain import grpo, ppo
from tests.helpers import ROOT, random_params, tiny_model_config


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ragged_batch(rng):
    """A left-padded GRPO minibatch of 4 prompts and replies of 6, 2, 4 and 0 tokens -> (batch, responses,
    prompts, lengths, old log-probs, reference log-probs, per-reply advantages)."""
    prompts = [[1, 5, 9], [1, 7], [1, 4, 4, 8], [1, 3]]
    lengths = [6, 2, 4, 0]  # a full reply, short ones, and an empty one (weight 0 everywhere)
    responses = rng.integers(2, 64, (4, 6))
    tokens, positions, segments = sample.left_pad(prompts, 8, 0)
    batch, mask, lists = ppo._layout(prompts, responses, 8, 0, None)
    mask = np.zeros((4, 6), np.float32)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    batch["mask"], batch["segment_ids"][:, 8:] = mask, mask[:, :-1].astype(np.int32)
    # Behaviour and reference log-probs near the policy's (ratios on both sides of both bounds), junk off-mask.
    old = rng.normal(-4, 0.3, (4, 6)).astype(np.float32)
    ref = rng.normal(-4, 0.5, (4, 6)).astype(np.float32)
    adv_rows = np.asarray([1.5, -0.7, 0.4, 2.0], np.float32)
    batch.update(old_logprobs=np.where(mask > 0, old, 1e6), ref_logprobs=np.where(mask > 0, ref, -1e6),
                 advantages=(adv_rows[:, None] * mask).astype(np.float32))
    return batch, responses, prompts, lengths, old, ref, adv_rows


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_loss_matches_numpy_on_ragged_replies(agg):
    config = C.override(tiny_model_config(64), **{
        "grpo.loss_agg": agg, "grpo.clip_low": 0.1, "grpo.clip_high": 0.3, "grpo.kl_coef": 0.25,
        "ppo.max_new_tokens": 6})
    params = random_params(model.abstract_params(config), 0, std=0.2)
    batch, responses, prompts, lengths, old, ref, adv_rows = _ragged_batch(np.random.default_rng(1))
    loss, sums = jax.jit(lambda p, b: grpo.grpo_loss(p, config, b))(params, batch)

    rows, clipped_any = [], 0
    for b, (prompt, n) in enumerate(zip(prompts, lengths)):
        seq = prompt + [int(t) for t in responses[b, :n]]
        logp = _log_softmax(np.asarray(model.apply(config, params, jnp.asarray([seq])))[0]) if n else None
        row = []
        for t in range(n):
            lp = logp[len(prompt) - 1 + t, responses[b, t]]
            ratio = np.exp(lp - old[b, t])
            a = adv_rows[b]
            pg = max(-a * ratio, -a * min(max(ratio, 0.9), 1.3))
            clipped_any += -a * min(max(ratio, 0.9), 1.3) > -a * ratio
            k3 = np.exp(ref[b, t] - lp) - (ref[b, t] - lp) - 1
            row.append(pg + 0.25 * k3)
        rows.append(row)
    if agg == "token_mean":
        want, weight = sum(map(sum, rows)), sum(lengths)
    elif agg == "seq_mean_token_mean":
        want, weight = sum(sum(r) / len(r) for r in rows if r), sum(1 for r in rows if r)
    else:
        want, weight = sum(sum(r) / 6 for r in rows), 4
    np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=1e-5)
    assert float(sums["weight"]) == weight
    assert clipped_any and float(sums["policy_clipfrac"]) > 0


def test_a_mixture_of_experts_policy_adds_its_router_losses_per_unit_of_weight():
    """GRPO adds router_aux_coef x load balance + router_z_coef x z-loss per unit of its own weight (DPO per
    pair and PPO per token, through the same `pretrain.router_loss`), as pretraining adds it per token: the
    loss with the coefficients minus the loss without them is weight x (that sum), the router stats read
    from a plain forward pass."""
    config = C.override(tiny_model_config(64), **{
        "ppo.max_new_tokens": 6, "model.num_experts": 4, "model.experts_per_token": 2,
        "model.router_aux_coef": 0.5, "model.router_z_coef": 0.25})
    params = random_params(model.abstract_params(config), 0, std=0.2)
    batch = _ragged_batch(np.random.default_rng(1))[0]
    loss, sums = grpo.grpo_loss(params, config, batch)
    plain, _ = grpo.grpo_loss(params, C.override(config, **{"model.router_aux_coef": 0.0,
                                                           "model.router_z_coef": 0.0}), batch)
    _, router = model.apply_with_aux(config, params, jnp.asarray(batch["inputs"]),
                                     positions=jnp.asarray(batch["positions"]),
                                     segment_ids=jnp.asarray(batch["segment_ids"]))
    want = float(sums["weight"]) * (0.5 * float(router["load_balance"]) + 0.25 * float(router["z_loss"]))
    assert want > 0
    np.testing.assert_allclose(float(loss) - float(plain), want, rtol=1e-4)
    np.testing.assert_allclose(float(sums["moe_load_balance"]),
                               float(sums["weight"]) * float(router["load_balance"]), rtol=1e-5)


@pytest.fixture(scope="module")
def walker(hf_base):
    """(config, params, tokenizer) of the random imported model, set up for the shortest-path task."""
    base_config, params, tok_path = pretrained.load_base(hf_base)
    tok = tokenizer.load(tok_path)
    config = C.override(C.default_config(), **{
        "ppo.reward_fn": "shortest_path", "ppo.rollout_batch": 8, "ppo.max_new_tokens": 4,
        "grpo.group_size": 2, "grpo.dynamic_sampling": True, "grpo.max_sampling_rounds": 3,
        "data.batch_size": 4})
    return pretrained.with_base_model(config, base_config, tok.vocab_size), params, tok


def test_groups_advantages_and_dynamic_sampling(walker):
    """A reward that is the parity of the reply's first token: some groups of 2 tie (no gradient) and are
    dropped; the batch is refilled from later draws; each kept group answers one prompt, has unequal rewards
    and the group-normalised advantages numpy computes; the same iteration gathers the same rollouts again."""
    config, params, tok = walker
    env = ppo.make_environment(config, tok)
    env.reward = lambda prompt, response: float(response[0] % 2)
    feed = grpo.GroupFeed(config, env, tok, *ppo.rollout_lengths(config, env))
    frozen = {"reference": params}
    rollout, record = feed.gather(params, frozen, 1)
    rewards = rollout["rewards"].reshape(4, 2)
    inputs = rollout["inputs"][:, :8].reshape(4, 2, 8)
    assert record["sampling_rounds"] > 1 or record["groups_informative"] == 1.0
    assert (inputs[:, 0] == inputs[:, 1]).all()  # a group's rows answer the same prompt
    if record["sampling_rounds"] < 3:  # the batch filled up: every kept group is informative
        assert (rewards[:, 0] != rewards[:, 1]).all()
    for g in range(4):
        r = rewards[g].astype(np.float64)
        std = np.sqrt(((r - r.mean()) ** 2).sum() / (len(r) - 1))
        want = (r - r.mean()) / (std + 1e-6)
        for i in range(2):
            row = g * 2 + i
            got = rollout["advantages"][row][rollout["mask"][row] > 0]
            np.testing.assert_allclose(got, want[i], rtol=1e-4, atol=1e-5)
    again, _ = grpo.GroupFeed(config, env, tok, *ppo.rollout_lengths(config, env)).gather(params, frozen, 1)
    for k in rollout:
        np.testing.assert_array_equal(rollout[k], again[k], err_msg=k)
    # A reward every group ties on: all draws are spent and the batch is filled with zero-advantage groups.
    env.reward = lambda prompt, response: 0.0
    flat, record = feed.gather(params, frozen, 2)
    assert record["sampling_rounds"] == 3 and record["groups_informative"] == 0
    assert not flat["advantages"].any()


def _grpo(policy, work, iterations):
    return [sys.executable, "-m", "maxlm.grpo", "--config=configs/grpo_graph.py", f"--workdir={work}",
            f"--config.ppo.policy={policy}", f"--config.ppo.iterations={iterations}", "--config.ppo.rollout_batch=8",
            "--config.grpo.group_size=4", "--config.data.batch_size=4", "--config.ppo.epochs=1",
            "--config.ppo.max_new_tokens=6", "--config.ppo.eval_every=100", "--config.optim.warmup_steps=1",
            "--config.checkpoint.every_steps=2", "--config.grpo.dynamic_sampling=True"]


@pytest.mark.slow  # 82 s; the trainer's resume is covered by PPO's SIGTERM test and DPO's CLI run
def test_grpo_cli_end_to_end_and_exact_resume(hf_base, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    done = subprocess.run(_grpo(hf_base, full, 3), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for iterations in (2, 3):  # stop after 2 iterations, then resume to 3
        run = subprocess.run(_grpo(hf_base, part, iterations), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from step 4" in run.stdout + run.stderr

    def by_iteration(work):
        return {int(r["iteration"]): r for r in map(json.loads, open(os.path.join(work, "metrics.jsonl")))
                if "iteration" in r}

    a, b = by_iteration(full), by_iteration(part)
    assert set(a) == {1, 2, 3} and set(b) == {1, 2, 3}
    for key in ("reward_mean", "kl", "loss", "groups_informative", "sampling_rounds", "eval_true_score"):
        assert a[3].get(key) == pytest.approx(b[3].get(key), rel=1e-5, abs=1e-7), key
    bad = subprocess.run(_grpo(hf_base, str(tmp_path / "bad"), 1) + ["--config.grpo.advantage=ppo"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "grpo.advantage" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
