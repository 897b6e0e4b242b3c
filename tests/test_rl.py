"""PPO / RLHF math in `maxlm.rl`, against independent numpy oracles written here as plain loops.

Rows have mask lengths (7, 3, 0, 5, 1): a full row, an empty row and partial ones. Masked-out positions are
filled with large junk to check that nothing leaks from them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.posttrain import rl
from tests import helpers

T = 7
LENGTHS = (7, 3, 0, 5, 1)
B = len(LENGTHS)
JUNK = 1e6
TOL = dict(rtol=1e-5, atol=1e-5)


def _mask(dtype=np.float32):
    return helpers.ragged_mask(LENGTHS, T, dtype)


def _rand(seed, shape=(B, T), scale=1.0):
    return helpers.normal_f32(seed, shape, scale)


def _junk(x, mask, seed=99):
    return helpers.with_junk(x, mask, seed, JUNK)


# ---- numpy oracles (loops, float64) ----

def _entries(x, mask):
    return [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]


def _var_ref(x, mask, unbiased):
    vals = _entries(x, mask)
    n = len(vals)
    if n == 0:
        return 0.0
    mean = sum(vals) / n
    ss = sum((v - mean) ** 2 for v in vals)
    return ss / (n - 1) if unbiased and n > 1 else ss / n


def _gae_ref(rewards, values, mask, gamma, lam):
    adv = np.zeros(rewards.shape, np.float64)
    for b in range(rewards.shape[0]):
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                continue
            if t + 1 < rewards.shape[1] and mask[b, t + 1]:
                next_v, next_a = float(values[b, t + 1]), adv[b, t + 1]
            else:
                next_v, next_a = 0.0, 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            adv[b, t] = delta + gamma * lam * next_a
    returns = np.zeros_like(adv)
    for b in range(rewards.shape[0]):
        for t in range(rewards.shape[1]):
            if mask[b, t]:
                returns[b, t] = adv[b, t] + values[b, t]
    return adv, returns


def _log_softmax_ref(logits):
    out = np.zeros(logits.shape, np.float64)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            row = logits[b, t].astype(np.float64)
            mx = row.max()
            out[b, t] = row - mx - math.log(sum(math.exp(v - mx) for v in row))
    return out


def _policy_ref(lp, old, adv, eps):
    loss, clipped = np.zeros(lp.shape), np.zeros(lp.shape)
    for i in np.ndindex(lp.shape):
        ratio = math.exp(float(lp[i]) - float(old[i]))
        a = float(adv[i])
        u, c = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
        loss[i], clipped[i] = max(u, c), float(c > u)
    return loss, clipped


def _value_ref(v, old, ret, c):
    loss, clipped = np.zeros(v.shape), np.zeros(v.shape)
    for i in np.ndindex(v.shape):
        v_clip = float(old[i]) + min(max(float(v[i]) - float(old[i]), -c), c)
        e, ec = (float(v[i]) - float(ret[i])) ** 2, (v_clip - float(ret[i])) ** 2
        loss[i], clipped[i] = 0.5 * max(e, ec), float(ec > e)
    return loss, clipped


# ---- masked reductions ----

@pytest.mark.parametrize("mask_dtype", [np.float32, bool])
def test_masked_reductions(mask_dtype):
    x, mask = _rand(0), _mask(mask_dtype)
    vals = _entries(x, mask)
    np.testing.assert_allclose(rl.masked_sum(x, mask), sum(vals), **TOL)
    np.testing.assert_allclose(rl.masked_mean(x, mask), sum(vals) / len(vals), **TOL)
    row_means = [sum(x[b, :n]) / max(n, 1) for b, n in enumerate(LENGTHS)]
    np.testing.assert_allclose(rl.masked_mean(x, mask, axis=1), row_means, **TOL)
    assert float(rl.masked_mean(x, mask, axis=1)[2]) == 0.0
    np.testing.assert_allclose(rl.masked_var(x, mask), _var_ref(x, mask, True), **TOL)
    np.testing.assert_allclose(rl.masked_var(x, mask, unbiased=False), _var_ref(x, mask, False), **TOL)
    xj = _junk(x, _mask())
    for fn in (lambda a: rl.masked_sum(a, mask), lambda a: rl.masked_mean(a, mask, axis=1),
               lambda a: rl.masked_var(a, mask)):
        np.testing.assert_array_equal(fn(xj), fn(x))


def test_masked_var_edge_counts():
    x = _rand(1)
    one = np.zeros((B, T), np.float32)
    one[1, 2] = 1
    assert float(rl.masked_var(x, one)) == 0.0
    assert float(rl.masked_var(x, np.zeros((B, T)))) == 0.0
    assert float(rl.masked_mean(x, np.zeros((B, T)))) == 0.0
    two = np.zeros((B, T), np.float32)
    two[0, :2] = 1
    np.testing.assert_allclose(rl.masked_var(x, two), (x[0, 0] - x[0, 1]) ** 2 / 2, **TOL)


def test_whiten():
    x, mask = _rand(2, scale=3.0) + 5.0, _mask()
    w = np.asarray(rl.whiten(x, mask))
    vals = _entries(w, mask)
    assert abs(np.mean(vals)) < 1e-5
    np.testing.assert_allclose(np.std(vals, ddof=1), 1.0, rtol=1e-5)
    assert np.all(w[mask == 0] == 0)
    mean, var = np.mean(_entries(x, mask)), _var_ref(x, mask, True)
    np.testing.assert_allclose(w[mask > 0], (x[mask > 0] - mean) / math.sqrt(var + 1e-8), **TOL)
    k = np.asarray(rl.whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(np.mean(_entries(k, mask)), mean, **TOL)
    np.testing.assert_allclose(np.std(_entries(k, mask), ddof=1), 1.0, rtol=1e-5)
    assert np.all(k[mask == 0] == 0)
    np.testing.assert_array_equal(rl.whiten(_junk(x, mask), mask), w)
    np.testing.assert_array_equal(rl.whiten(x, np.zeros((B, T))), np.zeros((B, T)))


# ---- logits ----

def test_logprobs_and_entropy():
    logits = _rand(3, (B, T, 11), scale=4.0)
    tokens = np.random.default_rng(4).integers(0, 11, size=(B, T))
    ref = _log_softmax_ref(logits)
    want_lp = np.array([[ref[b, t, tokens[b, t]] for t in range(T)] for b in range(B)])
    lp = rl.logprobs_from_logits(logits, tokens)
    assert lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, want_lp, **TOL)
    want_h = -np.sum(np.exp(ref) * ref, axis=-1)
    np.testing.assert_allclose(rl.entropy_from_logits(logits), want_h, **TOL)
    np.testing.assert_allclose(rl.logprobs_from_logits(jnp.asarray(logits, jnp.bfloat16), tokens),
                               _log_softmax_ref(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32))
                               [np.arange(B)[:, None], np.arange(T)[None], tokens], **TOL)
    uniform = np.zeros((1, 1, 8), np.float32)
    np.testing.assert_allclose(rl.entropy_from_logits(uniform), [[math.log(8)]], **TOL)
    onehot = np.full((1, 1, 8), -np.inf, np.float32)
    onehot[..., 3] = 0.0
    np.testing.assert_array_equal(rl.entropy_from_logits(onehot), [[0.0]])


# ---- rewards and GAE ----

def test_kl_penalized_rewards():
    mask, lp, ref = _mask(), _rand(5), _rand(6)
    scores = np.array([1.5, -2.0, 7.0, 0.25, 3.0], np.float32)
    beta = 0.1
    rewards, kl = map(np.asarray, rl.kl_penalized_rewards(scores, lp, ref, mask, beta))
    want_kl = np.where(mask > 0, lp - ref, 0.0)
    np.testing.assert_allclose(kl, want_kl, **TOL)
    want_r = np.zeros((B, T))
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            want_r[b, t] = -beta * (lp[b, t] - ref[b, t]) + (scores[b] if t == n - 1 else 0.0)
    np.testing.assert_allclose(rewards, want_r, **TOL)
    score_part = rewards + beta * kl
    for b, n in enumerate(LENGTHS):
        for t in range(T):
            np.testing.assert_allclose(score_part[b, t], scores[b] if t == n - 1 else 0.0, atol=1e-5)
    assert np.all(rewards[2] == 0) and np.all(kl[2] == 0)
    rj, kj = rl.kl_penalized_rewards(scores, _junk(lp, mask), _junk(ref, mask, seed=7), mask, beta)
    np.testing.assert_array_equal(rj, rewards)
    np.testing.assert_array_equal(kj, kl)


def test_gae_hand_computed():
    r = np.array([[0.0, 0.0, 1.0, 9.0]], np.float32)
    v = np.array([[0.5, 0.5, 0.5, 9.0]], np.float32)
    m = np.array([[1, 1, 1, 0]], np.float32)
    adv, ret = rl.gae(r, v, m, 1.0, 1.0)
    np.testing.assert_allclose(adv, [[0.5, 0.5, 0.5, 0.0]], **TOL)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0, 0.0]], **TOL)
    adv, _ = rl.gae(r, v, m, 1.0, 0.0)
    np.testing.assert_allclose(adv, [[0.0, 0.0, 0.5, 0.0]], **TOL)
    adv, _ = rl.gae(r, v, m, 0.5, 1.0)
    np.testing.assert_allclose(adv, [[0.25 - 0.5, 0.5 - 0.5, 0.5, 0.0]], **TOL)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9)])
def test_gae_matches_loop(gamma, lam):
    mask, rewards, values = _mask(), _rand(7), _rand(8)
    adv, ret = map(np.asarray, rl.gae(rewards, values, mask, gamma, lam))
    want_adv, want_ret = _gae_ref(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, **TOL)
    np.testing.assert_allclose(ret, want_ret, **TOL)
    np.testing.assert_allclose(ret[mask > 0], (adv + values)[mask > 0], **TOL)
    assert np.all(adv[mask == 0] == 0) and np.all(ret[mask == 0] == 0)
    aj, rj = rl.gae(_junk(rewards, mask), _junk(values, mask, seed=3), mask.astype(bool), gamma, lam)
    np.testing.assert_array_equal(aj, adv)
    np.testing.assert_array_equal(rj, ret)


def test_gae_is_constant():
    mask, rewards, values = _mask(), _rand(9), _rand(10)
    g = jax.grad(lambda v: jnp.sum(rl.gae(rewards, v, mask, 0.99, 0.95)[0] ** 2))(jnp.asarray(values))
    np.testing.assert_array_equal(g, np.zeros((B, T)))


# ---- losses ----

RATIOS = (0.5, 0.85, 1.0, 1.1, 1.5)  # eps = 0.2: below, inside, inside, inside, above


def test_policy_loss_regions():
    eps = 0.2
    ratios = np.array(RATIOS * 2, np.float32)[None]
    adv = np.array([1.0] * 5 + [-1.0] * 5, np.float32)[None]
    old = _rand(11, ratios.shape)
    lp = (old + np.log(ratios)).astype(np.float32)
    loss, clipped = map(np.asarray, rl.policy_loss(lp, old, adv, eps))
    want_loss, want_clipped = _policy_ref(lp, old, adv, eps)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    np.testing.assert_array_equal(clipped, want_clipped)
    # A > 0 is clipped only above 1 + eps, A < 0 only below 1 - eps (the pessimistic bound).
    np.testing.assert_array_equal(clipped[0], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(loss[0], [-0.5, -0.85, -1.0, -1.1, -1.2, 0.8, 0.85, 1.0, 1.1, 1.5], **TOL)


def test_policy_loss_random():
    lp, old, adv = _rand(12, scale=0.3), _rand(13, scale=0.3), _rand(14)
    loss, clipped = rl.policy_loss(lp, old, adv, 0.1)
    want_loss, want_clipped = _policy_ref(lp, old, adv, 0.1)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    np.testing.assert_array_equal(clipped, want_clipped)
    assert 0 < float(np.mean(want_clipped)) < 1


def test_value_loss_regions():
    c = 0.2
    old = np.zeros((1, 8), np.float32)
    values = np.array([[0.1, 0.1, 0.5, 0.5, -0.5, -0.5, 0.5, -0.1]], np.float32)
    returns = np.array([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 0.3, 0.0]], np.float32)
    loss, clipped = map(np.asarray, rl.value_loss(values, old, returns, c))
    want_loss, want_clipped = _value_ref(values, old, returns, c)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    np.testing.assert_array_equal(clipped, want_clipped)
    # inside the range: never clipped; outside: clipped iff v_clip is further from the return than v.
    np.testing.assert_array_equal(clipped[0], [0, 0, 1, 0, 0, 1, 0, 0])
    np.testing.assert_allclose(loss[0], 0.5 * np.array([0.81, 1.21, 0.64, 2.25, 2.25, 0.64, 0.04, 0.01]), **TOL)


def test_value_loss_random():
    v, old, ret = _rand(15), _rand(16), _rand(17)
    loss, clipped = rl.value_loss(v, old, ret, 0.5)
    want_loss, want_clipped = _value_ref(v, old, ret, 0.5)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    np.testing.assert_array_equal(clipped, want_clipped)
    assert 0 < float(np.mean(want_clipped)) < 1


def test_approx_kl():
    lp, old = _rand(18, scale=0.5), _rand(19, scale=0.5)
    want = np.zeros((B, T))
    for i in np.ndindex(B, T):
        ratio = math.exp(float(lp[i]) - float(old[i]))
        want[i] = (ratio - 1) - math.log(ratio)
    got = np.asarray(rl.approx_kl(lp, old))
    np.testing.assert_allclose(got, want, **TOL)
    assert np.all(got >= 0)
    np.testing.assert_array_equal(rl.approx_kl(old, old), np.zeros((B, T)))


def test_explained_variance():
    mask, ret = _mask(), _rand(20)
    values = (ret + 0.3 * _rand(21)).astype(np.float32)
    res = [float(ret[i] - values[i]) for i in np.ndindex(B, T) if mask[i]]
    want = 1 - np.var(res) / np.var(_entries(ret, mask))
    got = rl.explained_variance(values, ret, mask)
    np.testing.assert_allclose(got, want, **TOL)
    assert 0.5 < float(got) < 1
    np.testing.assert_array_equal(rl.explained_variance(_junk(values, mask), _junk(ret, mask, 5), mask), got)
    np.testing.assert_allclose(rl.explained_variance(ret, ret, mask), 1.0, **TOL)
    const = np.where(mask > 0, 2.0, JUNK).astype(np.float32)
    assert float(rl.explained_variance(values, const, mask)) == 0.0
    assert float(rl.explained_variance(values, ret, np.zeros((B, T)))) == 0.0


# ---- adaptive KL ----

def test_update_kl_coef():
    beta, target, n, h = 0.1, 6.0, 256, 10000
    up = rl.update_kl_coef(beta, 6.6, n, target, h)
    assert isinstance(up, float) and up > beta
    np.testing.assert_allclose(up, beta * (1 + 0.1 * n / h), rtol=1e-12)
    down = rl.update_kl_coef(beta, 5.4, n, target, h)
    assert down < beta
    np.testing.assert_allclose(down, beta * (1 - 0.1 * n / h), rtol=1e-12)
    np.testing.assert_allclose(rl.update_kl_coef(beta, 100.0, n, target, h), beta * (1 + 0.2 * n / h), rtol=1e-12)
    np.testing.assert_allclose(rl.update_kl_coef(beta, 0.0, n, target, h), beta * (1 - 0.2 * n / h), rtol=1e-12)
    assert rl.update_kl_coef(beta, target, n, target, h) == beta
    assert rl.update_kl_coef(beta, 100.0, n, None, h) is beta
    assert rl.update_kl_coef(beta, 100.0, n, 0.0, h) == beta
    assert rl.update_kl_coef(beta, 100.0, n, -1.0, h) == beta


def test_update_kl_coef_jax():
    f = jax.jit(rl.update_kl_coef)
    cases = [(6.6, 6.0, 0.1), (5.4, 6.0, -0.1), (100.0, 6.0, 0.2), (0.0, 6.0, -0.2)]
    for kl, target, err in cases:
        got = f(jnp.float32(0.1), jnp.float32(kl), jnp.int32(256), jnp.float32(target), jnp.float32(10000.0))
        np.testing.assert_allclose(got, 0.1 * (1 + err * 256 / 10000), rtol=1e-6)
    np.testing.assert_allclose(f(jnp.float32(0.1), jnp.float32(100.0), 256, jnp.float32(0.0), 10000.0), 0.1, rtol=1e-7)
    fixed = jax.jit(lambda b, k: rl.update_kl_coef(b, k, 256, None, 10000))
    np.testing.assert_allclose(fixed(jnp.float32(0.1), jnp.float32(100.0)), 0.1, rtol=1e-7)


# ---- jit ----

def test_everything_jits():
    mask, a, b, c = _mask(), _rand(22), _rand(23), _rand(24)
    logits, tokens = _rand(25, (B, T, 5)), np.random.default_rng(26).integers(0, 5, size=(B, T))
    scores = _rand(27, (B,))
    calls = [
        (rl.masked_sum, (a, mask)), (rl.masked_mean, (a, mask)), (rl.masked_var, (a, mask)),
        (lambda x, m: rl.masked_mean(x, m, axis=1), (a, mask)),
        (rl.whiten, (a, mask)), (lambda x, m: rl.whiten(x, m, shift_mean=False), (a, mask)),
        (rl.logprobs_from_logits, (logits, tokens)), (rl.entropy_from_logits, (logits,)),
        (rl.kl_penalized_rewards, (scores, a, b, mask, 0.05)),
        (rl.gae, (a, b, mask, 0.99, 0.95)),
        (rl.policy_loss, (a * 0.1, b * 0.1, c, 0.2)), (rl.value_loss, (a, b, c, 0.2)),
        (rl.approx_kl, (a * 0.1, b * 0.1)), (rl.explained_variance, (a, b, mask)),
    ]
    for fn, args in calls:
        eager, jitted = fn(*args), jax.jit(fn)(*args)
        for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            np.testing.assert_allclose(j, e, rtol=1e-5, atol=1e-6)
    want_adv, _ = _gae_ref(a, b, mask, 0.99, 0.95)
    np.testing.assert_allclose(jax.jit(rl.gae)(a, b, mask, 0.99, 0.95)[0], want_adv, **TOL)


def test_nonfinite_padding_does_not_leak():
    """The module promises selection, not multiplication, at padding: inf / NaN there must not leak either."""
    mask, a, b = _mask(), _rand(28), _rand(29)
    scores = _rand(30, (B,))

    def pad(x, v):
        return np.where(mask > 0, x, v).astype(np.float32)

    fns = [
        lambda x, y: rl.masked_sum(x, mask),
        lambda x, y: rl.masked_mean(x, mask, axis=1),
        lambda x, y: rl.masked_var(x, mask),
        lambda x, y: rl.whiten(x, mask),
        lambda x, y: rl.kl_penalized_rewards(scores, x, y, mask, 0.1),
        lambda x, y: rl.gae(x, y, mask, 0.99, 0.95),
        lambda x, y: rl.explained_variance(x, y, mask),
    ]
    for fn in fns:
        clean = jax.tree.leaves(fn(a, b))
        for bad_x, bad_y in ((np.inf, np.nan), (np.nan, -np.inf)):
            for c, d in zip(clean, jax.tree.leaves(fn(pad(a, bad_x), pad(b, bad_y)))):
                np.testing.assert_array_equal(d, c)
