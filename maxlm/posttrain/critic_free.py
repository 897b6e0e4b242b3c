"""The pure math of critic-free policy optimisation: group-relative advantages, loss aggregation, the
asymmetrically clipped surrogate, KL estimators, DAPO's overlong penalty and dynamic sampling.

PPO (`maxlm.posttrain.rl`) needs a value network as large as the policy to give every token a baseline.
Critic-free methods drop it: each prompt is sampled G times and a response's baseline comes from the other
responses to the same prompt, so the advantage of a sequence is its reward relative to its group's, one
number per sequence broadcast over its tokens. The variants here:

- GRPO (Shao et al. 2024, "DeepSeekMath"): advantage (r - group mean) / (group std + eps), a per-token
  k3 KL penalty to a reference policy, and each sequence's loss averaged over its tokens before averaging
  over sequences.
- Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"): drops the std
  division (it up-weights prompts that are too easy or too hard) and the per-sequence length normalisation
  (it favours long wrong answers), dividing every sequence's token sum by one constant, the generation budget.
- RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs"; Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"): the
  baseline of each sample is the mean reward of the other G - 1, an unbiased leave-one-out baseline.
- DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"): "clip-higher"
  (a wider upper clip bound than lower), a token-level mean over the whole batch, a soft penalty for
  over-long responses, and dynamic sampling: groups whose rewards are all equal have zero advantage and no
  gradient, so they are dropped and more groups are drawn until the batch is full.

Conventions follow `maxlm.posttrain.rl`: every jax function is pure, jit-compatible (integer and string
arguments are static) and computes in float32. Rewards arrive as [B] with B = n_groups * G and consecutive
rows forming a group (row i is in group i // G). `mask` [B,T] (float or bool) is 1 on real response tokens,
every row a contiguous prefix (possibly empty); functions that take a mask select with `jnp.where`, so
nothing leaks from masked-out positions (not even inf or NaN). Dynamic sampling decides on the host which
rollouts to keep and is plain numpy.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.posttrain import rl

Array = jax.Array

AdvantageEstimator = Callable[[Array, int, float], Array]
Aggregation = Callable[[Array, Array, int | None], Array]
AggregationSums = Callable[[Array, Array, int | None], tuple[Array, Array]]
KLEstimator = Callable[[Array, Array], Array]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}
LOSS_AGGREGATIONS: dict[str, Aggregation] = {}
AGGREGATION_SUMS: dict[str, AggregationSums] = {}
KL_ESTIMATORS: dict[str, KLEstimator] = {}


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(repr(k) for k in sorted(registry))}")
    return registry[name]


# ---- group-relative advantages ----

def register_advantage(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: registers an estimator (rewards [B], group_size, eps) -> advantages [B] under `name`."""
    def deco(fn: AdvantageEstimator) -> AdvantageEstimator:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn
    return deco


def _centered_groups(rewards: Array, group_size: int, min_size: int) -> Array:
    """rewards [B] -> r - group mean as [n_groups, G], float32.

    The mean is taken of r - r_first (r_first the group's first reward) and r_first added back: the shift
    makes a group of equal rewards centre to exactly 0 (no rounding from summing G copies of r).
    """
    r = rl._f32(rewards)
    if r.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {r.shape}")
    if group_size < min_size:
        raise ValueError(f"group_size must be >= {min_size}, got {group_size}")
    if r.shape[0] % group_size:
        raise ValueError(f"the batch of {r.shape[0]} rewards is not a whole number of groups of {group_size}")
    groups = r.reshape(-1, group_size)
    shifted = groups - groups[:, :1]
    return shifted - jnp.mean(shifted, axis=1, keepdims=True)


@register_advantage("grpo")
def grpo_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """GRPO: A_i = (r_i - mean_g r) / (std_g r + eps), std the unbiased sample std
    sqrt(sum_g (r - mean)^2 / (G - 1)) (DeepSeekMath; TRL's `torch.std`). Needs G >= 2.
    """
    centered = _centered_groups(rewards, group_size, 2)
    std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=1, keepdims=True) / (group_size - 1))
    return (centered / (std + eps)).reshape(-1)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """Dr. GRPO: A_i = r_i - mean_g r (no std division; `eps` is unused)."""
    return _centered_groups(rewards, group_size, 1).reshape(-1)


@register_advantage("rloo")
def rloo_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """RLOO: A_i = r_i - (sum_{j != i} r_j) / (G - 1) = G / (G - 1) * (r_i - mean_g r).

    Needs G >= 2; `eps` is unused.
    """
    centered = _centered_groups(rewards, group_size, 2)
    return (centered * (group_size / (group_size - 1))).reshape(-1)


