"""One attention entry point with an implementation switch.

`impl="xla"` is the plain-jnp reference from `kernels.reference` (XLA fuses it well enough on every
backend and it is the oracle for the others); `impl="cudnn"` is `jax.nn.dot_product_attention` with the
cuDNN fused kernel on NVIDIA GPUs; `impl="pallas"` is maxlm's own flash attention
(`kernels.flash_attention`). All share the masking semantics documented in `kernels/reference.py`:
packed-sequence segment ids (0 = padding), causal over cache slots.

A Pallas kernel is a per-device program, so under a mesh it runs inside `shard_map`: each device gets
its local batch rows, heads and query slice, as the logical-axis rules in the config shard them (the
model never names a mesh axis). Sequence parallelism uses the same path for both impls: queries stay
sharded, keys/values are all-gathered over the sequence axes (see `_per_device`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

import flax.linen as nn
from jax.sharding import PartitionSpec as P

import kernels
from kernels import reference


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
           q_offset: jax.Array | int = 0, causal: bool = True, impl: str = "xla") -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H], segment ids [B,T] / [B,S] -> [B,T,N,H] in q's dtype."""
    if impl == "cudnn":
        mask = reference.attention_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    if impl not in ("xla", "pallas"):
        raise ValueError(f"unknown attention impl {impl!r}")
    self_attention = isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]
    if self_attention and (impl == "pallas" or _sequence_shards() > 1):
        return _per_device(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, impl=impl)
    # Cached decoding (queries at an offset into a longer cache) is memory-bound and served by the
    # reference under every impl; the flash kernel is for training, scoring and prefill.
    return reference.mha_reference(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                   causal=causal, q_offset=q_offset)


def _local(q, k, v, q_seg, kv_seg, q_offset, *, causal: bool, impl: str) -> jax.Array:
    if impl == "pallas":
        return kernels.flash_attention(q, k, v, causal=causal, segment_ids=(q_seg, kv_seg), q_offset=q_offset)
    return reference.mha_reference(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal,
                                   q_offset=q_offset)


def _specs():
    """Mesh axes of q, k/v and segment ids, from the logical-axis rules in force."""
    q_spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length", "activation_heads", None))
    kv_spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length", "activation_kv_heads", None))
    return q_spec, kv_spec, P(q_spec[0], q_spec[1])


def _shards(mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[a] for a in names if a is not None)


def _sequence_shards() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else _shards(mesh, _specs()[0][1])


def _per_device(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, impl: str) -> jax.Array:
    """Self-attention as a per-device program under `shard_map`: each device keeps its batch rows, heads
    and query slice, and gathers the keys/values of the whole sequence over the sequence axes.

    All-gathered K/V rather than ring attention (Llama 3, Dubey et al. 2024, section 3.3.2, makes the
    same choice): with grouped-query attention K/V are G times smaller than the queries, so one
    all-gather costs little; any mask (causal plus packed documents) is just the local kernel's mask at
    a query offset; and the kernel runs unchanged with `q_offset` = shard index x local length. Memory
    per device still drops by the sequence degree for everything but K/V themselves.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _local(q, k, v, q_segment_ids, kv_segment_ids, 0, causal=causal, impl=impl)
    q_spec, kv_spec, seg_spec = _specs()
    if any(x.shape[d] % _shards(mesh, spec[d]) for x, spec in ((q, q_spec), (k, kv_spec)) for d in (0, 1, 2)):
        # Shapes the mesh cannot split evenly (e.g. the 1x1 dummy batch of parameter init): one call on
        # the whole arrays, which the partitioner gathers. Correct, just not per-device.
        return _local(q, k, v, q_segment_ids, kv_segment_ids, 0, causal=causal, impl=impl)
    seq_axes = q_spec[1]

    def body(q, k, v, q_seg, kv_seg):
        offset = 0
        if seq_axes is not None:
            k, v, kv_seg = (jax.lax.all_gather(x, seq_axes, axis=1, tiled=True) for x in (k, v, kv_seg))
            offset = jax.lax.axis_index(seq_axes) * q.shape[1]
        return _local(q, k, v, q_seg, kv_seg, offset, causal=causal, impl=impl)

    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def rope_frequencies(h: int, *, theta: float, scaling: str = "none", factor: float = 1.0,
                     original_max_len: int = 0, beta_fast: float = 32.0, beta_slow: float = 1.0,
                     attention_factor: float = 0.0, seq_len: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """(inverse frequencies [H/2], multiplier of cos/sin) of a rotary scaling method, as Hugging Face's
    `rope_type`s define them (modeling_rope_utils):

    - `ntk` (static NTK-aware, bloc97 2023): base theta * factor^(H / (H - 2)), high frequencies intact;
    - `dynamic` (dynamic NTK, Hugging Face's "dynamic"): the same with the factor grown to the current length,
      base theta * (factor * L / L0 - (factor - 1))^(H / (H - 2)) once L = max position + 1 exceeds L0 =
      `original_max_len`, plain rope below it;
    - `yarn` (Peng et al. 2023): per dimension, a ramp between interpolated (theta_i / factor) and original
      frequencies by how many rotations a dimension makes over L0 (below `beta_slow`: interpolate, above
      `beta_fast`: keep), and cos/sin scaled by 0.1 ln(factor) + 1 (or `attention_factor`).
    `linear` (position interpolation) divides positions instead and is applied by `rope`.
    """
    exponents = jnp.arange(0, h, 2, dtype=jnp.float32) / h
    scale = 1.0
    if scaling == "ntk":
        theta = theta * factor ** (h / (h - 2))
    elif scaling == "dynamic":
        grown = theta * jnp.maximum(factor * seq_len / original_max_len - (factor - 1), 1.0) ** (h / (h - 2))
        theta = jnp.where(seq_len > original_max_len, grown, theta)
    inv_freq = 1.0 / (theta ** exponents)
    if scaling == "yarn":
        def correction_dim(rotations: float) -> float:
            return h * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), h - 1)
        ramp = jnp.clip((jnp.arange(h // 2, dtype=jnp.float32) - low) / max(high - low, 0.001), 0.0, 1.0)
        extrapolate = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate
        inv_freq = inv_freq / factor * (1.0 - extrapolate) + inv_freq * extrapolate
        scale = attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, scale


def rope(x: jax.Array, positions: jax.Array, *, theta: float, scaling: str = "none", factor: float = 1.0,
         original_max_len: int = 0, beta_fast: float = 32.0, beta_slow: float = 1.0,
         attention_factor: float = 0.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), "rotate half" layout as in Hugging Face Llama.

    Context extension: `linear` is position interpolation (Chen et al. 2023: positions / factor); `ntk`,
    `dynamic` and `yarn` change the frequencies (`rope_frequencies`). x [B,T,N,H], positions [B,T].
    """
    h = x.shape[-1]
    pos = positions.astype(jnp.float32)
    if scaling == "linear":
        pos = pos / factor
    inv_freq, scale = rope_frequencies(h, theta=theta, scaling=scaling, factor=factor,
                                       original_max_len=original_max_len, beta_fast=beta_fast, beta_slow=beta_slow,
                                       attention_factor=attention_factor,
                                       seq_len=jnp.max(positions).astype(jnp.float32) + 1.0)
    angles = pos[..., None] * inv_freq  # [B,T,H/2]
    cos = (jnp.cos(angles) * scale)[:, :, None, :]
    sin = (jnp.sin(angles) * scale)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
