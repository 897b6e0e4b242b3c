"""Flash attention for TPUs: Pallas kernels lowered through Mosaic TPU.

Same algorithm and semantics as `kernels/flash_gpu.py`, shaped for the TPU instead of for SMs:
- Heads-major layout [B,N,T,H] (the wrapper transposes), so every block's last two dims are a
  (sequence tile, head dim) matrix that maps onto the (sublane, lane) vector registers and the MXU.
- The key loop is the innermost grid dimension ("arbitrary"), not an in-kernel loop: Pallas TPU then
  double-buffers the next K/V tile's DMA behind the current tile's matmuls. The online-softmax state
  lives in VMEM scratch that persists across that dimension.
- Causal skipping: tiles above the diagonal do no compute (`pl.when`), and their `index_map` repeats
  the previous tile index, for which Pallas issues no new DMA, so they cost neither FLOPs nor bandwidth.
- Per-row statistics: m and l are kept lane-replicated ([block_q, 128]) as the VPU likes; the saved
  log-sum-exp and delta are rows [B,N,1,T], and the backward works on transposed tiles S^T [bk, bq] so
  those rows broadcast without relayout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import blocks
from kernels.reference import MASK_VALUE

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_LANES = 128


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _heads_major(x):
    return jnp.swapaxes(x, 1, 2)


def _fwd_kernel(off_ref, *refs, causal, sm_scale, block_q, block_k, has_seg, window=0):
    if has_seg:
        q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    i, j, q_offset = pl.program_id(2), pl.program_id(3), off_ref[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _dot(q, k, _NT) * sm_scale  # [bq, bk]
        if masked:
            mask = blocks.tile_mask(q_offset + i * block_q, j * block_k, s.shape, causal=causal,
                                    q_seg=qseg_ref[...] if has_seg else None,
                                    kv_seg=kvseg_ref[...] if has_seg else None, window=window)
            s = s if mask is None else jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]  # [bq, 128], lane-replicated
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, :1])
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        m_sc[...] = m_next
        acc_sc[...] = acc_sc[...] * alpha[:, :1] + _dot(p.astype(v.dtype), v)

    _guarded(step, i, j, q_offset, causal=causal, has_seg=has_seg, block_q=block_q, block_k=block_k, window=window)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        out, lse = blocks.finalize(m_sc[...][:, :1], l_sc[...][:, :1], acc_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_wide = jnp.broadcast_to(lse, (block_q, _LANES))
        lse_ref[...] = lse_wide.T[:1, :]


def _kv_index(i, j, off_ref, *, block_q, block_k, causal, window=0):
    """Key tile to fetch at grid step (i, j): above the diagonal, repeat the last visible one; left of a
    sliding window, fetch its first one (the same tile for every skipped step: no new DMA)."""
    if not causal:
        return j
    j = jnp.minimum(j, blocks.div(off_ref[0] + i * block_q + block_q - 1, block_k))
    return jnp.maximum(j, blocks.window_kv_start(i, block_q, block_k, window, off_ref[0])) if window else j


def _q_index(i, j, off_ref, *, block_q, block_k, causal, num_q_blocks, window=0):
    """Query tile to fetch at (key tile j, step i): before the first visible one, fetch that one; past a
    sliding window's last, that last one."""
    if not causal:
        return i
    start, _ = blocks.q_blocks_for_kv(j, block_q, block_k, num_q_blocks, off_ref[0])
    i = jnp.maximum(i, start)
    if window:
        end = blocks.window_q_end(j, block_q, block_k, num_q_blocks, window, off_ref[0])
        i = jnp.minimum(i, jnp.maximum(end - 1, start))
    return jnp.minimum(i, num_q_blocks - 1)


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _pairs(b: int, n: int, t: int, s: int, causal: bool, window: int) -> int:
    """Query-key pairs the kernels compute (about: whole tiles on the diagonal count in full)."""
    seen = min(window, s) if window else s
    return b * n * t * seen // (2 if causal and not window else 1)


def _cost(pairs: int, h: int, matmuls: int, *arrays) -> pl.CostEstimate:
    """What a kernel costs, for XLA's scheduler and cost analysis (a custom call is otherwise free to it):
    `matmuls` [T,S]x[S,H]-sized products per pair (2 FLOPs per multiply-add), one exp per pair, and the
    bytes of the arrays it reads and writes once."""
    return pl.CostEstimate(flops=2 * matmuls * pairs * h, transcendentals=pairs,
                           bytes_accessed=sum(x.size * x.dtype.itemsize for x in arrays))


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch_shapes, semantics, interpret, name, cost=None):
    """pallas_call with the query offset as a scalar-prefetch operand: it lands in SMEM before the grid
    runs, so index maps (which choose the tiles to DMA) can read it as well as the kernel."""
    spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                        out_specs=out_specs, scratch_shapes=scratch_shapes)
    return pl.pallas_call(kernel, grid_spec=spec, out_shape=out_shape, compiler_params=_params(*semantics),
                          interpret=interpret, name=name, cost_estimate=cost)


