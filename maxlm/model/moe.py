"""A mixture-of-experts feed-forward layer: a softmax top-k router over E gated MLPs (Mixtral, Qwen3-MoE).

Legend as in `decoder.py`, plus E experts, k experts per token (`model.experts_per_token`), F the experts'
hidden size (`model.expert_mlp_dim`, else `model.mlp_dim`), M = B*T*k token-expert assignments, C an expert's
capacity.

Routing (Shazeer et al. 2017; Fedus et al. 2022, "Switch Transformers"; Jiang et al. 2024, "Mixtral of
Experts"): router logits x W_r [B,T,E] in float32, softmax over E, the k largest probabilities and their
experts; `model.router_renormalize` rescales the k weights to sum to 1 (Mixtral always; Qwen3-MoE's
`norm_topk_prob`). The layer's output is sum_k w_k expert_{i_k}(x), each expert SwiGLU (or GeGLU) as the
dense MLP.

Two ways to compute the experts (`model.moe_impl`):
- `dropless` (MegaBlocks, Gale et al. 2023): the M assignments sorted by expert and multiplied as one grouped
  matmul (`jax.lax.ragged_dot`, group sizes = tokens per expert). Every token reaches its k experts however
  unbalanced the router is; work is exactly M rows.
- `capacity` (GShard, Lepikhin et al. 2021): each expert takes at most C = ceil(capacity_factor * M / E)
  assignments, first choices before second ones, in token order; the rest are dropped (their weight is lost,
  the residual carries the token). Dispatch and combine are one-hot einsums over fixed [E, C] buffers, shapes
  that never depend on the routing, which is what lets an `expert` mesh axis shard them.

The two auxiliary losses, per layer and averaged over layers (the Switch Transformer's per-layer form;
Hugging Face's `load_balancing_loss_func` pools the layers' tokens first, which agrees for one layer):
- load balance: E * sum_e f_e P_e, f_e = the assignments to expert e per token, P_e = the mean router
  probability of e; with balanced assignments (every f_e = k/E) it is k, whatever the probabilities. Weighted by
  `model.router_aux_coef`.
- router z-loss (Zoph et al. 2022, ST-MoE): the mean of logsumexp(logits)^2, which keeps logits small;
  `model.router_z_coef`.
Padding tokens (segment id 0) count in neither. `dropped` is the fraction of assignments the capacity path
dropped (0 for dropless).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from maxlm.model import quant

MOE_IMPLS = ("dropless", "capacity")

_init = nn.initializers.normal


def expert_dim(cfg: ml_collections.ConfigDict) -> int:
    """F of each expert: `model.expert_mlp_dim`, or `model.mlp_dim` when that is 0."""
    return cfg.expert_mlp_dim or cfg.mlp_dim


def route(logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 router logits [..., E] -> (probabilities [..., E], top-k weights [..., k], top-k experts [..., k])."""
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts


def stat_sums(logits: jax.Array, probs: jax.Array, experts: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """One layer's router statistics over the real tokens (`mask` [B,T], true for real ones) as sums, which add
    up across micro-batches (a pipeline's) to the whole batch's: assignments and router probabilities per
    expert [E], the z-loss numerator, the real tokens, and the assignments an expert kept (all, here: the
    capacity path sets its own). `losses` turns them into the losses."""
    e = probs.shape[-1]
    m = mask.astype(jnp.float32)
    assigned = jnp.einsum("BTE,BT->E", jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32), axis=-2), m)
    return {"assigned": assigned, "prob": jnp.einsum("BTE,BT->E", probs, m),
            "z": jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * m), "tokens": jnp.sum(m), "kept": jnp.sum(assigned)}


