"""One attention entry point with an implementation switch.

`impl="xla"` is the plain-jnp reference from `kernels.reference` (XLA fuses it well enough on every
backend and it is the oracle for the others); `impl="cudnn"` is `jax.nn.dot_product_attention` with the
cuDNN fused kernel on NVIDIA GPUs. The Pallas flash kernel ("pallas") arrives with the kernels issue;
`config.validate` rejects it until then. All implementations share the masking semantics documented in
`kernels/reference.py`: packed-sequence segment ids (0 = padding), causal over cache slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import reference


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
           q_offset: jax.Array | int = 0, causal: bool = True, impl: str = "xla") -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H], segment ids [B,T] / [B,S] -> [B,T,N,H] in q's dtype."""
    if impl == "xla":
        return reference.mha_reference(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                       causal=causal, q_offset=q_offset)
    if impl == "cudnn":
        mask = reference.attention_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    raise ValueError(f"unknown attention impl {impl!r}")


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
