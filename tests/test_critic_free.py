"""Critic-free policy-optimisation math in `maxlm.posttrain.critic_free`, against independent numpy oracles
written here as plain loops in float64.

Token-level rows have mask lengths (7, 3, 0, 5, 1): a full row, an empty row and partial ones. Masked-out
positions are filled with large junk (and inf / NaN) to check that nothing leaks from them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.posttrain import critic_free as cf
from maxlm.posttrain import rl
from tests import helpers

T = 7
LENGTHS = (7, 3, 0, 5, 1)
B = len(LENGTHS)
JUNK = 1e6
TOL = dict(rtol=1e-5, atol=1e-5)
ESTIMATORS = ("grpo", "dr_grpo", "rloo")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
KINDS = ("k1", "k2", "k3")


def _mask(dtype=np.float32):
    return helpers.ragged_mask(LENGTHS, T, dtype)


def _rand(seed, shape=(B, T), scale=1.0):
    return helpers.normal_f32(seed, shape, scale)


def _junk(x, mask, seed=99):
    return helpers.with_junk(x, mask, seed, JUNK)


def _rewards(group_size, seed=0):
    """Four groups: random normal, 0/1 outcomes (both present), all equal, and a single outlier."""
    rng = np.random.default_rng(seed)
    binary = np.zeros(group_size)
    binary[::2] = 1.0
    outlier = np.full(group_size, 1 / 3)
    outlier[-1] = 2.0
    groups = [rng.normal(size=group_size), binary, np.full(group_size, 0.1), outlier]
    return np.concatenate(groups).astype(np.float32)


# ---- numpy oracles (loops, float64) ----

def _adv_ref(name, rewards, group_size, eps=1e-6):
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        mean = sum(group) / group_size
        for i, r in enumerate(group):
            if name == "grpo":
                std = math.sqrt(sum((x - mean) ** 2 for x in group) / (group_size - 1))
                out[start + i] = (r - mean) / (std + eps)
            elif name == "dr_grpo":
                out[start + i] = r - mean
            else:
                others = [x for j, x in enumerate(group) if j != i]
                out[start + i] = r - sum(others) / len(others)
    return out


def _agg_ref(name, x, mask, max_len=None):
    rows = [[float(x[b, t]) for t in range(x.shape[1]) if mask[b, t]] for b in range(x.shape[0])]
    if name == "token_mean":
        tokens = [v for row in rows for v in row]
        return sum(tokens) / len(tokens) if tokens else 0.0
    if name == "seq_mean_token_mean":
        means = [sum(row) / len(row) for row in rows if row]
        return sum(means) / len(means) if means else 0.0
    budget = x.shape[1] if max_len is None else max_len
    return sum(sum(row) / budget for row in rows) / len(rows)


def _clip_ref(lp, old, adv, low, high):
    loss, clipped = np.zeros(lp.shape), np.zeros(lp.shape)
    for i in np.ndindex(lp.shape):
        ratio = math.exp(float(lp[i]) - float(old[i]))
        a = float(adv[i])
        u, c = -a * ratio, -a * min(max(ratio, 1 - low), 1 + high)
        loss[i], clipped[i] = max(u, c), float(c > u)
    return loss, clipped


def _kl_ref(kind, lp, ref):
    out = np.zeros(lp.shape)
    for i in np.ndindex(lp.shape):
        log_r = float(ref[i]) - float(lp[i])  # log(pi_ref / pi)
        if kind == "k1":
            out[i] = -log_r
        elif kind == "k2":
            out[i] = 0.5 * log_r ** 2
        else:
            out[i] = math.exp(log_r) - log_r - 1
    return out


def _overlong_ref(lengths, max_len, cache_len):
    out = []
    for n in lengths:
        if n <= max_len - cache_len:
            out.append(0.0)
        elif n <= max_len:
            out.append((max_len - cache_len - n) / cache_len)
        else:
            out.append(-1.0)
    return out


# ---- advantages ----

@pytest.mark.parametrize("group_size", [2, 4, 5])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_advantages_match_loops(name, group_size):
    rewards = _rewards(group_size, seed=group_size)
    got = cf.ADVANTAGE_ESTIMATORS[name](rewards, group_size)
    assert got.dtype == jnp.float32 and got.shape == rewards.shape
    np.testing.assert_allclose(got, _adv_ref(name, rewards, group_size), **TOL)
    np.testing.assert_array_equal(cf.group_advantages(name, rewards, group_size), got)
    eps = 0.5
    np.testing.assert_allclose(cf.group_advantages(name, rewards, group_size, eps),
                               _adv_ref(name, rewards, group_size, eps), **TOL)


def test_advantages_hand_computed():
    r = np.array([0.0, 1.0, 0.0, 1.0, 3.0, 1.0], np.float32)  # G = 2: groups (0, 1), (0, 1), (3, 1)
    np.testing.assert_allclose(cf.group_advantages("dr_grpo", r, 2), [-0.5, 0.5, -0.5, 0.5, 1.0, -1.0], **TOL)
    np.testing.assert_allclose(cf.group_advantages("rloo", r, 2), [-1.0, 1.0, -1.0, 1.0, 2.0, -2.0], **TOL)
    # G = 2: unbiased std = |r1 - r0| / sqrt(2), so the advantages are +-1/sqrt(2).
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(cf.group_advantages("grpo", r, 2, eps=0.0), [-s, s, -s, s, s, -s], **TOL)
    r = np.array([0.0, 1.0, 0.0, 1.0], np.float32)  # G = 4: mean 0.5, unbiased std sqrt(1/3)
    np.testing.assert_allclose(cf.group_advantages("grpo", r, 4, eps=0.0), 0.5 * math.sqrt(3) * np.array(
        [-1, 1, -1, 1]), **TOL)
    np.testing.assert_allclose(cf.group_advantages("rloo", r, 4), [-2 / 3, 2 / 3, -2 / 3, 2 / 3], **TOL)


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_rloo_is_scaled_dr_grpo(group_size):
    rewards = _rand(1, (5 * group_size,), scale=2.0)
    dr = np.asarray(cf.group_advantages("dr_grpo", rewards, group_size), np.float64)
    np.testing.assert_allclose(cf.group_advantages("rloo", rewards, group_size),
                               group_size / (group_size - 1) * dr, **TOL)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_equal_rewards_give_zero_advantage(name):
    values = (0.1, 1 / 3, -7.3, 1e6 + 0.1, 0.0, 1.0)
    for g in (2, 3, 7):
        rewards = np.repeat(np.array(values, np.float32), g)
        np.testing.assert_array_equal(cf.group_advantages(name, rewards, g), np.zeros(len(rewards)))
    rewards = _rewards(4)
    got = np.asarray(cf.group_advantages(name, rewards, 4))
    np.testing.assert_array_equal(got[8:12], np.zeros(4))  # the all-0.1 group
    assert np.all(got[4:8] != 0)


def test_advantage_errors():
    r = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="'dr_grpo', 'grpo', 'rloo'"):
        cf.group_advantages("ppo", r, 2)
    with pytest.raises(ValueError, match="whole number of groups"):
        cf.group_advantages("grpo", r, 4)
    for name in ("grpo", "rloo"):
        with pytest.raises(ValueError, match=">= 2"):
            cf.group_advantages(name, r, 1)
    with pytest.raises(ValueError, match=r"\[B\]"):
        cf.group_advantages("dr_grpo", r.reshape(2, 3), 3)
    np.testing.assert_array_equal(cf.group_advantages("dr_grpo", _rand(2, (6,)), 1), np.zeros(6))
    assert set(cf.ADVANTAGE_ESTIMATORS) == set(ESTIMATORS)


# ---- loss aggregation ----

def test_aggregations_hand_computed():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], np.float32)
    np.testing.assert_allclose(cf.aggregate("token_mean", x, mask), 10 / 4, **TOL)
    np.testing.assert_allclose(cf.aggregate("seq_mean_token_mean", x, mask), (2 + 4) / 2, **TOL)
    np.testing.assert_allclose(cf.aggregate("seq_mean_token_sum", x, mask), (6 / 3 + 4 / 3) / 3, **TOL)
    np.testing.assert_allclose(cf.aggregate("seq_mean_token_sum", x, mask, max_len=10), (0.6 + 0.4) / 3, **TOL)


@pytest.mark.parametrize("mask_dtype", [np.float32, bool])
@pytest.mark.parametrize("name", AGGREGATIONS)
def test_aggregations_match_loops(name, mask_dtype):
    x, mask = _rand(3, scale=2.0), _mask(mask_dtype)
    got = cf.aggregate(name, x, mask)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, _agg_ref(name, x, mask), **TOL)
    np.testing.assert_array_equal(cf.LOSS_AGGREGATIONS[name](x, mask), got)
    np.testing.assert_allclose(cf.aggregate(name, x, mask, max_len=16), _agg_ref(name, x, mask, 16), **TOL)
    np.testing.assert_array_equal(cf.aggregate(name, _junk(x, _mask()), mask), got)
    for bad in (np.inf, -np.inf, np.nan):
        np.testing.assert_array_equal(cf.aggregate(name, np.where(_mask() > 0, x, bad), mask), got)
    assert float(cf.aggregate(name, _junk(x, _mask()), np.zeros((B, T), mask_dtype))) == 0.0


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_aggregate_sums_split_invariance(name):
    x, mask = _junk(_rand(4, scale=2.0), _mask()), _mask()
    whole = float(cf.aggregate(name, x, mask))
    loss_sum, weight = cf.aggregate_sums(name, x, mask)
    want_weight = {"token_mean": sum(LENGTHS), "seq_mean_token_mean": 4, "seq_mean_token_sum": B}[name]
    assert float(weight) == want_weight
    np.testing.assert_allclose(float(loss_sum) / float(weight), whole, **TOL)
    np.testing.assert_allclose(whole, _agg_ref(name, x, mask), **TOL)
    for split in ([(0, 2), (2, 3), (3, 5)], [(0, 1), (1, 4), (4, 5)], [(b, b + 1) for b in range(B)]):
        parts = [cf.aggregate_sums(name, x[lo:hi], mask[lo:hi]) for lo, hi in split]
        total = sum(float(s) for s, _ in parts) / sum(float(w) for _, w in parts)
        np.testing.assert_allclose(total, whole, **TOL)
    # The naive mean of the micro-batches' own aggregates is not the whole batch's: the sums are needed.
    naive = np.mean([float(cf.aggregate(name, x[lo:hi], mask[lo:hi])) for lo, hi in [(0, 2), (2, 3), (3, 5)]])
    assert abs(naive - whole) > 1e-3
    budget = 11
    parts = [cf.aggregate_sums(name, x[lo:hi], mask[lo:hi], budget) for lo, hi in [(0, 3), (3, 5)]]
    np.testing.assert_allclose(sum(float(s) for s, _ in parts) / sum(float(w) for _, w in parts),
                               _agg_ref(name, x, mask, budget), **TOL)


def test_aggregation_errors():
    x, mask = _rand(5), _mask()
    with pytest.raises(ValueError, match="'seq_mean_token_mean', 'seq_mean_token_sum', 'token_mean'"):
        cf.aggregate("sum", x, mask)
    with pytest.raises(ValueError, match="token_mean"):
        cf.aggregate_sums("sum", x, mask)
    with pytest.raises(ValueError, match="max_len"):
        cf.aggregate("seq_mean_token_sum", x, mask, max_len=0)
    assert set(cf.LOSS_AGGREGATIONS) == set(cf.AGGREGATION_SUMS) == set(AGGREGATIONS)


# ---- the clipped surrogate ----

# clip_low = 0.2, clip_high = 0.28: below 0.8, inside, between 1.2 and 1.28 (clipped only if symmetric), above.
RATIOS = (0.5, 0.79, 0.81, 1.0, 1.1, 1.25, 1.27, 1.3, 1.5)


def test_clipped_policy_loss_regions():
    low, high = 0.2, 0.28
    n = len(RATIOS)
    old = _rand(6, (2, n))
    lp = (old + np.log(np.array([RATIOS, RATIOS], np.float32))).astype(np.float32)
    adv = np.array([1.0, -1.0], np.float32)
    loss, clipped = map(np.asarray, cf.clipped_policy_loss(lp, old, adv, low, high))
    assert loss.shape == clipped.shape == (2, n) and loss.dtype == np.float32
    want_loss, want_clipped = _clip_ref(lp, old, np.repeat(adv[:, None], n, 1), low, high)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    np.testing.assert_array_equal(clipped, want_clipped)
    # A > 0 is clipped only above 1 + clip_high, A < 0 only below 1 - clip_low.
    np.testing.assert_array_equal(clipped, [[0, 0, 0, 0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(loss[0], [-0.5, -0.79, -0.81, -1.0, -1.1, -1.25, -1.27, -1.28, -1.28], **TOL)
    np.testing.assert_allclose(loss[1], [0.8, 0.8, 0.81, 1.0, 1.1, 1.25, 1.27, 1.3, 1.5], **TOL)
    full = cf.clipped_policy_loss(lp, old, np.repeat(adv[:, None], n, 1), low, high)
    np.testing.assert_array_equal(full[0], loss)
    np.testing.assert_array_equal(full[1], clipped)
    # symmetric bounds clip A > 0 from 1.2 on
    sym = np.asarray(cf.clipped_policy_loss(lp, old, adv, low, low)[1])
    np.testing.assert_array_equal(sym[0], [0, 0, 0, 0, 0, 1, 1, 1, 1])


def test_clipped_policy_loss_random():
    lp, old, adv = _rand(7, scale=0.3), _rand(8, scale=0.3), _rand(9)
    loss, clipped = cf.clipped_policy_loss(lp, old, adv, 0.1, 0.3)
    want_loss, want_clipped = _clip_ref(lp, old, adv, 0.1, 0.3)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    np.testing.assert_array_equal(clipped, want_clipped)
    assert 0 < float(np.mean(want_clipped)) < 1
    seq_adv = _rand(10, (B,))
    loss, clipped = cf.clipped_policy_loss(lp, old, seq_adv, 0.1, 0.3)
    want_loss, want_clipped = _clip_ref(lp, old, np.repeat(seq_adv[:, None], T, 1), 0.1, 0.3)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    np.testing.assert_array_equal(clipped, want_clipped)


def test_clipped_policy_loss_symmetric_is_ppo():
    lp, old, adv = _rand(11, scale=0.3), _rand(12, scale=0.3), _rand(13)
    for eps in (0.1, 0.2):
        got, want = cf.clipped_policy_loss(lp, old, adv, eps, eps), rl.policy_loss(lp, old, adv, eps)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert not np.array_equal(cf.clipped_policy_loss(lp, old, adv, 0.1, 0.3)[0], rl.policy_loss(lp, old, adv, 0.1)[0])


# ---- KL estimators ----

@pytest.mark.parametrize("kind", KINDS)
def test_kl_penalty_matches_loops(kind):
    lp, ref = _rand(14, scale=0.7), _rand(15, scale=0.7)
    got = np.asarray(cf.kl_penalty(lp, ref, kind))
    assert got.dtype == np.float32 and got.shape == (B, T)
    np.testing.assert_allclose(got, _kl_ref(kind, lp, ref), **TOL)
    np.testing.assert_array_equal(cf.KL_ESTIMATORS[kind](lp, ref), got)
    np.testing.assert_array_equal(cf.kl_penalty(lp, lp, kind), np.zeros((B, T)))
    if kind == "k1":
        assert np.any(got < 0) and np.any(got > 0)
    else:
        assert np.all(got >= 0)


def test_kl_estimators_are_kl_of_policy_from_reference():
    """Averaged over tokens sampled from pi, k1 and k3 estimate KL(pi || pi_ref), not KL(pi_ref || pi)."""
    p = np.array([0.7, 0.1, 0.1, 0.05, 0.05])
    q = np.array([0.1, 0.2, 0.3, 0.2, 0.2])
    kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    assert abs(kl_pq - kl_qp) > 0.2
    tokens = np.random.default_rng(16).choice(len(p), size=(200, 500), p=p)
    lp, ref = np.log(p)[tokens].astype(np.float32), np.log(q)[tokens].astype(np.float32)
    for kind in ("k1", "k3"):
        np.testing.assert_allclose(float(jnp.mean(cf.kl_penalty(lp, ref, kind))), kl_pq, atol=0.02)


def test_kl_errors():
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        cf.kl_penalty(_rand(17), _rand(18), "k4")
    assert set(cf.KL_ESTIMATORS) == set(KINDS)


# ---- overlong penalty ----

def test_overlong_penalty_boundaries():
    lengths = np.array([0, 15, 16, 17, 18, 19, 20, 21, 100], np.int32)
    got = np.asarray(cf.overlong_penalty(lengths, max_len=20, cache_len=4))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [0, 0, 0, -0.25, -0.5, -0.75, -1, -1, -1], **TOL)
    np.testing.assert_allclose(got, _overlong_ref(lengths, 20, 4), **TOL)
    np.testing.assert_array_equal(cf.overlong_penalty(np.array([19, 20, 21, 50]), 20, 0), [0, 0, -1, -1])
    np.testing.assert_allclose(cf.overlong_penalty(np.array([0, 5, 20, 21]), 20, 20), [0, -0.25, -1, -1], **TOL)
    lengths = np.random.default_rng(19).integers(0, 600, size=64)
    for max_len, cache_len in ((512, 128), (512, 1), (300, 0), (100, 37)):
        np.testing.assert_allclose(cf.overlong_penalty(lengths, max_len, cache_len),
                                   _overlong_ref(lengths, max_len, cache_len), **TOL)


def test_overlong_penalty_errors():
    with pytest.raises(ValueError, match="cache_len"):
        cf.overlong_penalty(np.array([1]), 10, 11)
    with pytest.raises(ValueError, match="cache_len"):
        cf.overlong_penalty(np.array([1]), 10, -1)


# ---- dynamic sampling ----

def test_informative_groups():
    rewards = np.array([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 2, 2, 2.001, np.nan, 1, 0], np.float64)
    np.testing.assert_array_equal(cf.informative_groups(rewards, 3), [False, True, False, True, False])
    np.testing.assert_array_equal(cf.informative_groups(rewards, 3, atol=0.01), [False, True, False, False, False])
    assert cf.informative_groups(rewards, 3).dtype == bool
    np.testing.assert_array_equal(cf.informative_groups(rewards[:12], 12), [True])
    np.testing.assert_array_equal(cf.informative_groups(rewards[:6], 1), [False] * 6)
    with pytest.raises(ValueError, match="whole number of groups"):
        cf.informative_groups(rewards, 4)


def _fake_draw(rounds, group_size):
    """draw(i) returns round i's rewards: each group all equal (0) or informative (0, ..., 0, 1)."""
    calls = []

    def draw(i):
        calls.append(i)
        groups = [np.eye(1, group_size, group_size - 1)[0] if flag else np.zeros(group_size) for flag in rounds[i]]
        return np.concatenate(groups)
    return draw, calls


