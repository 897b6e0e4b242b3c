"""`flash_attention`: the one public entry point to maxlm's Pallas attention kernels.

Exact softmax attention in O(T) memory (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023):
the forward streams key tiles through an online softmax and saves only the output and the per-row
log-sum-exp; the backward (a `jax.custom_vjp`) recomputes each probability tile from that log-sum-exp.
Semantics are those of `kernels.reference.mha_reference`, which the tests hold every lowering to:
grouped-query heads (query head n reads kv head n // G, K/V never repeated), causal masking over slots
(query t sits at slot q_offset + t, key s at slot s), packed-sequence segment ids (0 = padding), and a
query that sees no key outputs zeros. A traced `q_offset` is what lets a sequence-parallel shard run its
queries against the gathered keys of the whole sequence.

Two lowerings share those semantics: `backend="gpu"` (Pallas -> Triton, `kernels/flash_gpu.py`) and
`backend="tpu"` (Pallas -> Mosaic TPU, `kernels/flash_tpu.py`). On a CPU the same call runs the chosen
kernel in the Pallas interpreter (`interpret=True`), which is how CI checks the very kernel bodies a GPU
or TPU compiles. Sequence lengths need not be multiples of the block sizes: inputs are padded to a
whole number of tiles, the padded keys are masked as padding, and the padded query rows are dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp

from kernels import flash_gpu, flash_tpu

BACKENDS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. `block_q`/`block_k` tile the forward; `*_bwd` tile both backward kernels.
    `num_warps`/`num_stages` are Triton launch parameters (ignored on TPU). Powers of two; on TPU,
    multiples of 128 unless a whole (padded) sequence fits in one tile."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def default(cls, backend: str, head_dim: int) -> "BlockSizes":
        """Per-backend defaults. GPU: FlashAttention-2's Triton tiling (128x64 forward, 64x64
        backward, 8 warps for head dim 128). TPU: 512-wide tiles keep the 128x128 MXU busy while
        every live buffer of a step fits well inside the default scoped VMEM (16 MiB on v5e)."""
        if backend == "tpu":
            return cls(block_q=512, block_k=512, block_q_bwd=512, block_k_bwd=512)
        warps = 4 if head_dim <= 64 else 8
        return cls(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=warps, num_stages=3)


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    sm_scale: float
    window: int
    blocks: BlockSizes
    backend: str
    interpret: bool


# The platform kernels are compiled for when it is not the one this process runs on: ahead-of-time compilation
# for a TPU topology from a CPU host (`maxlm.aot`) lowers the Mosaic kernels, not the interpreter.
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernels_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str) -> Iterator[None]:
    """Within this context, `flash_attention` defaults to `platform`'s kernels ("tpu" or "gpu"), compiled,
    never interpreted -- whatever `jax.default_backend()` is. For lowering to devices this host does not
    have (a TPU topology from `jax.experimental.topologies`)."""
    if platform not in BACKENDS:
        raise ValueError(f"compile_target must be one of {BACKENDS}, got {platform!r}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def default_backend() -> str:
    """The kernel family for the default JAX platform: TPU on TPU, the GPU kernels elsewhere (on a
    CPU they run interpreted), unless a `compile_target` is in force."""
    target = _TARGET.get()
    if target is not None:
        return target
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


MIN_BLOCK = 16  # the smallest matmul tile Triton's tensor-core dot accepts


def _fit(block: int, length: int) -> int:
    """Shrink a tile to the sequence (rounded up to a power of two) when the sequence is shorter."""
    return min(block, max(MIN_BLOCK, _pow2_at_least(length)))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
                    sm_scale: float | None = None, block_sizes: BlockSizes | None = None,
                    backend: str | None = None, interpret: bool | None = None,
                    q_offset: int | jax.Array = 0, window: int = 0) -> jax.Array:
    """Attention over q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H] in q's dtype (float32 accumulation).

    segment_ids: [B,T] ids shared by queries and keys (needs T == S), or a pair ([B,T], [B,S]); a query
    attends to a key only when their ids are equal and non-zero. Causal masking compares slots: query t
    is at slot q_offset + t (an int or a traced int32 scalar), key s at slot s. `sm_scale` defaults to
    H^-0.5. `backend` is "gpu" or "tpu" (default: the platform's); `interpret` defaults to True on a CPU
    platform. `window` > 0 (causal only): Mistral's sliding window, query slot q sees keys q - window + 1 .. q;
    key tiles wholly outside it are skipped, forward and backward.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"flash_attention expects q [B,T,N,H] and k, v [B,S,K,H]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kv_heads})")
    if window < 0 or (window and not causal):
        raise ValueError(f"window must be >= 0 and needs causal=True, got window={window}, causal={causal}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if interpret is None:
        interpret = _TARGET.get() is None and jax.default_backend() == "cpu"
    if segment_ids is None:
        q_seg = kv_seg = None
    elif isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if t != s:
            raise ValueError("a single segment_ids array needs T == S; pass (q_segment_ids, kv_segment_ids)")
        q_seg = kv_seg = segment_ids
    if q_seg is not None and (q_seg.shape != (b, t) or kv_seg.shape != (b, s)):
        raise ValueError(f"segment ids must be [B,T]={b, t} and [B,S]={b, s}; got {q_seg.shape}, {kv_seg.shape}")

    bs = block_sizes or BlockSizes.default(backend, h)
    tiles = (bs.block_q, bs.block_k, bs.block_q_bwd, bs.block_k_bwd)
    if any(x < MIN_BLOCK or x & (x - 1) for x in tiles):
        raise ValueError(f"block sizes must be powers of two >= {MIN_BLOCK}, got {bs}")
    bs = dataclasses.replace(bs, block_q=_fit(bs.block_q, t), block_k=_fit(bs.block_k, s),
                             block_q_bwd=_fit(bs.block_q_bwd, t), block_k_bwd=_fit(bs.block_k_bwd, s))
    t_pad = -(-t // max(bs.block_q, bs.block_q_bwd)) * max(bs.block_q, bs.block_q_bwd)
    s_pad = -(-s // max(bs.block_k, bs.block_k_bwd)) * max(bs.block_k, bs.block_k_bwd)
    if backend == "tpu" and not interpret:
        # Mosaic tiles: the saved statistics are [1, block] rows, whose lane dim must be a multiple of
        # 128 unless one tile spans the whole (padded) sequence.
        for name, x, length in (("block_q", bs.block_q, t_pad), ("block_q_bwd", bs.block_q_bwd, t_pad),
                                ("block_k", bs.block_k, s_pad), ("block_k_bwd", bs.block_k_bwd, s_pad)):
            if x % 128 and x != length:
                raise ValueError(f"on TPU {name}={x} must be a multiple of 128 (or cover the sequence)")
    if s_pad != s and q_seg is None:
        # Padded keys must be masked: give every real token segment 1 and the padding segment 0.
        q_seg, kv_seg = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
    if q_seg is not None:
        q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, t_pad - t)))
        kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, s_pad - s)))
    pad = lambda x, to: jnp.pad(x, ((0, 0), (0, to - x.shape[1]), (0, 0), (0, 0)))
    static = _Static(causal=causal, sm_scale=float(sm_scale if sm_scale is not None else h ** -0.5), window=int(window),
                     blocks=bs, backend=backend, interpret=bool(interpret))
    offset = jnp.reshape(jnp.asarray(q_offset, jnp.int32), (1,))
    out = _flash(pad(q, t_pad), pad(k, s_pad), pad(v, s_pad), q_seg, kv_seg, offset, static)
    return out[:, :t]