def losses(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`stat_sums` (of one layer; leading axes broadcast) -> load_balance = E sum_e f_e P_e, z_loss, dropped."""
    n = jnp.maximum(sums["tokens"], 1.0)[..., None]
    e = sums["assigned"].shape[-1]
    f, p = sums["assigned"] / n, sums["prob"] / n
    total = jnp.sum(sums["assigned"], axis=-1)
    return {"load_balance": e * jnp.sum(f * p, axis=-1), "z_loss": sums["z"] / n[..., 0],
            "dropped": (total - sums["kept"]) / jnp.maximum(total, 1.0)}


def aux_stats(logits: jax.Array, probs: jax.Array, experts: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """One layer's load-balance and z losses over the real tokens (`mask` [B,T], true for real ones)."""
    found = losses(stat_sums(logits, probs, experts, mask))
    return {"load_balance": found["load_balance"], "z_loss": found["z_loss"]}


def dropless(x: jax.Array, weights: jax.Array, experts: jax.Array, expert_fn: Callable[[jax.Array, jax.Array],
             jax.Array], num_experts: int) -> jax.Array:
    """x [N,D], weights / experts [N,k] -> [N,D]: every assignment computed, grouped by expert.

    `expert_fn(rows [M,D] sorted by expert, group_sizes [E]) -> [M,D]` applies expert e to its rows."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert, token order within a group
    token = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    out = expert_fn(x[token], group_sizes)
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros_like(x).at[token].add(out.astype(x.dtype))


def capacity(num_assignments: int, num_experts: int, factor: float) -> int:
    """C = ceil(factor * M / E), at least 1."""
    return max(1, math.ceil(factor * num_assignments / num_experts))


def dispatch_masks(weights: jax.Array, experts: jax.Array, num_experts: int, cap: int
                   ) -> tuple[jax.Array, jax.Array]:
    """weights / experts [N,k] -> (dispatch [N,E,C] one-hot, combine [N,E,C] = dispatch * weight), GShard's
    priority: every token's first choice takes a slot before any second choice; within a choice, token order."""
    n, k = experts.shape
    choice_major = jax.nn.one_hot(experts.T, num_experts, dtype=jnp.int32)  # [k,N,E]
    position = jnp.cumsum(choice_major.reshape(k * n, num_experts), axis=0).reshape(k, n, num_experts) - 1
    slot = jnp.sum(position * choice_major, axis=-1)  # [k,N]: the slot within its expert
    kept = slot < cap
    onehot_slot = jax.nn.one_hot(jnp.where(kept, slot, cap), cap, dtype=weights.dtype)  # dropped: all zeros
    dispatch = jnp.einsum("KNE,KNC->NEC", choice_major.astype(weights.dtype), onehot_slot)
    combine = jnp.einsum("KNE,KNC,NK->NEC", choice_major.astype(weights.dtype), onehot_slot, weights)
    return dispatch, combine


class MoE(nn.Module):
    """The experts' layer in place of the dense MLP: x [B,T,D], mask [B,T] -> (y [B,T,D], the layer's
    `stat_sums`)."""

    cfg: ml_collections.ConfigDict
    activation: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        e, k, d, f = cfg.num_experts, cfg.experts_per_token, cfg.d_model, expert_dim(cfg)
        winit = _init(cfg.init_std)
        router = self.param("router", nn.with_logical_partitioning(winit, ("embed", "exp")), (d, e), pdt)
        gate = self.param("gate", nn.with_logical_partitioning(winit, ("exp", "embed", "mlp")), (e, d, f), pdt)
        up = self.param("up", nn.with_logical_partitioning(winit, ("exp", "embed", "mlp")), (e, d, f), pdt)
        down = self.param("down", nn.with_logical_partitioning(winit, ("exp", "mlp", "embed")), (e, f, d), pdt)
        b, t, _ = x.shape
        logits = jnp.einsum("BTD,DE->BTE", x.astype(jnp.float32), router.astype(jnp.float32))
        probs, weights, experts = route(logits, k, cfg.router_renormalize)
        stats = stat_sums(logits, probs, experts, mask)
        act = self.activation
        if cfg.moe_impl == "dropless":
            def expert_fn(rows: jax.Array, sizes: jax.Array) -> jax.Array:
                hidden = (act(jax.lax.ragged_dot(rows, quant.dequantize(gate, dt), sizes))
                          * jax.lax.ragged_dot(rows, quant.dequantize(up, dt), sizes))
                return jax.lax.ragged_dot(hidden, quant.dequantize(down, dt), sizes)

            y = dropless(x.reshape(b * t, d), weights.reshape(b * t, k), experts.reshape(b * t, k), expert_fn, e)
        else:
            cap = capacity(b * t * k, e, cfg.capacity_factor)
            dispatch, combine = dispatch_masks(weights.reshape(b * t, k), experts.reshape(b * t, k), e, cap)
            dispatch = nn.with_logical_constraint(dispatch, (None, "activation_exp", None))
            routed = jnp.einsum("ND,NEC->ECD", x.reshape(b * t, d), dispatch.astype(dt))
            routed = nn.with_logical_constraint(routed, ("activation_exp", None, "activation_embed"))
            hidden = (act(jnp.einsum("ECD,EDF->ECF", routed, quant.dequantize(gate, dt)))
                      * jnp.einsum("ECD,EDF->ECF", routed, quant.dequantize(up, dt)))
            hidden = nn.with_logical_constraint(hidden, ("activation_exp", None, "activation_mlp"))
            out = jnp.einsum("ECF,EFD->ECD", hidden, quant.dequantize(down, dt))
            y = jnp.einsum("ECD,NEC->ND", out, combine.astype(dt))
            real = mask.reshape(-1).astype(jnp.float32)
            kept = jnp.sum(dispatch, axis=(1, 2)).astype(jnp.float32)  # [N]: 0..k assignments kept
            stats["kept"] = jnp.sum(kept * real)
        return y.reshape(b, t, d).astype(x.dtype), stats


def mean_over_layers(sums: Any) -> dict[str, jax.Array]:
    """Per-layer `stat_sums` stacked by the layer scan ([L] leading axes) -> each loss's mean over layers."""
    return {name: jnp.mean(value) for name, value in losses(sums).items()}