ROUNDS = ([0, 1, 0, 1], [0, 0, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1])


def test_fill_groups():
    draw, calls = _fake_draw(ROUNDS, 3)
    kept, stats = cf.fill_groups(draw, needed=4, group_size=3, max_rounds=10)
    assert kept == [(0, 1), (0, 3), (1, 2), (2, 0)]
    assert calls == [0, 1, 2]
    assert stats == {"rounds": 3, "drawn_groups": 12, "kept_groups": 4, "dropped_groups": 6,
                     "surplus_groups": 2, "filled": True}


def test_fill_groups_short_and_edges():
    draw, calls = _fake_draw(ROUNDS, 2)
    kept, stats = cf.fill_groups(draw, needed=4, group_size=2, max_rounds=2)
    assert kept == [(0, 1), (0, 3), (1, 2)] and calls == [0, 1]
    assert stats == {"rounds": 2, "drawn_groups": 8, "kept_groups": 3, "dropped_groups": 5,
                     "surplus_groups": 0, "filled": False}
    draw, calls = _fake_draw(ROUNDS, 2)
    kept, stats = cf.fill_groups(draw, needed=2, group_size=2, max_rounds=5)
    assert kept == [(0, 1), (0, 3)] and calls == [0] and stats["filled"] and stats["surplus_groups"] == 0
    draw, calls = _fake_draw(ROUNDS, 2)
    assert cf.fill_groups(draw, needed=0, group_size=2, max_rounds=5) == (
        [], {"rounds": 0, "drawn_groups": 0, "kept_groups": 0, "dropped_groups": 0, "surplus_groups": 0,
             "filled": True})
    assert calls == []
    draw, _ = _fake_draw(([1], [0, 0, 1, 1, 1], [1, 0]), 2)  # rounds of different sizes
    kept, stats = cf.fill_groups(draw, needed=3, group_size=2, max_rounds=3)
    assert kept == [(0, 0), (1, 2), (1, 3)] and stats["drawn_groups"] == 6 and stats["surplus_groups"] == 1
    draw, _ = _fake_draw(ROUNDS, 2)
    with pytest.raises(ValueError):
        cf.fill_groups(draw, needed=-1, group_size=2, max_rounds=3)


