"""The memory-bandwidth bound of autoregressive decoding, and the bandwidth measured on this device.

One decode step reads every weight once and each sequence's KV cache so far, so a batch of b sequences with
c cached tokens each cannot decode faster than b x bandwidth / (weight bytes + b x c x KV bytes per token)
tokens per second (Pope et al. 2022, "Efficiently Scaling Transformer Inference", section 2). The benchmarks
(experiments/bench_decode.py, experiments/bench_generate.py) print their rate beside this bound.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections

from maxlm.model import decoder as model


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a device copy of an `nbytes` float32 array (the best of 5)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    copy(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def kv_bytes_per_token(config: ml_collections.ConfigDict) -> int:
    """K and V of every layer for one token, in the compute dtype."""
    m = model.model_config(config)
    return 2 * m.num_layers * m.num_kv_heads * model.head_dim(m) * jnp.dtype(m.compute_dtype).itemsize


def decode_tokens_per_s(weight_bytes: float, kv_per_token: float, batch: float, context: float,
                        bandwidth: float) -> float:
    """The roofline: tokens/s of `batch` sequences with `context` cached tokens each at `bandwidth` B/s."""
    return batch * bandwidth / (weight_bytes + batch * context * kv_per_token)
