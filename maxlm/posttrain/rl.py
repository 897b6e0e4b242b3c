"""The pure math of PPO for RLHF: KL-penalised rewards, GAE, clipped surrogate losses, the adaptive KL coefficient.

RLHF fine-tunes a policy (the SFT model) against a reward model with PPO while a per-token KL penalty to a
frozen reference policy keeps it from drifting into text the reward model scores well but nobody wrote
(Ziegler et al. 2019, "Fine-tuning language models from human preferences"; Ouyang et al. 2022,
InstructGPT). The conventions follow trlX and "The N implementation details of RLHF with PPO" (Huang et al.
2024): the reward model's score is added at the last response token, the KL term is the k1 estimator
log pi - log pi_ref at every token, advantages come from generalised advantage estimation (Schulman et al.
2016) and the value head is trained with a clipped loss like the policy (Schulman et al. 2017). The KL
coefficient is either fixed or driven towards a target KL by Ziegler et al.'s proportional controller.

Keeping the math here, apart from sampling and the training loop, makes every formula testable against a
plain loop. Every function is pure, jit-compatible and computes in float32. Shapes: B batch, T response
length. `mask` [B,T] (float or bool) is 1 on real response tokens and 0 on padding, and every row is a
contiguous prefix (possibly empty). Functions that take a mask return exactly 0 at masked-out positions and
select with `jnp.where`, so their results do not depend on the values there (not even inf or NaN).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _bool(mask) -> Array:
    return jnp.asarray(mask) != 0


def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """sum(x * mask) over `axis` (all axes when None); masked-out entries are selected away, not multiplied."""
    return jnp.sum(jnp.where(_bool(mask), _f32(x), 0.0), axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """sum(x * mask) / max(sum(mask), 1) over `axis`; 0 where the mask is empty."""
    count = jnp.sum(_bool(mask), axis=axis).astype(jnp.float32)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance of all masked entries: sum((x - mean)^2 * mask) / n, times n / (n - 1) when unbiased and n > 1."""
    m = _bool(mask)
    n = jnp.sum(m).astype(jnp.float32)
    centered = jnp.where(m, _f32(x) - masked_mean(x, mask), 0.0)
    var = jnp.sum(jnp.square(centered)) / jnp.maximum(n, 1.0)
    if unbiased:
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1.0, 1.0), 1.0)
    return var


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """(x - mean) * rsqrt(var + eps) over all masked entries (unbiased var); + mean if not shift_mean; 0 off-mask."""
    mean = masked_mean(x, mask)
    out = (_f32(x) - mean) * jax.lax.rsqrt(masked_var(x, mask, unbiased=True) + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(_bool(mask), out, 0.0)


def logprobs_from_logits(logits: Array, tokens: Array) -> Array:
    """log_softmax(logits)[b, t, tokens[b, t]]: logits [B,T,V], tokens [B,T] -> [B,T] float32."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy_from_logits(logits: Array) -> Array:
    """-sum_v p_v log p_v with p = softmax(logits): [B,T,V] -> [B,T] float32 (terms with p_v = 0 count 0)."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def kl_penalized_rewards(scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array,
                         beta: float | Array) -> tuple[Array, Array]:
    """kl = (logprobs - ref_logprobs) * mask (k1, per token); rewards = -beta * kl + scores[b] at row b's last token.

    scores [B] are the reward model's sequence scores; a row with an empty mask gets no score. Returns
    (rewards [B,T], kl [B,T]), both 0 outside the mask.
    """
    m = _bool(mask)
    kl = jnp.where(m, _f32(logprobs) - _f32(ref_logprobs), 0.0)
    length = jnp.sum(m, axis=-1)
    last = jnp.arange(m.shape[-1])[None, :] == (length - 1)[:, None]
    rewards = -_f32(beta) * kl + jnp.where(last, _f32(scores)[:, None], 0.0)
    return jnp.where(m, rewards, 0.0), kl


