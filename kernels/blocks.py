"""Block bookkeeping shared by the GPU and TPU flash-attention kernels.

A kernel walks a [T, S] score matrix in tiles of `block_q` query rows by `block_k` key columns. Under a
causal mask (key slot <= query slot, query t sitting at slot q_offset + t as in `kernels/reference.py`;
q_offset is a traced scalar, e.g. a sequence shard's start) a tile is one of three kinds:
above the diagonal (every entry masked: skipped, never loaded), on it (needs the elementwise mask), or
below it (no mask at all). The helpers below give those ranges as traced integers, so a kernel's loop
bounds or `pl.when` guards encode "no wasted work above the diagonal" (FlashAttention-2, Dao 2023, §3.1).
Conservative rounding is allowed only towards "masked": a tile classed as diagonal but fully visible costs
a few selects, never a wrong answer.

A sliding window of W slots (Mistral: query slot q sees keys q - W + 1 .. q) adds a second diagonal below
the first: tiles wholly left of it are skipped like those above the causal one (`window_kv_start`,
`window_q_end`), so attention costs O(T W) instead of O(T^2); tiles the window edge crosses take the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels.reference import MASK_VALUE

# The log-sum-exp written for a query that sees no key at all (pure padding): large and finite, so that
# exp(s - lse) underflows to exactly 0 in the backward pass and such rows contribute no gradient.
LSE_NO_KEYS = -MASK_VALUE


def div(a, b: int):
    """a // b for non-negative traced ints, as a truncating divide (Mosaic lowers `//` through `sign`,
    which it can only do for a known TPU generation; truncation is exact for a >= 0 anyway)."""
    return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def kv_blocks_for_q(i, block_q: int, block_k: int, num_kv_blocks: int, q_offset=0):
    """For query tile i (query slots from q_offset + i * block_q): (#key tiles fully visible, #key tiles
    touched at all) under a causal mask."""
    first_row = q_offset + i * block_q
    last_row = first_row + block_q - 1
    touched = jnp.minimum(div(last_row, block_k) + 1, num_kv_blocks)
    full = jnp.minimum(div(first_row, block_k), touched)
    return full, touched


def q_blocks_for_kv(j, block_q: int, block_k: int, num_q_blocks: int, q_offset=0):
    """For key tile j: (first query tile that sees it, first query tile that sees all of it), causal."""
    first_key = j * block_k - q_offset  # key slots relative to the first query's slot
    last_key = first_key + block_k - 1
    start = jnp.minimum(div(jnp.maximum(first_key, 0), block_q), num_q_blocks)
    full = jnp.minimum(div(jnp.maximum(last_key, 0) + block_q - 1, block_q), num_q_blocks)
    return start, jnp.maximum(full, start)


def window_kv_start(i, block_q: int, block_k: int, window: int, q_offset=0):
    """The first key tile query tile i sees under a sliding window (its first row sees back to slot
    first_row - window + 1)."""
    first_row = q_offset + i * block_q
    return div(jnp.maximum(first_row - window + 1, 0), block_k)


def window_q_end(j, block_q: int, block_k: int, num_q_blocks: int, window: int, q_offset=0):
    """One past the last query tile that sees key tile j under a sliding window (query slots up to its
    last key + window - 1)."""
    last = j * block_k + block_k - 1 + window - 1 - q_offset  # relative to the first query's slot
    return jnp.where(last < 0, 0, jnp.minimum(div(jnp.maximum(last, 0), block_q) + 1, num_q_blocks))


def kv_ranges(i, block_q: int, block_k: int, num_kv_blocks: int, *, causal: bool, masked_everywhere: bool,
              q_offset=0):
    """Loop bounds over key tiles for query tile i: tiles [0, full) need no mask, [full, touched) do,
    the rest are skipped. With segment ids every visited tile needs the mask."""
    if causal:
        full, touched = kv_blocks_for_q(i, block_q, block_k, num_kv_blocks, q_offset)
    else:
        full, touched = num_kv_blocks, num_kv_blocks
    return (0 if masked_everywhere else full), touched


def q_ranges(j, block_q: int, block_k: int, num_q_blocks: int, *, causal: bool, masked_everywhere: bool,
             q_offset=0):
    """Loop bounds over query tiles for key tile j: tiles before `start` are skipped, [start, full) need
    the mask, [full, num_q_blocks) do not."""
    if causal:
        start, full = q_blocks_for_kv(j, block_q, block_k, num_q_blocks, q_offset)
    else:
        start, full = 0, 0
    return start, (num_q_blocks if masked_everywhere else full)


def tile_kind(i, j, block_q: int, block_k: int, q_offset=0, window: int = 0):
    """(visible, needs the mask) for tile (query tile i, key tile j) under a causal mask: it crosses the
    diagonal, or, with a sliding window, the window's edge."""
    first_row = q_offset + i * block_q
    last_row = first_row + block_q - 1
    visible = j * block_k <= last_row
    diagonal = (j + 1) * block_k - 1 > first_row
    if window:
        visible = visible & (first_row - ((j + 1) * block_k - 1) < window)  # its last key reaches a row
        diagonal = diagonal | (last_row - j * block_k >= window)  # some row is past its first key's window
    return visible, diagonal


def tile_mask(q_start, k_start, shape: tuple[int, int], *, causal: bool, q_seg=None, kv_seg=None,
              transposed: bool = False, window: int = 0) -> jax.Array | None:
    """Boolean visibility of one tile. Normal layout is [block_q, block_k]; `transposed` gives
    [block_k, block_q] (the layout the TPU backward works in, so per-query statistics broadcast as rows).
    `q_seg` / `kv_seg` must already be shaped to broadcast against the tile (column or row vectors).
    Segment id 0 marks padding keys, which nobody attends to."""
    q_axis, k_axis = (1, 0) if transposed else (0, 1)
    mask = None
    if causal:
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
        mask = k_pos <= q_pos
        if window:
            mask = mask & (q_pos - k_pos < window)
    if q_seg is not None:
        seg = (q_seg == kv_seg) & (kv_seg != 0)
        mask = seg if mask is None else mask & seg
    return mask


def finalize(m: jax.Array, l: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Online-softmax epilogue: output acc / l and log-sum-exp m + log l; a row that saw no visible key
    (its running max never left MASK_VALUE) outputs 0 and LSE_NO_KEYS, matching the reference."""
    seen = m > 0.5 * MASK_VALUE
    safe_l = jnp.where(seen, l, 1.0)
    out = jnp.where(seen, acc / safe_l, 0.0)
    lse = jnp.where(seen, m + jnp.log(safe_l), LSE_NO_KEYS)
    return out, lse
