"""One attention entry point with an implementation switch.

`impl="xla"` is the plain-jnp reference from `kernels.reference` (XLA fuses it well enough on every
backend and it is the oracle for the others); `impl="cudnn"` is `jax.nn.dot_product_attention` with the
cuDNN fused kernel on NVIDIA GPUs; `impl="pallas"` is maxlm's own flash attention
(`kernels.flash_attention`). All share the masking semantics documented in `kernels/reference.py`:
packed-sequence segment ids (0 = padding), causal over cache slots.

A Pallas kernel is a per-device program, so under a mesh it runs inside `shard_map`: each device gets
its local batch rows, heads and query slice, as the logical-axis rules in the config shard them (the
model never names a mesh axis). Sequence parallelism uses the same path for both impls: queries stay
sharded, keys/values are all-gathered over the sequence axes (see `_per_device`); or, with
`mesh.sequence_strategy=ring`, passed round them (`maxlm.model.ring_attention`).

Both switches are registries kept here, beside their code, and `config.validate` checks
`model.attention_impl` / `model.rope_scaling` against them: an attention implementation is a function
registered with `@register_attention(name)`, a RoPE variant (context extension) one registered with
`@register_rope(name)` (see `rope_frequencies`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import flax.linen as nn
from jax.sharding import PartitionSpec as P

import kernels
from kernels import reference
from maxlm.model import ring_attention


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
    """A registered attention implementation: `fn(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal)`
    with `attend`'s shapes and semantics; `backend` the one JAX backend it runs on (None: every backend),
    `hardware` how `config.validate` names that requirement. The flags say which of `attend`'s optional
    keywords `fn` also takes; `attend` passes each only when it is in use, and config.validate checks them."""
    fn: Callable[..., jax.Array]
    backend: str | None = None
    hardware: str = ""
    windowed: bool = False  # takes `window=` (a sliding window, Mistral's)
    scaled: bool = False  # takes `scale=` (the logit scale, when it is not H^-0.5: Gemma's query_pre_attn_scalar)
    softcapped: bool = False  # takes `softcap=` (c * tanh(logits / c) before the mask: Gemma 2)


# model.attention_impl -> implementation, in registration order (the order config errors list them).
ATTENTION_IMPLS: dict[str, AttentionImpl] = {}


def register_attention(name: str, *, backend: str | None = None, hardware: str = "", windowed: bool = False,
                       scaled: bool = False, softcapped: bool = False):
    """Decorator registering an attention implementation as `model.attention_impl=name`; `windowed` ones
    also take a keyword `window` (> 0: each query sees only its last `window` slots), `scaled` ones a keyword
    `scale` (the logit scale), `softcapped` ones a keyword `softcap` (> 0: logits soft-capped at it)."""
    def register(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        ATTENTION_IMPLS[name] = AttentionImpl(fn, backend, hardware, windowed, scaled, softcapped)
        return fn
    return register


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
           q_offset: jax.Array | int = 0, causal: bool = True, impl: str = "xla", window: int = 0,
           local: jax.Array | None = None, scale: float | None = None, softcap: float = 0.0,
           ring: ring_attention.Ring | None = None) -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H], segment ids [B,T] / [B,S] -> [B,T,N,H] in q's dtype.

    `window` > 0: a sliding window (Mistral; Beltagy et al. 2020) of that many slots, the query's own
    included. `local`, a traced boolean scalar, applies that window only where it is True: Gemma's
    interleave of local and global layers inside one layer scan (Gemma Team 2025, "Gemma 3 Technical
    Report"). Both programs are compiled and `lax.cond` runs one, so every windowed implementation -- the
    Pallas kernels with their static window included -- serves mixed layers, skipping tiles in local ones.
    `scale`: the logit scale (None: H^-0.5). `softcap` > 0: logits become softcap * tanh(logits / softcap)
    before masking (Gemma 2's attention soft-capping). `ring`: self-attention over a sharded sequence passes
    K/V round the sequence axis instead of gathering them (`maxlm.model.ring_attention`), whichever `impl`.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}")
    entry = ATTENTION_IMPLS[impl]
    options: dict[str, Any] = {}
    for key, value, supported in (("scale", scale, entry.scaled), ("softcap", softcap or None, entry.softcapped)):
        if value is not None:
            if not supported:
                raise ValueError(f"attention impl {impl!r} does not take {key}=")
            options[key] = value
    if window and not entry.windowed:
        raise ValueError(f"attention impl {impl!r} has no sliding window")

    use_ring = ring is not None and _self_attention(q, k, q_offset) and sequence_shards() > 1
    if use_ring and softcap:
        raise ValueError("ring attention does not soft-cap logits")

    def run(window: int) -> jax.Array:
        if use_ring:
            return _ring(q, k, v, q_segment_ids, kv_segment_ids, ring, causal=causal, window=window, scale=scale)
        extra = {**options, "window": window} if window else options
        return entry.fn(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, **extra)

    if window and local is not None:
        return jax.lax.cond(local, lambda: run(window), lambda: run(0))
    return run(window)


def _self_attention(q: jax.Array, k: jax.Array, q_offset: jax.Array | int) -> bool:
    return isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]


def _reference(q, k, v, q_seg, kv_seg, q_offset, *, causal: bool, window: int = 0, scale: float | None = None,
               softcap: float = 0.0) -> jax.Array:
    return reference.mha_reference(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal,
                                   q_offset=q_offset, window=window, sm_scale=scale, softcap=softcap)


def _flash(q, k, v, q_seg, kv_seg, q_offset, *, causal: bool, window: int = 0, scale: float | None = None
           ) -> jax.Array:
    return kernels.flash_attention(q, k, v, causal=causal, segment_ids=(q_seg, kv_seg), q_offset=q_offset,
                                   window=window, sm_scale=scale)


def _one_query(q, k, v, q_seg, kv_seg, q_offset, *, causal: bool, window: int = 0, scale: float | None = None,
               softcap: float = 0.0) -> jax.Array:
    """The reference's attention for one query token per row (a decode step), as products and sums over the
    cache instead of `mha_reference`'s batched matmuls.

    With T = 1 those matmuls are matrix-vector products that XLA:CPU runs after transposing the whole cache
    to [B,K,S,H]. That is a copy of K and V per layer and step, more than half of a decode step's time. As
    a multiply-and-reduce, XLA fuses the reads of the cache into the reduction, so each key and value is
    read once. The mask and the float32 softmax are the reference's own.
    """
    b, _, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, kv_heads, n // kv_heads, h).astype(jnp.float32)
    logits = jnp.sum(qg[:, None] * k[:, :, :, None, :].astype(jnp.float32), axis=-1)  # [B,S,K,G]
    logits = logits * (scale if scale is not None else h ** -0.5)
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = reference.attention_mask(q_seg, kv_seg, causal=causal, q_offset=q_offset, window=window)[:, 0]
    logits = jnp.where(mask[:, :, None, None], logits, reference.MASK_VALUE)
    probs = jnp.where(mask[:, :, None, None], jax.nn.softmax(logits, axis=1), 0.0)
    out = jnp.sum(probs[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1)  # [B,K,G,H]
    return out.reshape(b, 1, n, h).astype(q.dtype)


@register_attention("xla", windowed=True, scaled=True, softcapped=True)
def _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, window=0, scale=None, softcap=0.0):
    """The plain-jnp reference; per device (keys/values gathered) when the sequence is sharded; as products
    and sums for one query token against a longer cache (`_one_query`: a decode step)."""
    options = dict(window=window, scale=scale, softcap=softcap)
    if _self_attention(q, k, q_offset) and sequence_shards() > 1:
        return _per_device(q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
                           local=functools.partial(_reference, **options))
    if q.shape[1] == 1 and k.shape[1] > 1:
        return _one_query(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal=causal, **options)
    return _reference(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal=causal, **options)


@register_attention("cudnn", backend="gpu", hardware="an NVIDIA GPU", windowed=True, scaled=True)
def _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, window=0, scale=None):
    """`jax.nn.dot_product_attention`'s cuDNN fused kernel, given the reference's mask."""
    mask = reference.attention_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset, window=window)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn")


@register_attention("pallas", windowed=True, scaled=True)
def _pallas_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal, window=0, scale=None):
    """maxlm's flash kernel for self-attention (training, scoring, prefill), per device under a mesh; with a
    sliding window the key tiles outside it are skipped. Cached decoding (queries at an offset into a longer
    cache) is memory-bound and served by the reference."""
    if _self_attention(q, k, q_offset):
        return _per_device(q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
                           local=functools.partial(_flash, window=window, scale=scale))
    return _reference(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal=causal, window=window, scale=scale)


def _specs():
    """Mesh axes of q, k/v and segment ids, from the logical-axis rules in force."""
    q_spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length", "activation_heads", None))
    kv_spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length", "activation_kv_heads", None))
    return q_spec, kv_spec, P(q_spec[0], q_spec[1])


def _shards(mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[a] for a in names if a is not None)


def sequence_shards() -> int:
    """How many devices the sequence is split over (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else _shards(mesh, _specs()[0][1])



def _ring(q, k, v, q_segment_ids, kv_segment_ids, ring, *, causal: bool, window: int, scale: float | None):
    """`ring_attention.ring_attention` per device under `shard_map` (batch rows and heads split as `_per_device`
    splits them; the sequence axes form the ring)."""
    mesh = jax.sharding.get_abstract_mesh()
    q_spec, kv_spec, seg_spec = _specs()
    axes, devices = q_spec[1], _shards(mesh, q_spec[1])
    body = functools.partial(ring_attention.ring_attention, axis=axes, devices=devices, zigzag=ring.zigzag,
                             causal=causal, scale=scale if scale is not None else q.shape[-1] ** -0.5,
                             window=window)
    return jax.shard_map(lambda *a: body(*a), mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def _per_device(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool,
                local: Callable[..., jax.Array]) -> jax.Array:
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
        return local(q, k, v, q_segment_ids, kv_segment_ids, 0, causal=causal)
    q_spec, kv_spec, seg_spec = _specs()
    if any(x.shape[d] % _shards(mesh, spec[d]) for x, spec in ((q, q_spec), (k, kv_spec)) for d in (0, 1, 2)):
        # Shapes the mesh cannot split evenly (e.g. the 1x1 dummy batch of parameter init): one call on
        # the whole arrays, which the partitioner gathers. Correct, just not per-device.
        return local(q, k, v, q_segment_ids, kv_segment_ids, 0, causal=causal)
    seq_axes = q_spec[1]

    def body(q, k, v, q_seg, kv_seg):
        offset = 0
        if seq_axes is not None:
            k, v, kv_seg = (jax.lax.all_gather(x, seq_axes, axis=1, tiled=True) for x in (k, v, kv_seg))
            offset = jax.lax.axis_index(seq_axes) * q.shape[1]
        return local(q, k, v, q_seg, kv_seg, offset, causal=causal)

    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


@dataclasses.dataclass(frozen=True)
class RopeVariant:
    """A registered rotary variant (see `register_rope`)."""
    frequencies: Callable[..., tuple[jax.Array, Any]]
    positions: Callable[..., jax.Array] | None = None


# model.rope_scaling -> variant, in registration order (the order config errors list them).
ROPE_VARIANTS: dict[str, RopeVariant] = {}


def register_rope(name: str, *, positions: Callable[..., jax.Array] | None = None):
    """Decorator registering a rotary variant as `model.rope_scaling=name`.

    The function is `fn(h, *, theta, seq_len, **params) -> (inverse frequencies [H/2], multiplier of cos/sin)`
    and `positions`, if given, `positions(pos float32 [B,T], **params) -> pos` (what the angles use). `params`
    are the model's other `rope_<name>` config keys as `<name>=value` (`rope_config`): a variant that needs a
    parameter of its own adds a `model.rope_<name>` key to the schema and reads `<name>` here, nothing else.
    Each function takes the parameters it uses as keyword arguments with defaults, and `**_` for the rest.
    `seq_len` is the largest position + 1 (a traced scalar; dynamic variants grow with it).
    """
    def register(fn: Callable[..., tuple[jax.Array, Any]]) -> Callable[..., tuple[jax.Array, Any]]:
        ROPE_VARIANTS[name] = RopeVariant(fn, positions)
        return fn
    return register


def _inverse_frequencies(h: int, theta: Any) -> jax.Array:
    """Plain RoPE's theta^(-2i/H), i < H/2 (theta may be a traced scalar)."""
    exponents = jnp.arange(0, h, 2, dtype=jnp.float32) / h
    return 1.0 / (theta ** exponents)


@register_rope("none")
def _plain_rope(h: int, *, theta: float, **_) -> tuple[jax.Array, Any]:
    return _inverse_frequencies(h, theta), 1.0


def _interpolate_positions(pos: jax.Array, *, factor: float = 1.0, **_) -> jax.Array:
    return pos / factor


@register_rope("linear", positions=_interpolate_positions)
def _linear_rope(h: int, *, theta: float, **_) -> tuple[jax.Array, Any]:
    """Position interpolation (Chen et al. 2023): plain frequencies, positions / factor."""
    return _inverse_frequencies(h, theta), 1.0


@register_rope("ntk")
def _ntk_rope(h: int, *, theta: float, factor: float = 1.0, **_) -> tuple[jax.Array, Any]:
    """Static NTK-aware (bloc97 2023): base theta * factor^(H / (H - 2)), high frequencies intact."""
    theta = theta * factor ** (h / (h - 2))
    return _inverse_frequencies(h, theta), 1.0


@register_rope("dynamic")
def _dynamic_ntk_rope(h: int, *, theta: float, seq_len: jax.Array, factor: float = 1.0, original_max_len: int = 0,
                      **_) -> tuple[jax.Array, Any]:
    """Dynamic NTK (Hugging Face's "dynamic"): the NTK base with the factor grown to the current length,
    theta * (factor * L / L0 - (factor - 1))^(H / (H - 2)) once L = max position + 1 exceeds L0 =
    `original_max_len`, plain rope below it."""
    grown = theta * jnp.maximum(factor * seq_len / original_max_len - (factor - 1), 1.0) ** (h / (h - 2))
    theta = jnp.where(seq_len > original_max_len, grown, theta)
    return _inverse_frequencies(h, theta), 1.0


@register_rope("yarn")
def _yarn_rope(h: int, *, theta: float, factor: float = 1.0, original_max_len: int = 0, beta_fast: float = 32.0,
               beta_slow: float = 1.0, attention_factor: float = 0.0, **_) -> tuple[jax.Array, Any]:
    """YaRN (Peng et al. 2023): per dimension, a ramp between interpolated (theta_i / factor) and original
    frequencies by how many rotations a dimension makes over L0 = `original_max_len` (below `beta_slow`:
    interpolate, above `beta_fast`: keep), and cos/sin scaled by 0.1 ln(factor) + 1 (or `attention_factor`)."""
    inv_freq = _inverse_frequencies(h, theta)

    def correction_dim(rotations: float) -> float:
        return h * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), h - 1)
    ramp = jnp.clip((jnp.arange(h // 2, dtype=jnp.float32) - low) / max(high - low, 0.001), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = inv_freq / factor * (1.0 - extrapolate) + inv_freq * extrapolate
    scale = attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, scale


@register_rope("llama3")
def _llama3_rope(h: int, *, theta: float, factor: float = 1.0, original_max_len: int = 0,
                 low_freq_factor: float = 1.0, high_freq_factor: float = 4.0, **_) -> tuple[jax.Array, Any]:
    """Llama 3.1's frequency-dependent interpolation (Meta's reference `apply_scaling`; HF "llama3"): by a
    dimension's wavelength 2 pi / theta_i against L0 = `original_max_len`, short wavelengths (< L0 /
    high_freq_factor) keep their frequency, long ones (> L0 / low_freq_factor) are divided by `factor`,
    and those between blend the two linearly in L0 / wavelength."""
    inv_freq = _inverse_frequencies(h, theta)
    wavelength = 2 * math.pi / inv_freq
    smooth = jnp.clip((original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor),
                      0.0, 1.0)  # 0 at the long-wavelength end, 1 at the short one
    return inv_freq / factor * (1.0 - smooth) + inv_freq * smooth, 1.0


def _rope_parameter_names() -> frozenset[str]:
    """Every keyword parameter some registered variant reads (the `<name>` of its `model.rope_<name>`)."""
    names = set()
    for variant in ROPE_VARIANTS.values():
        for fn in (variant.frequencies, variant.positions):
            if fn is not None:
                names |= {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    return frozenset(names - {"theta", "seq_len"})


def _rope_variant(scaling: str, params: dict[str, Any]) -> RopeVariant:
    if scaling not in ROPE_VARIANTS:
        raise ValueError(f"unknown rope scaling {scaling!r}; registered: {tuple(ROPE_VARIANTS)}")
    unknown = sorted(set(params) - _rope_parameter_names())
    if unknown:  # variants take `**_`: a misspelt parameter would otherwise be ignored
        raise TypeError(f"unknown rope parameter(s) {unknown}; the model config has {sorted(_rope_parameter_names())}")
    return ROPE_VARIANTS[scaling]


def head_dim(m: Any) -> int:
    """H of a model config section: `head_dim`, or d_model // num_heads when it is 0."""
    return m.head_dim or m.d_model // m.num_heads


def rope_config(m: Any, *, local: bool = False) -> dict[str, Any]:
    """`rope`'s keyword arguments from a model config section: `theta`, `scaling` and every other
    `model.rope_<name>` as `<name>`; `original_max_len` 0 means `max_seq_len`.

    `local`: those of the sliding-window layers. With `model.local_rope_theta` set they use plain RoPE of that
    base (Gemma 3's local layers: base 10k, no scaling, while the global layers have 1M and the model's
    scaling; Gemma Team 2025, "Gemma 3 Technical Report", section 2); otherwise the same as every layer.
    (Not a `rope_*` key: it is no variant's parameter.)"""
    kwargs = {key[len("rope_"):]: m[key] for key in m if key.startswith("rope_")}
    kwargs["original_max_len"] = kwargs["original_max_len"] or m.max_seq_len
    if local and m.local_rope_theta:
        kwargs.update(theta=m.local_rope_theta, scaling="none")
    return kwargs


def rope_frequencies(h: int, *, theta: float, scaling: str = "none", seq_len: jax.Array | None = None,
                     **params: Any) -> tuple[jax.Array, Any]:
    """(inverse frequencies [H/2], multiplier of cos/sin) of the registered rotary variant `scaling`, as
    Hugging Face's `rope_type`s define them (modeling_rope_utils); `params` (factor, original_max_len,
    beta_fast, beta_slow, attention_factor, ...) go to the variant's function (see `register_rope`).
    `linear` (position interpolation) keeps the plain frequencies and divides positions instead (in `rope`).
    """
    return _rope_variant(scaling, params).frequencies(h, theta=theta, seq_len=seq_len, **params)


def rope(x: jax.Array, positions: jax.Array, *, theta: float, scaling: str = "none", **params: Any) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), "rotate half" layout as in Hugging Face Llama.

    Context extension: the registered variant `scaling` (`rope_frequencies`; `params` are its parameters,
    `rope_config` reads them from a model config). x [B,T,N,H], positions [B,T].
    """
    variant = _rope_variant(scaling, params)
    h = x.shape[-1]
    pos = positions.astype(jnp.float32)
    if variant.positions is not None:
        pos = variant.positions(pos, **params)
    inv_freq, scale = variant.frequencies(h, theta=theta, seq_len=jnp.max(positions).astype(jnp.float32) + 1.0,
                                          **params)
    angles = pos[..., None] * inv_freq  # [B,T,H/2]
    cos = (jnp.cos(angles) * scale)[:, :, None, :]
    sin = (jnp.sin(angles) * scale)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
