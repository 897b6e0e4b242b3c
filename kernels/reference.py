"""Plain-jnp attention: the semantic reference every attention implementation in maxlm is tested against.

Dimension letters (gemma's legend): B batch, T query length, S key length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.

Masking follows packed-sequence training (T5 / MaxText "segment ids"): a query attends to a key only if
both carry the same non-zero segment id and, when causal, the key's slot is not after the query's. Segment
id 0 marks padding. During cached decoding the queries sit at slots `q_offset .. q_offset + T - 1` of a
cache of S slots, so causality compares slot indices, not positions (positions drive RoPE only). `q_offset`
is one slot for the whole batch (a left-padded batch) or one per row [B] (a slot cache, where every row is
a different request at its own length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large and finite, so masked logits never produce inf - inf = NaN in a running max.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, *, causal: bool,
                   q_offset: jax.Array | int = 0, window: int = 0) -> jax.Array:
    """Boolean [B, T, S]: True where query t may attend to key s. `window` > 0 (Mistral's sliding window,
    causal only) also requires the key to be one of the query's last `window` slots, itself included.
    `q_offset`: a scalar, or one offset per row [B]."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if causal:
        t = q_segment_ids.shape[1]
        s = kv_segment_ids.shape[1]
        offset = jnp.asarray(q_offset)
        offset = offset[:, None, None] if offset.ndim == 1 else offset  # [B,1,1] or a scalar
        q_slot = jnp.arange(t)[None, :, None] + offset
        kv_slot = jnp.arange(s)[None, None, :]
        mask = mask & (kv_slot <= q_slot)
        if window:
            mask = mask & (q_slot - kv_slot < window)
    elif window:
        raise ValueError("a sliding window needs causal attention")
    return mask


def mha_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
                  kv_segment_ids: jax.Array, causal: bool = True, q_offset: jax.Array | int = 0,
                  sm_scale: float | None = None, window: int = 0, softcap: float = 0.0) -> jax.Array:
    """Softmax attention with grouped-query heads, computed in float32. q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H].

    `sm_scale` multiplies the logits (default H^-0.5); `softcap` > 0 then bounds them smoothly to
    (-softcap, softcap) as softcap * tanh(logits / softcap), before masking (Gemma 2's attention logit
    soft-capping; Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size").

    K/V are never repeated: the query heads are viewed as [K, G] groups (GQA, Ainslie et al. 2023), which
    is the same head-to-kv-head assignment as Hugging Face's `repeat_kv` (query head n uses kv head n // G).
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    scale = sm_scale if sm_scale is not None else h ** -0.5
    qg = q.reshape(b, t, kv_heads, g, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = attention_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset, window=window)
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    # A query that sees no key at all (a padding slot) outputs zeros rather than an average of
    # everything: the convention of FlashAttention's variable-length kernels, and the one every
    # maxlm kernel follows.
    probs = jnp.where(mask[:, None, None], jax.nn.softmax(logits, axis=-1), 0.0).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)
