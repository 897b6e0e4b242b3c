"""Ring attention: context parallelism that never gathers the sequence's keys and values.

Legend as in `decoder.py`; P devices on the sequence axis, each holding t = T / P tokens as two chunks of
c = t / 2 (the tile size).

Each device keeps its queries and passes its K/V block round the ring with `ppermute`, P - 1 times; at every
step it attends its queries to the block it holds and folds the result into an online softmax (running max,
sum and output per query: Milakov & Gimelshein 2018; Liu et al. 2023, "Ring Attention with Blockwise
Transformers"). The next block's transfer is issued before the current block's computation, which does not
depend on it, so the two overlap. The backward pass (a custom VJP, as in FlashAttention-2) recomputes each
tile's probabilities from the saved log-sum-exp while the K/V block travels the ring again with its dK/dV
accumulators, which a last hop brings home: per device, memory is O(t) for K/V and O(c^2) for scores, where
all-gathered K/V cost O(T).

Token order (`mesh.sequence_order`). With the sequence cut in P contiguous shards, a causal mask gives the
last device P times the first one's work, and the ring waits for the slowest. The zigzag order (the one
Llama 3's context parallelism and ring-flash-attention use) cuts it into 2P chunks and gives device i
chunks i and 2P-1-i: every device then does the same work, 2P+1 tiles of c x c. The decoder permutes the
tokens into that order before the layers and back after them (`zigzag_permutation`); a tile is computed
only when the causal mask leaves something in it (`tile_needed`), so the balance is real work, not just
a count. Packed documents are masked exactly: a key is seen only within the query's segment, by slot.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kernels import reference

STRATEGIES = ("allgather", "ring")
ORDERS = ("zigzag", "contiguous")


@dataclasses.dataclass(frozen=True)
class Ring:
    """Ring attention over the sequence axis, tokens in the zigzag order or contiguous."""

    zigzag: bool = True


def from_config(config: ml_collections.ConfigDict) -> Ring | None:
    """`mesh.sequence_strategy=ring` of a full experiment config, or None (all-gathered K/V; a bare model
    section, which carries no mesh)."""
    if "mesh" not in config or config.mesh.get("sequence_strategy", "allgather") != "ring":
        return None
    return Ring(zigzag=config.mesh.sequence_order == "zigzag")


def chunk_ids(device: Any, devices: int, zigzag: bool) -> tuple[Any, Any]:
    """The two chunks (of 2P) a device holds: i and 2P-1-i (zigzag), or 2i and 2i+1 (contiguous)."""
    if zigzag:
        return device, 2 * devices - 1 - device
    return 2 * device, 2 * device + 1


def zigzag_permutation(length: int, devices: int) -> np.ndarray:
    """Token indices in the zigzag order: position j of the permuted sequence holds token perm[j], so that the
    contiguous shard of device i is chunks i and 2P-1-i."""
    c = length // (2 * devices)
    chunks = [chunk for i in range(devices) for chunk in chunk_ids(i, devices, True)]
    return np.concatenate([np.arange(c) + chunk * c for chunk in chunks])


def tile_needed(q_chunk: Any, kv_chunk: Any, causal: bool) -> Any:
    """Whether a c x c tile can hold an unmasked entry: under a causal mask only keys of an earlier or the
    same chunk."""
    return q_chunk >= kv_chunk if causal else True


def tiles_per_device(devices: int, zigzag: bool, causal: bool = True) -> list[int]:
    """The c x c tiles each device computes over a whole ring pass (the work `ring_attention` does)."""
    out = []
    for i in range(devices):
        q = chunk_ids(i, devices, zigzag)
        out.append(sum(bool(tile_needed(a, b, causal)) for j in range(devices) for a in q
                       for b in chunk_ids(j, devices, zigzag)))
    return out


def _tile_mask(q_seg, kv_seg, q_chunk, kv_chunk, c, causal, window):
    """[b, c, c] boolean mask of one tile: same non-zero segment, and causal / windowed by slot."""
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
    if causal:
        q_slot = q_chunk * c + jnp.arange(c)[:, None]
        kv_slot = kv_chunk * c + jnp.arange(c)[None, :]
        mask = mask & (kv_slot <= q_slot)[None]
        if window:
            mask = mask & (q_slot - kv_slot < window)[None]
    return mask


def _split(x):
    """[b, t, ...] -> the two chunks [2, b, c, ...]."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, 2, t // 2, *x.shape[2:]), 1, 0)


