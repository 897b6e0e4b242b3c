"""Flash attention for GPUs: Pallas kernels lowered through Triton (FlashAttention-2, Dao 2023).

Layout is the model's own, q [B,T,N,H] and k/v [B,S,K,H]: a program owns one (query tile, batch, head)
and streams key tiles through an inner loop, so K/V for a kv head are read by each of its G query heads
straight from the [B,S,K,H] array (`index_map` picks head n // G) and never repeated in memory.

The forward keeps the online-softmax state (running max m, normaliser l, accumulator) in registers and
writes the output plus the per-row log-sum-exp. The backward recomputes the probabilities from that
log-sum-exp tile by tile (no [T,S] matrix is ever stored) in two kernels, as FlashAttention-2 does:
one owns a key tile and accumulates dK/dV over every query tile of every query head in its group (so
GQA needs no atomics), the other owns a query tile and accumulates dQ. Loops are split at the causal
diagonal: tiles above it are never visited, tiles below it skip the mask.

Why Triton and not Mosaic GPU: the Triton lowering runs on every jax this project supports (0.10 and
0.11, where it is deprecated but present) with one kernel body that the CPU interpreter also runs, so CI
tests exactly the code a GPU compiles. A Hopper-specific Mosaic GPU kernel (wgmma, TMA, warp
specialisation) is the next step for speed (README, "Not in this version").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels import blocks
from kernels.reference import MASK_VALUE

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims=None):
    if dims is None:
        dims = (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _params(num_warps: int, num_stages: int):
    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _fwd_kernel(off_ref, *refs, causal, sm_scale, block_k, num_kv_blocks, has_seg, window=0):
    if has_seg:
        q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    i, q_offset = pl.program_id(0), off_ref[0]
    block_q, head_dim = q_ref.shape
    q = q_ref[...]
    q_seg = qseg_ref[...][:, None] if has_seg else None

    def body(j, carry, masked):
        m, l, acc = carry
        keys = pl.ds(j * block_k, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = _dot(q, k, _NT) * sm_scale  # [bq, bk]
        if masked:
            kv_seg = kvseg_ref[keys][None, :] if has_seg else None
            mask = blocks.tile_mask(q_offset + i * block_q, j * block_k, s.shape, causal=causal, q_seg=q_seg,
                                    kv_seg=kv_seg, window=window)
            s = s if mask is None else jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + p.sum(axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    carry = (jnp.full((block_q,), MASK_VALUE, jnp.float32), jnp.zeros((block_q,), jnp.float32),
             jnp.zeros((block_q, head_dim), jnp.float32))
    full, touched = blocks.kv_ranges(i, block_q, block_k, num_kv_blocks, causal=causal,
                                     masked_everywhere=has_seg, q_offset=q_offset)
    if window:  # key tiles left of the window are skipped; the rest take the mask
        full = blocks.window_kv_start(i, block_q, block_k, window, q_offset)
    else:
        carry = lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(full, touched, functools.partial(body, masked=True), carry)
    m, l, acc = carry
    out, lse = blocks.finalize(m[:, None], l[:, None], acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


_OFFSET = pl.BlockSpec((1,), lambda *_: (0,))


def forward(q, k, v, q_seg, kv_seg, q_offset, *, causal: bool, sm_scale: float, block_q: int, block_k: int,
            num_warps: int, num_stages: int, interpret: bool, window: int = 0):
    """o [B,T,N,H] and lse [B,N,T] (float32). T and S must be multiples of the blocks; q_offset int32[1]."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    has_seg = q_seg is not None
    grid = (t // block_q, b, n)
    in_specs = [_OFFSET, pl.BlockSpec((None, block_q, None, h), lambda i, bi, ni: (bi, i, ni, 0)),
                pl.BlockSpec((None, s, None, h), lambda i, bi, ni: (bi, 0, blocks.div(ni, g), 0)),
                pl.BlockSpec((None, s, None, h), lambda i, bi, ni: (bi, 0, blocks.div(ni, g), 0))]
    args = [q_offset, q, k, v]
    if has_seg:
        in_specs += [pl.BlockSpec((None, block_q), lambda i, bi, ni: (bi, i)),
                     pl.BlockSpec((None, s), lambda i, bi, ni: (bi, 0))]
        args += [q_seg, kv_seg]
    kernel = functools.partial(_fwd_kernel, causal=causal, sm_scale=sm_scale, block_k=block_k,
                               num_kv_blocks=s // block_k, has_seg=has_seg, window=window)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, block_q, None, h), lambda i, bi, ni: (bi, i, ni, 0)),
                   pl.BlockSpec((None, None, block_q), lambda i, bi, ni: (bi, ni, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=_params(num_warps, num_stages), interpret=interpret, name="flash_fwd",
    )(*args)


def _dkdv_kernel(off_ref, *refs, causal, sm_scale, block_q, num_q_blocks, group, has_seg, window=0):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    j, kv_head, q_offset = pl.program_id(0), pl.program_id(2), off_ref[0]
    block_k, head_dim = k_ref.shape
    k, v = k_ref[...], v_ref[...]
    kv_seg = kvseg_ref[...][None, :] if has_seg else None

    def body(i, carry, head, masked):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, head, :], do_ref[rows, head, :]
        lse, delta = lse_ref[head, rows], delta_ref[head, rows]
        s = _dot(q, k, _NT) * sm_scale  # [bq, bk]
        if masked:
            q_seg = qseg_ref[rows][:, None] if has_seg else None
            mask = blocks.tile_mask(q_offset + i * block_q, j * block_k, s.shape, causal=causal, q_seg=q_seg,
                                    kv_seg=kv_seg, window=window)
            s = s if mask is None else jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, _TN)
        dp = _dot(do, v, _NT)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, _TN)
        return dk, dv

    start, full = blocks.q_ranges(j, block_q, block_k, num_q_blocks, causal=causal, masked_everywhere=has_seg,
                                  q_offset=q_offset)

    if window:  # query tiles past the window of this key tile's last key are skipped
        full = end = blocks.window_q_end(j, block_q, block_k, num_q_blocks, window, q_offset)
    else:
        end = num_q_blocks

    def per_head(gi, carry):
        head = kv_head * group + gi
        carry = lax.fori_loop(start, full, functools.partial(body, head=head, masked=True), carry)
        return lax.fori_loop(full, end, functools.partial(body, head=head, masked=False), carry)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, group, per_head, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(off_ref, *refs, causal, sm_scale, block_k, num_kv_blocks, has_seg, window=0):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    i, q_offset = pl.program_id(0), off_ref[0]
    block_q, head_dim = q_ref.shape
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = qseg_ref[...][:, None] if has_seg else None

    def body(j, dq, masked):
        keys = pl.ds(j * block_k, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = _dot(q, k, _NT) * sm_scale
        if masked:
            kv_seg = kvseg_ref[keys][None, :] if has_seg else None
            mask = blocks.tile_mask(q_offset + i * block_q, j * block_k, s.shape, causal=causal, q_seg=q_seg,
                                    kv_seg=kv_seg, window=window)
            s = s if mask is None else jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp(s - lse[:, None])
        dp = _dot(do, v, _NT)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    full, touched = blocks.kv_ranges(i, block_q, block_k, num_kv_blocks, causal=causal,
                                     masked_everywhere=has_seg, q_offset=q_offset)
    dq = jnp.zeros((block_q, head_dim), jnp.float32)
    if window:
        full = blocks.window_kv_start(i, block_q, block_k, window, q_offset)
    else:
        dq = lax.fori_loop(0, full, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(full, touched, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, q_offset, lse, delta, do, *, causal: bool, sm_scale: float, block_q: int,
             block_k: int, num_warps: int, num_stages: int, interpret: bool, window: int = 0):
    """dq, dk, dv from the saved log-sum-exp and delta = rowsum(dO * O), both [B,N,T] float32."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    has_seg = q_seg is not None
    params = _params(num_warps, num_stages)

    # dK, dV: one program per (key tile, batch, kv head); all of q, dO, lse, delta for the batch row.
    whole_q = pl.BlockSpec((None, t, n, h), lambda j, bi, ki: (bi, 0, 0, 0))
    whole_stat = pl.BlockSpec((None, n, t), lambda j, bi, ki: (bi, 0, 0))
    kv_tile = pl.BlockSpec((None, block_k, None, h), lambda j, bi, ki: (bi, j, ki, 0))
    in_specs = [_OFFSET, whole_q, kv_tile, kv_tile, whole_q, whole_stat, whole_stat]
    args = [q_offset, q, k, v, do, lse, delta]
    if has_seg:
        in_specs += [pl.BlockSpec((None, t), lambda j, bi, ki: (bi, 0)),
                     pl.BlockSpec((None, block_k), lambda j, bi, ki: (bi, j))]
        args += [q_seg, kv_seg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, causal=causal, sm_scale=sm_scale, block_q=block_q,
                          num_q_blocks=t // block_q, group=g, has_seg=has_seg, window=window),
        grid=(s // block_k, b, kv_heads), in_specs=in_specs, out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="flash_bwd_dkdv",
    )(*args)

    # dQ: one program per (query tile, batch, query head), streaming the key tiles.
    q_tile = pl.BlockSpec((None, block_q, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    whole_kv = pl.BlockSpec((None, s, None, h), lambda i, bi, ni: (bi, 0, blocks.div(ni, g), 0))
    stat_tile = pl.BlockSpec((None, None, block_q), lambda i, bi, ni: (bi, ni, i))
    in_specs = [_OFFSET, q_tile, whole_kv, whole_kv, q_tile, stat_tile, stat_tile]
    args = [q_offset, q, k, v, do, lse, delta]
    if has_seg:
        in_specs += [pl.BlockSpec((None, block_q), lambda i, bi, ni: (bi, i)),
                     pl.BlockSpec((None, s), lambda i, bi, ni: (bi, 0))]
        args += [q_seg, kv_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, causal=causal, sm_scale=sm_scale, block_k=block_k,
                          num_kv_blocks=s // block_k, has_seg=has_seg, window=window),
        grid=(t // block_q, b, n), in_specs=in_specs, out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="flash_bwd_dq",
    )(*args)
    return dq, dk, dv