# ---- jit ----

def test_everything_jits():
    mask, a, b, c = _mask(), _rand(20), _rand(21), _rand(22)
    rewards = _rewards(4)
    lengths = np.array([0, 15, 16, 17, 20, 21], np.int32)
    calls = [(lambda r, name=name: cf.group_advantages(name, r, 4), (rewards,), _adv_ref(name, rewards, 4))
             for name in ESTIMATORS]
    calls += [(lambda x, m, name=name: cf.aggregate(name, x, m), (a, mask), _agg_ref(name, a, mask))
              for name in AGGREGATIONS]
    calls += [(lambda x, m, name=name: cf.aggregate_sums(name, x, m, 9), (a, mask), None) for name in AGGREGATIONS]
    calls += [(lambda x, y, kind=kind: cf.kl_penalty(x, y, kind), (a, b), _kl_ref(kind, a, b)) for kind in KINDS]
    calls += [
        (lambda x, y, z: cf.clipped_policy_loss(x, y, z, 0.2, 0.28), (a * 0.3, b * 0.3, c),
         _clip_ref(a * 0.3, b * 0.3, c, 0.2, 0.28)),
        (lambda x, y, z, lo, hi: cf.clipped_policy_loss(x, y, z, lo, hi), (a * 0.3, b * 0.3, c[:, 0], 0.2, 0.28),
         None),
        (lambda n: cf.overlong_penalty(n, 20, 4), (lengths,), _overlong_ref(lengths, 20, 4)),
    ]
    for fn, args, want in calls:
        eager, jitted = fn(*args), jax.jit(fn)(*args)
        for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            np.testing.assert_allclose(j, e, rtol=1e-5, atol=1e-6)
        if want is not None:
            for w, j in zip(want if isinstance(want, tuple) else (want,), jax.tree.leaves(jitted)):
                np.testing.assert_allclose(j, w, **TOL)