def group_advantages(name: str, rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """ADVANTAGE_ESTIMATORS[name](rewards, group_size, eps): advantages [B] float32, one per sequence."""
    return _lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")(rewards, group_size, eps)


# ---- loss aggregation ----

def register_aggregation(name: str) -> Callable[[AggregationSums], AggregationSums]:
    """Decorator for a sums function (per_token_loss [B,T], mask [B,T], max_len) -> (loss_sum, weight).

    Registers it as AGGREGATION_SUMS[name] and the scalar aggregation loss_sum / max(weight, 1) as
    LOSS_AGGREGATIONS[name]. Weights are counts, so the scalar is loss_sum / weight, or 0 when weight is 0;
    and since loss_sum and weight are sums over rows, summing both over any split of the rows (micro-batches,
    hosts) before the one division gives the whole batch's aggregate.
    """
    def deco(sums_fn: AggregationSums) -> AggregationSums:
        def aggregation(per_token_loss: Array, mask: Array, max_len: int | None = None) -> Array:
            loss_sum, weight = sums_fn(per_token_loss, mask, max_len)
            return loss_sum / jnp.maximum(weight, 1.0)

        aggregation.__name__ = aggregation.__qualname__ = name
        aggregation.__doc__ = sums_fn.__doc__
        AGGREGATION_SUMS[name] = sums_fn
        LOSS_AGGREGATIONS[name] = aggregation
        return sums_fn
    return deco


@register_aggregation("token_mean")
def token_mean_sums(per_token_loss: Array, mask: Array, max_len: int | None = None) -> tuple[Array, Array]:
    """DAPO's token-level mean: sum_{b,t} m_bt l_bt / sum_{b,t} m_bt (0 without tokens).

    loss_sum = sum of the loss over all masked tokens, weight = number of masked tokens; `max_len` unused.
    """
    count = jnp.sum(rl._bool(mask)).astype(jnp.float32)
    return rl.masked_sum(per_token_loss, mask), count


@register_aggregation("seq_mean_token_mean")
def seq_mean_token_mean_sums(per_token_loss: Array, mask: Array,
                             max_len: int | None = None) -> tuple[Array, Array]:
    """GRPO's original: (1 / |N|) sum_{b in N} (sum_t m_bt l_bt / sum_t m_bt), N the rows with >= 1 token
    (empty rows are left out of the count; 0 when N is empty).

    loss_sum = sum over rows of the row's masked mean (0 for an empty row), weight = |N|; `max_len` unused.
    """
    nonempty = jnp.any(rl._bool(mask), axis=-1)
    row_means = rl.masked_mean(per_token_loss, mask, axis=-1)
    return jnp.sum(row_means), jnp.sum(nonempty).astype(jnp.float32)


@register_aggregation("seq_mean_token_sum")
def seq_mean_token_sum_sums(per_token_loss: Array, mask: Array,
                            max_len: int | None = None) -> tuple[Array, Array]:
    """Dr. GRPO: (1 / B) sum_b (sum_t m_bt l_bt) / max_len, over all B rows (empty ones included: the
    normaliser is a constant), max_len the generation budget, T by default.

    loss_sum = sum over rows of the row's masked sum / max_len, weight = B.
    """
    x = rl._f32(per_token_loss)
    if max_len is None:
        max_len = x.shape[-1]
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    return rl.masked_sum(x, mask) / max_len, jnp.float32(x.shape[0])


def aggregate(name: str, per_token_loss: Array, mask: Array, max_len: int | None = None) -> Array:
    """LOSS_AGGREGATIONS[name](per_token_loss, mask, max_len): a float32 scalar."""
    return _lookup(LOSS_AGGREGATIONS, name, "loss aggregation")(per_token_loss, mask, max_len)


def aggregate_sums(name: str, per_token_loss: Array, mask: Array,
                   max_len: int | None = None) -> tuple[Array, Array]:
    """(loss_sum, weight) of aggregation `name`, with aggregate(...) = loss_sum / max(weight, 1).

    For a loss split over micro-batches or hosts: add up loss_sum and weight over the parts and divide once;
    the result equals `aggregate` of the whole batch (pass the same `max_len` to every part).
    """
    return _lookup(AGGREGATION_SUMS, name, "loss aggregation")(per_token_loss, mask, max_len)


# ---- the clipped surrogate ----

def clipped_policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array, clip_low: float | Array,
                        clip_high: float | Array) -> tuple[Array, Array]:
    """DAPO's clip-higher surrogate per token: ratio = exp(logprobs - old_logprobs),
    loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)); clipped = 1.0 where the clipped
    term is strictly larger. With clip_low == clip_high it is PPO's `rl.policy_loss`.

    `advantages` is [B] (one per sequence, broadcast over T) or [B,T]. Returns (loss, clipped) [B,T]. Not
    masked: the caller reduces with `aggregate`, which selects padding away.
    """
    ratio = jnp.exp(rl._f32(logprobs) - rl._f32(old_logprobs))
    adv = rl._f32(advantages)
    if adv.ndim == 1 and ratio.ndim == 2:
        adv = adv[:, None]
    unclipped = -adv * ratio
    clipped_term = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped_term), (clipped_term > unclipped).astype(jnp.float32)


