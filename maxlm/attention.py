"""One attention entry point with an implementation switch.

`impl="xla"` is the plain-jnp reference from `kernels.reference` (XLA fuses it well enough on every
backend and it is the oracle for the others); `impl="cudnn"` is `jax.nn.dot_product_attention` with the
cuDNN fused kernel on NVIDIA GPUs; `impl="pallas"` is maxlm's own flash attention
(`kernels.flash_attention`). All share the masking semantics documented in `kernels/reference.py`:
packed-sequence segment ids (0 = padding), causal over cache slots.

A Pallas kernel is a per-device program, so under a mesh it runs inside `shard_map`: each device gets
its local batch rows and heads, as the logical-axis rules in the config shard them (the model never
names a mesh axis). The sequence stays whole inside the kernel: attention needs every key, so a
sequence-sharded activation is gathered at the `shard_map` boundary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import flax.linen as nn
from jax.sharding import PartitionSpec as P

import kernels
from kernels import reference


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
           q_offset: jax.Array | int = 0, causal: bool = True, impl: str = "xla") -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H], segment ids [B,T] / [B,S] -> [B,T,N,H] in q's dtype."""
    if impl == "pallas" and isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]:
        return _flash_sharded(q, k, v, q_segment_ids, kv_segment_ids, causal=causal)
    if impl in ("xla", "pallas"):
        # Under "pallas", cached decoding (queries at an offset into a longer cache) is memory-bound and
        # served here; the flash kernel is for training, scoring and prefill.
        return reference.mha_reference(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                       causal=causal, q_offset=q_offset)
    if impl == "cudnn":
        mask = reference.attention_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    raise ValueError(f"unknown attention impl {impl!r}")


def _flash_sharded(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool) -> jax.Array:
    """Run the flash kernel on each device's shard when a mesh is active, else directly."""

    def kernel(q, k, v, q_seg, kv_seg):
        return kernels.flash_attention(q, k, v, causal=causal, segment_ids=(q_seg, kv_seg))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, q_segment_ids, kv_segment_ids)
    q_spec = nn.logical_to_mesh_axes(("activation_batch", None, "activation_heads", None))
    kv_spec = nn.logical_to_mesh_axes(("activation_batch", None, "activation_kv_heads", None))
    seg_spec = P(q_spec[0], None)

    def shards(entry) -> int:
        names = entry if isinstance(entry, tuple) else (entry,)
        return math.prod(mesh.shape[a] for a in names if a is not None)

    if any(x.shape[d] % shards(spec[d]) for x, spec in ((q, q_spec), (k, kv_spec)) for d in (0, 2)):
        # Shapes the mesh cannot split evenly (e.g. the 1x1 dummy batch of parameter init): one call on
        # the whole arrays, which the partitioner gathers. Correct, just not per-device.
        return kernel(q, k, v, q_segment_ids, kv_segment_ids)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def rope(x: jax.Array, positions: jax.Array, *, theta: float, scaling: str = "none",
         factor: float = 1.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), "rotate half" layout as in Hugging Face Llama.

    Context extension: `linear` is position interpolation (Chen et al. 2023: positions / factor);
    `ntk` is NTK-aware scaling of the base (bloc97 2023: theta * factor^(H / (H - 2))), which keeps the
    high-frequency dimensions intact. x [B,T,N,H], positions [B,T].
    """
    h = x.shape[-1]
    if scaling == "ntk":
        theta = theta * factor ** (h / (h - 2))
    pos = positions.astype(jnp.float32)
    if scaling == "linear":
        pos = pos / factor
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    angles = pos[..., None] * inv_freq  # [B,T,H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