def forward(q, k, v, q_seg, kv_seg, q_offset, *, causal: bool, sm_scale: float, block_q: int, block_k: int,
            interpret: bool, window: int = 0, **_):
    """o [B,T,N,H] and lse [B,N,T] float32; q/k/v arrive in the model layout and leave in it."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    has_seg = q_seg is not None
    kvi = functools.partial(_kv_index, block_q=block_q, block_k=block_k, causal=causal, window=window)
    q_tile = pl.BlockSpec((None, None, block_q, h), lambda bi, ni, i, j, off: (bi, ni, i, 0))
    kv_tile = pl.BlockSpec((None, None, block_k, h),
                           lambda bi, ni, i, j, off: (bi, blocks.div(ni, g), kvi(i, j, off), 0))
    in_specs = [q_tile, kv_tile, kv_tile]
    args = [_heads_major(q), _heads_major(k), _heads_major(v)]
    if has_seg:
        in_specs += [pl.BlockSpec((None, block_q, 1), lambda bi, ni, i, j, off: (bi, i, 0)),
                     pl.BlockSpec((None, 1, block_k), lambda bi, ni, i, j, off: (bi, 0, kvi(i, j, off)))]
        args += [q_seg[:, :, None], kv_seg[:, None, :]]
    out, lse = _call(
        functools.partial(_fwd_kernel, causal=causal, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                          has_seg=has_seg, window=window),
        grid=(b, n, t // block_q, s // block_k), in_specs=in_specs,
        out_specs=[q_tile, pl.BlockSpec((None, None, 1, block_q), lambda bi, ni, i, j, off: (bi, ni, 0, i))],
        out_shape=[jax.ShapeDtypeStruct((b, n, t, h), q.dtype), jax.ShapeDtypeStruct((b, n, 1, t), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((block_q, _LANES), jnp.float32), pltpu.VMEM((block_q, _LANES), jnp.float32),
                        pltpu.VMEM((block_q, h), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"), interpret=interpret, name="flash_fwd",
        cost=_cost(_pairs(b, n, t, s, causal, window), h, 2, q, k, v, q),
    )(q_offset, *args)
    return _heads_major(out), lse[:, :, 0, :]


def _transposed_tile(q_ref, k_ref, qseg_ref, kvseg_ref, q_start, j, *, causal, masked, sm_scale, has_seg,
                     window=0):
    """S^T = K Q^T for one tile, [bk, bq], masked where needed."""
    q, k = q_ref[...], k_ref[...]
    s_t = _dot(k, q, _NT) * sm_scale
    if masked:
        block_k = s_t.shape[0]
        mask = blocks.tile_mask(q_start, j * block_k, s_t.shape, causal=causal, transposed=True,
                                q_seg=qseg_ref[...] if has_seg else None,
                                kv_seg=kvseg_ref[...] if has_seg else None, window=window)
        s_t = s_t if mask is None else jnp.where(mask, s_t, MASK_VALUE)
    return s_t


def _guarded(step, i, j, q_offset, *, causal, has_seg, block_q, block_k, window=0):
    """Run step(masked) only on visible tiles, with the mask only where the tile needs it."""
    if not causal:
        step(has_seg)
        return
    visible, diagonal = blocks.tile_kind(i, j, block_q, block_k, q_offset, window)
    needs_mask = visible if has_seg else visible & diagonal
    pl.when(needs_mask)(lambda: step(True))
    pl.when(visible & jnp.logical_not(needs_mask))(lambda: step(False))


def _dkdv_kernel(off_ref, *refs, causal, sm_scale, block_q, block_k, has_seg, window=0):
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref,
         dk_ref, dv_ref, dk_sc, dv_sc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
        qseg_ref = kvseg_ref = None
    j, gi, i, q_offset = pl.program_id(2), pl.program_id(3), pl.program_id(4), off_ref[0]

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        s_t = _transposed_tile(q_ref, k_ref, qseg_ref, kvseg_ref, q_offset + i * block_q, j, causal=causal, masked=masked,
                               sm_scale=sm_scale, has_seg=has_seg, window=window)
        p_t = jnp.exp(s_t - lse_ref[...])  # [bk, bq] - [1, bq]
        do = do_ref[...]
        dv_sc[...] += _dot(p_t.astype(do.dtype), do)
        dp_t = _dot(v_ref[...], do, _NT)
        ds_t = p_t * (dp_t - delta_ref[...])
        dk_sc[...] += _dot(ds_t.astype(q_ref.dtype), q_ref[...])

    _guarded(step, i, j, q_offset, causal=causal, has_seg=has_seg, block_q=block_q, block_k=block_k, window=window)

    @pl.when((gi == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(off_ref, *refs, causal, sm_scale, block_q, block_k, has_seg, window=0):
    if has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, dq_ref, dq_sc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
        qseg_ref = kvseg_ref = None
    i, j, q_offset = pl.program_id(2), pl.program_id(3), off_ref[0]

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        s_t = _transposed_tile(q_ref, k_ref, qseg_ref, kvseg_ref, q_offset + i * block_q, j, causal=causal, masked=masked,
                               sm_scale=sm_scale, has_seg=has_seg, window=window)
        p_t = jnp.exp(s_t - lse_ref[...])
        dp_t = _dot(v_ref[...], do_ref[...], _NT)
        ds_t = p_t * (dp_t - delta_ref[...])
        k = k_ref[...]
        dq_sc[...] += _dot(ds_t.T.astype(k.dtype), k)

    _guarded(step, i, j, q_offset, causal=causal, has_seg=has_seg, block_q=block_q, block_k=block_k, window=window)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * sm_scale).astype(dq_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, q_offset, lse, delta, do, *, causal: bool, sm_scale: float, block_q: int,
             block_k: int, interpret: bool, window: int = 0, **_):
    """dq, dk, dv in the model layout from lse and delta [B,N,T] float32."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    has_seg = q_seg is not None
    qh, kh, vh, doh = (_heads_major(x) for x in (q, k, v, do))
    pairs = _pairs(b, n, t, s, causal, window)
    lse_rows, delta_rows = lse[:, :, None, :], delta[:, :, None, :]
    qi = functools.partial(_q_index, block_q=block_q, block_k=block_k, causal=causal, num_q_blocks=t // block_q,
                           window=window)
    kvi = functools.partial(_kv_index, block_q=block_q, block_k=block_k, causal=causal, window=window)

    # dK, dV: grid (batch, kv head, key tile, query head in group, query tile); the last two accumulate.
    q_tile = pl.BlockSpec((None, None, block_q, h),
                          lambda bi, ki, j, gi, i, off: (bi, ki * g + gi, qi(i, j, off), 0))
    row_tile = pl.BlockSpec((None, None, 1, block_q),
                            lambda bi, ki, j, gi, i, off: (bi, ki * g + gi, 0, qi(i, j, off)))
    kv_tile = pl.BlockSpec((None, None, block_k, h), lambda bi, ki, j, gi, i, off: (bi, ki, j, 0))
    in_specs = [q_tile, kv_tile, kv_tile, q_tile, row_tile, row_tile]
    args = [qh, kh, vh, doh, lse_rows, delta_rows]
    if has_seg:
        in_specs += [pl.BlockSpec((None, 1, block_q), lambda bi, ki, j, gi, i, off: (bi, 0, qi(i, j, off))),
                     pl.BlockSpec((None, block_k, 1), lambda bi, ki, j, gi, i, off: (bi, j, 0))]
        args += [q_seg[:, None, :], kv_seg[:, :, None]]
    dk, dv = _call(
        functools.partial(_dkdv_kernel, causal=causal, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                          has_seg=has_seg, window=window),
        grid=(b, kv_heads, s // block_k, g, t // block_q), in_specs=in_specs, out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((block_k, h), jnp.float32), pltpu.VMEM((block_k, h), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), interpret=interpret,
        name="flash_bwd_dkdv", cost=_cost(pairs, h, 4, q, k, v, do, k, v),
    )(q_offset, *args)

    # dQ: grid (batch, query head, query tile, key tile); the key tiles accumulate.
    q_tile = pl.BlockSpec((None, None, block_q, h), lambda bi, ni, i, j, off: (bi, ni, i, 0))
    row_tile = pl.BlockSpec((None, None, 1, block_q), lambda bi, ni, i, j, off: (bi, ni, 0, i))
    kv_tile = pl.BlockSpec((None, None, block_k, h),
                           lambda bi, ni, i, j, off: (bi, blocks.div(ni, g), kvi(i, j, off), 0))
    in_specs = [q_tile, kv_tile, kv_tile, q_tile, row_tile, row_tile]
    args = [qh, kh, vh, doh, lse_rows, delta_rows]
    if has_seg:
        in_specs += [pl.BlockSpec((None, 1, block_q), lambda bi, ni, i, j, off: (bi, 0, i)),
                     pl.BlockSpec((None, block_k, 1), lambda bi, ni, i, j, off: (bi, kvi(i, j, off), 0))]
        args += [q_seg[:, None, :], kv_seg[:, :, None]]
    dq = _call(
        functools.partial(_dq_kernel, causal=causal, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                          has_seg=has_seg, window=window),
        grid=(b, n, t // block_q, s // block_k), in_specs=in_specs, out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((block_q, h), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"), interpret=interpret, name="flash_bwd_dq",
        cost=_cost(pairs, h, 3, q, k, v, do, q),
    )(q_offset, *args)
    return _heads_major(dq), _heads_major(dk), _heads_major(dv)