def _join(x):
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], 2 * x.shape[2], *x.shape[3:])


def _scores(q, k, q_seg, kv_seg, q_chunk, kv_chunk, c, causal, window, scale):
    """One tile: q [b,c,K,G,H] against k [b,c,K,H] -> (float32 logits [b,K,G,c,c], its mask [b,c,c])."""
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return logits, _tile_mask(q_seg, kv_seg, q_chunk, kv_chunk, c, causal, window)


def _held(block, step, me, devices, zigzag):
    """The K/V block this device holds at ring step `step` (device me - step's): (its two chunk ids, k, v and
    segment ids split into the chunks)."""
    k, v, seg = block
    return chunk_ids((me - step) % devices, devices, zigzag), _split(k), _split(v), _split(seg)


def _each_tile(q_chunks, kv_chunks, causal, update, state):
    """`update(a, j, state) -> state` for each of the 2 x 2 tiles (query chunk a, key chunk j) that the causal
    mask leaves something in; `lax.cond` skips the others' work."""
    for a in range(2):
        for j in range(2):
            state = jax.lax.cond(tile_needed(q_chunks[a], kv_chunks[j], causal), functools.partial(update, a, j),
                                 lambda st: st, state)
    return state


def _forward(q, k, v, q_seg, kv_seg, axis, devices, zigzag, causal, scale, window):
    """Per device: q [b,t,N,H], k/v [b,t,K,H] -> (out [b,t,N,H], log-sum-exp [2,b,K,G,c])."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g, c = n // kh, t // 2
    me = jax.lax.axis_index(axis)
    qs = _split(q.reshape(b, t, kh, g, h))
    q_segs = _split(q_seg)
    q_chunks = chunk_ids(me, devices, zigzag)
    perm = [(i, (i + 1) % devices) for i in range(devices)]
    m = jnp.full((2, b, kh, g, c), reference.MASK_VALUE, jnp.float32)
    l = jnp.zeros((2, b, kh, g, c), jnp.float32)
    acc = jnp.zeros((2, b, kh, g, c, h), jnp.float32)

    def step(s, carry):
        block, m, l, acc = carry
        nxt = jax.lax.ppermute(block, axis, perm) if devices > 1 else block  # overlaps the tiles below
        kv_chunks, ks, vs, kv_segs = _held(block, s, me, devices, zigzag)

        def tile(a, j, state):
            m, l, acc = state
            logits, mask = _scores(qs[a], ks[j], q_segs[a], kv_segs[j], q_chunks[a], kv_chunks[j], c, causal,
                                   window, scale)
            logits = jnp.where(mask[:, None, None], logits, reference.MASK_VALUE)
            m_new = jnp.maximum(m[a], jnp.max(logits, axis=-1))
            p = jnp.where(mask[:, None, None], jnp.exp(logits - m_new[..., None]), 0.0)
            alpha = jnp.exp(m[a] - m_new)
            pv = jnp.einsum("BKGTS,BSKH->BKGTH", p, vs[j].astype(jnp.float32))
            return (m.at[a].set(m_new), l.at[a].set(alpha * l[a] + jnp.sum(p, axis=-1)),
                    acc.at[a].set(alpha[..., None] * acc[a] + pv))

        return (nxt, *_each_tile(q_chunks, kv_chunks, causal, tile, (m, l, acc)))

    _, m, l, acc = jax.lax.fori_loop(0, devices, step, ((k, v, kv_seg), m, l, acc))
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # a query with no key (padding) gives 0, as the reference
    lse = m + jnp.log(jnp.maximum(l, 1e-30))
    out = jnp.moveaxis(out, -2, 2)  # [2,b,c,K,G,H]
    return _join(out).reshape(b, t, n, h).astype(q.dtype), lse


def _backward(res, d_out, axis, devices, zigzag, causal, scale, window):
    q, k, v, q_seg, kv_seg, out, lse = res
    b, t, n, h = q.shape
    kh = k.shape[2]
    g, c = n // kh, t // 2
    me = jax.lax.axis_index(axis)
    qs = _split(q.reshape(b, t, kh, g, h))
    dos = _split(d_out.reshape(b, t, kh, g, h).astype(jnp.float32))
    delta = jnp.sum(dos * _split(out.reshape(b, t, kh, g, h).astype(jnp.float32)), axis=-1)  # [2,b,c,K,G]
    delta = jnp.moveaxis(delta, 2, -1)  # [2,b,K,G,c]
    q_segs = _split(q_seg)
    q_chunks = chunk_ids(me, devices, zigzag)
    perm = [(i, (i + 1) % devices) for i in range(devices)]
    dq = jnp.zeros((2, b, c, kh, g, h), jnp.float32)

    def step(s, carry):
        block, (dk, dv), dq = carry
        kv_chunks, ks, vs, kv_segs = _held(block, s, me, devices, zigzag)

        def tile(a, j, state):
            dq, dk, dv = state
            logits, mask = _scores(qs[a], ks[j], q_segs[a], kv_segs[j], q_chunks[a], kv_chunks[j], c, causal,
                                   window, scale)
            p = jnp.where(mask[:, None, None], jnp.exp(logits - lse[a][..., None]), 0.0)
            dp = jnp.einsum("BTKGH,BSKH->BKGTS", dos[a], vs[j].astype(jnp.float32))
            ds = p * (dp - delta[a][..., None]) * scale
            return (dq.at[a].add(jnp.einsum("BKGTS,BSKH->BTKGH", ds, ks[j].astype(jnp.float32))),
                    dk.at[j].add(jnp.einsum("BKGTS,BTKGH->BSKH", ds, qs[a].astype(jnp.float32))),
                    dv.at[j].add(jnp.einsum("BKGTS,BTKGH->BSKH", p, dos[a])))

        dq, dk, dv = _each_tile(q_chunks, kv_chunks, causal, tile, (dq, dk, dv))
        # The block moves on with its gradients; after P hops (the last one below) they are home.
        moved = jax.lax.ppermute((block, (dk, dv)), axis, perm) if devices > 1 else (block, (dk, dv))
        return moved[0], moved[1], dq

    zeros = jnp.zeros((2, b, c, kh, h), jnp.float32)
    _, (dk, dv), dq = jax.lax.fori_loop(0, devices, step, ((k, v, kv_seg), (zeros, zeros), dq))
    dq = _join(dq).reshape(b, t, n, h).astype(q.dtype)
    return dq, _join(dk).astype(k.dtype), _join(dv).astype(v.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def ring_attention(q, k, v, q_seg, kv_seg, axis, devices, zigzag, causal, scale, window):
    """Inside `shard_map` over the sequence axis `axis` of `devices` devices: this device's queries
    q [b,t,N,H] against every device's k/v [b,t,K,H] (segment ids [b,t]) -> [b,t,N,H]. Tokens are laid out
    zigzag or contiguous (`chunk_ids`); slots are global token indices, so causality and packed documents are
    masked exactly as `kernels.reference.mha_reference` masks the whole sequence."""
    return _forward(q, k, v, q_seg, kv_seg, axis, devices, zigzag, causal, scale, window)[0]


def _ring_fwd(q, k, v, q_seg, kv_seg, axis, devices, zigzag, causal, scale, window):
    out, lse = _forward(q, k, v, q_seg, kv_seg, axis, devices, zigzag, causal, scale, window)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _ring_bwd(axis, devices, zigzag, causal, scale, window, res, d_out):
    return _backward(res, d_out, axis, devices, zigzag, causal, scale, window)


ring_attention.defvjp(_ring_fwd, _ring_bwd)