def _impl(static: _Static):
    return flash_tpu if static.backend == "tpu" else flash_gpu


def _forward(q, k, v, q_seg, kv_seg, offset, static: _Static):
    bs = static.blocks
    return _impl(static).forward(q, k, v, q_seg, kv_seg, offset, causal=static.causal, sm_scale=static.sm_scale,
                                 block_q=bs.block_q, block_k=bs.block_k, num_warps=bs.num_warps,
                                 num_stages=bs.num_stages, interpret=static.interpret, window=static.window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, offset, static: _Static):
    return _forward(q, k, v, q_seg, kv_seg, offset, static)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, offset, static: _Static):
    out, lse = _forward(q, k, v, q_seg, kv_seg, offset, static)
    return out, (q, k, v, q_seg, kv_seg, offset, out, lse)


def _flash_bwd(static: _Static, residuals, do):
    q, k, v, q_seg, kv_seg, offset, out, lse = residuals
    # delta_t = sum_h dO * O = sum_s P * dP: the softmax-backward correction, one number per query row.
    delta = jnp.einsum("BTNH,BTNH->BNT", out.astype(jnp.float32), do.astype(jnp.float32))
    bs = static.blocks
    dq, dk, dv = _impl(static).backward(
        q, k, v, q_seg, kv_seg, offset, lse, delta, do.astype(q.dtype), causal=static.causal, sm_scale=static.sm_scale,
        block_q=bs.block_q_bwd, block_k=bs.block_k_bwd, num_warps=bs.num_warps, num_stages=bs.num_stages,
        interpret=static.interpret, window=static.window)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