# ---- KL to the reference policy ----

def register_kl_estimator(name: str) -> Callable[[KLEstimator], KLEstimator]:
    """Decorator: registers a per-token estimator (logprobs, ref_logprobs) -> [B,T] under `name`."""
    def deco(fn: KLEstimator) -> KLEstimator:
        KL_ESTIMATORS[name] = fn
        return fn
    return deco


@register_kl_estimator("k1")
def kl_k1(logprobs: Array, ref_logprobs: Array) -> Array:
    """k1 = log pi - log pi_ref: unbiased for KL(pi || pi_ref), high variance, can be negative."""
    return rl._f32(logprobs) - rl._f32(ref_logprobs)


@register_kl_estimator("k2")
def kl_k2(logprobs: Array, ref_logprobs: Array) -> Array:
    """k2 = 0.5 * (log pi - log pi_ref)^2: biased, low variance, non-negative."""
    return 0.5 * jnp.square(rl._f32(logprobs) - rl._f32(ref_logprobs))


@register_kl_estimator("k3")
def kl_k3(logprobs: Array, ref_logprobs: Array) -> Array:
    """k3 = exp(d) - d - 1 with d = log pi_ref - log pi: unbiased, non-negative (GRPO's choice).

    It is `rl.approx_kl` with the reference in the place of the new policy.
    """
    return rl.approx_kl(ref_logprobs, logprobs)


def kl_penalty(logprobs: Array, ref_logprobs: Array, kind: str) -> Array:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman, "Approximating KL
    divergence"): KL_ESTIMATORS[kind] for kind in "k1", "k2", "k3". [B,T] float32, not masked.
    """
    return _lookup(KL_ESTIMATORS, kind, "KL estimator")(logprobs, ref_logprobs)


# ---- DAPO's overlong penalty ----

def overlong_penalty(lengths: Array, max_len: int, cache_len: int) -> Array:
    """DAPO's soft overlong punishment per response length L, with s = max_len - cache_len:
    0 if L <= s; (s - L) / cache_len if s < L <= max_len; -1 if L > max_len. [B] float32.

    The penalty falls linearly from 0 to -1 across the last `cache_len` tokens of the budget; cache_len 0
    leaves no soft zone (0 up to max_len, -1 beyond).
    """
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    length = jnp.asarray(lengths).astype(jnp.float32)
    soft_start = max_len - cache_len
    ramp = (soft_start - length) / max(cache_len, 1)
    return jnp.where(length <= soft_start, 0.0, jnp.where(length <= max_len, ramp, -1.0)).astype(jnp.float32)


# ---- DAPO's dynamic sampling (host side) ----

def informative_groups(rewards: np.ndarray, group_size: int, atol: float = 0.0) -> np.ndarray:
    """Which groups carry a learning signal: max_g r - min_g r > atol. rewards [n_groups * G] -> bool [n_groups].

    A group whose rewards are all equal gets zero advantage under every estimator here, hence no gradient.
    A group containing NaN counts as uninformative.
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards of shape {r.shape} are not a whole number of groups of {group_size}")
    groups = r.reshape(-1, group_size)
    return (groups.max(axis=1) - groups.min(axis=1)) > atol


def fill_groups(draw: Callable[[int], np.ndarray], needed: int, group_size: int, max_rounds: int,
                atol: float = 0.0) -> tuple[list[tuple[int, int]], dict]:
    """DAPO's dynamic sampling: draw rounds of groups until `needed` informative ones are collected.

    `draw(round)` for round = 0, 1, ... returns the rewards [k * G] of the k groups drawn in that round (k may
    vary). Informative groups (`informative_groups`) are kept in order, round by round, and the last round's
    informative groups beyond `needed` are discarded. Stops after `max_rounds` rounds even when short: no
    error, stats["filled"] says whether `needed` was reached.

    Returns (kept, stats): kept lists (round, group index within that round) of every kept group; stats has
    "rounds" (calls to draw), "drawn_groups", "kept_groups", "dropped_groups" (uninformative),
    "surplus_groups" (informative but beyond `needed`) and "filled"; drawn = kept + dropped + surplus.
    """
    if needed < 0 or max_rounds < 0:
        raise ValueError(f"needed and max_rounds must be >= 0, got {needed} and {max_rounds}")
    kept: list[tuple[int, int]] = []
    rounds = drawn = dropped = surplus = 0
    while len(kept) < needed and rounds < max_rounds:
        informative = informative_groups(draw(rounds), group_size, atol)
        drawn += len(informative)
        dropped += int(np.sum(~informative))
        for g in np.flatnonzero(informative):
            if len(kept) < needed:
                kept.append((rounds, int(g)))
            else:
                surplus += 1
        rounds += 1
    stats = {"rounds": rounds, "drawn_groups": drawn, "kept_groups": len(kept), "dropped_groups": dropped,
             "surplus_groups": surplus, "filled": len(kept) >= needed}
    return kept, stats