def gae(rewards: Array, values: Array, mask: Array, gamma: float | Array,
        lam: float | Array) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2016), right to left over the response.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t and A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}, with
    V_T = A_T = 0: the step after the last real token is terminal. returns = A + V. Returns (advantages,
    returns) [B,T], 0 outside the mask, under stop_gradient (PPO treats them as constants).
    """
    m = _bool(mask)
    r = jnp.where(m, _f32(rewards), 0.0).T
    v = jnp.where(m, _f32(values), 0.0).T
    mf = m.astype(jnp.float32).T
    gamma, lam = _f32(gamma), _f32(lam)

    def step(carry, xs):
        next_v, next_a, next_m = carry
        r_t, v_t, m_t = xs
        a_t = r_t + gamma * next_v * next_m - v_t + gamma * lam * next_m * next_a
        return (v_t, a_t, m_t), a_t

    zeros = jnp.zeros(r.shape[1:], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros, zeros), (r, v, mf), reverse=True)
    adv = jnp.where(m, adv.T, 0.0)
    returns = jnp.where(m, adv + v.T, 0.0)
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(returns)


def policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array,
                clip_eps: float | Array) -> tuple[Array, Array]:
    """PPO's clipped surrogate per token: ratio = exp(logprobs - old_logprobs),
    loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)); clipped = 1.0 where the clipped term is strictly larger.

    Not masked: padding positions hold whatever their inputs give (possibly inf), so the caller reduces with
    `masked_mean` / `masked_sum`, which select them away.
    """
    ratio = jnp.exp(_f32(logprobs) - _f32(old_logprobs))
    adv = _f32(advantages)
    unclipped = -adv * ratio
    clipped_term = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return jnp.maximum(unclipped, clipped_term), (clipped_term > unclipped).astype(jnp.float32)


def value_loss(values: Array, old_values: Array, returns: Array,
               clip_range: float | Array) -> tuple[Array, Array]:
    """Clipped value loss per token: v_clip = old + clip(values - old, -c, c),
    loss = 0.5 * max((values - R)^2, (v_clip - R)^2); clipped = 1.0 where the clipped error is strictly larger.

    Not masked: the caller reduces with `masked_mean` / `masked_sum`.
    """
    values, old_values, returns = _f32(values), _f32(old_values), _f32(returns)
    v_clip = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
    err = jnp.square(values - returns)
    err_clip = jnp.square(v_clip - returns)
    return 0.5 * jnp.maximum(err, err_clip), (err_clip > err).astype(jnp.float32)


def approx_kl(logprobs: Array, old_logprobs: Array) -> Array:
    """k3 estimator of KL(old || new) per token (Schulman, "Approximating KL divergence"): (ratio - 1) - log ratio.

    Non-negative and unbiased for samples from the old policy; not masked.
    """
    log_ratio = _f32(logprobs) - _f32(old_logprobs)
    return jnp.expm1(log_ratio) - log_ratio


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    """1 - var(returns - values) / var(returns) over masked entries (biased var); 0 when var(returns) == 0."""
    var_y = masked_var(returns, mask, unbiased=False)
    var_res = masked_var(_f32(returns) - _f32(values), mask, unbiased=False)
    return jnp.where(var_y > 0, 1.0 - var_res / jnp.where(var_y > 0, var_y, 1.0), 0.0)


def update_kl_coef(beta: float | Array, kl: float | Array, n_steps: int | Array, target: float | Array | None,
                   horizon: float | Array) -> float | Array:
    """Ziegler et al.'s adaptive KL controller: err = clip(kl / target - 1, -0.2, 0.2),
    beta * (1 + err * n_steps / horizon).

    With target None or <= 0 the coefficient is fixed and `beta` comes back unchanged. All-Python-number
    arguments give a Python float; any jax argument gives a jax scalar (jit-compatible, target may be traced).
    """
    if target is None:
        return beta
    args = (beta, kl, n_steps, target, horizon)
    if all(isinstance(a, numbers.Real) for a in args):
        if target <= 0:
            return beta
        err = min(max(kl / target - 1.0, -0.2), 0.2)
        return beta * (1.0 + err * n_steps / horizon)
    target = _f32(target)
    on = target > 0
    err = jnp.clip(_f32(kl) / jnp.where(on, target, 1.0) - 1.0, -0.2, 0.2)
    new = _f32(beta) * (1.0 + err * _f32(n_steps) / _f32(horizon))
    return jnp.where(on, new, _f32(beta))
