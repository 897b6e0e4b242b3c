"""Weight-only quantisation of the parameter tree: int8 per channel, int4 group-wise (W8A16 / W4A16).

The seed notes' arithmetic: a float32 weight costs 4 bytes, bf16 2, int8 1 and int4 half a byte, plus the
scales. Weight-only quantisation stores each large matrix as integers and one float scale per *output
channel* (int8, LLM.int8's vector-wise scaling without its outlier split) or per *group* of `group_size`
consecutive input elements of each output channel (int4, as GPTQ / AWQ checkpoints lay them out; a group of
32 costs 4 / 32 = 0.125 extra bytes per weight in float32 scales). Symmetric absmax scaling: a group's
largest magnitude maps to the top of the integer range.

The arithmetic on the arrays is Qwix's (github.com/google/qwix, `qwix.quantize` / `qwix.dequantize`, the
successor of AQT that MaxText and Tunix use): its `QArray` is a pytree whose first leaf is the integer array
with the weight's own shape, so a quantised tree goes through `model.apply`, `nn.scan`'s per-layer slicing,
the pipeline's stage split and the sharding rules unchanged. Qwix's other half -- intercepting a Flax
module's dot_generals to rewrite them -- is not used: our weights are plain pytree leaves that LoRA, Orbax,
the Hugging Face converter and the sharding rules already share, and the model dequantises a leaf where it
reads it (`use`), so inside the layer scan only one layer's weights exist in float at a time. AQT (Qwix's
predecessor, `aqtp`) is in maintenance and needs its own einsum wrappers inside the model.

What is quantised: every projection matrix (q/k/v/o or wqkv, gate/up/down, MoE experts) and the embedding
and LM head -- on a small model the embedding is a third of the weights. Norm scales, biases, the MoE
router and reward / value heads stay float: they are tiny, and the router's logits decide discrete choices.

QLoRA (Dettmers et al. 2023): with `lora.base_quant` the frozen base of a LoRA run is quantised once at load,
and `lora.merge` wraps each adapted quantised weight in an `Adapted` leaf; the layer computes
dequant(W) + scale * A @ B when it reads it, so the adapters train in float32 on an int4 / int8 base.
(NF4 and double quantisation, the paper's other two ideas, are left out: plain int4 group-wise.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from maxlm.errors import ConfigError

try:  # the `quant` extra; absent, every float path still works and asking for quantisation says what to install
    import qwix
except ImportError:  # pragma: no cover - exercised only without the extra
    qwix = None


@dataclasses.dataclass(frozen=True)
class Mode:
    """A weight format: its integer type and how scales are laid out (`group_size` 0: one per channel)."""

    qtype: Any
    bits: int
    grouped: bool


# --quant / lora.base_quant -> format. Add a format here and every entry point accepts it.
MODES: dict[str, Mode] = {
    "int8": Mode(jnp.int8, 8, grouped=False),
    "int4": Mode(jnp.int4, 4, grouped=True),
}
DEFAULT_GROUP_SIZE = 32

# The quantised weights, by parameter name, and the logical axes each one contracts over (its input dims).
# The embedding's rows are looked up, and read as the tied LM head [V, D] they contract over D: either way
# one scale per row (per token) is the per-channel layout.
CONTRACTING: dict[str, tuple[str, ...]] = {
    "q": ("embed",), "k": ("embed",), "v": ("embed",), "wqkv": ("embed",),
    "o": ("heads", "head_dim"),
    "gate": ("embed",), "up": ("embed",), "down": ("mlp",),
    "embedding": ("embed",), "lm_head": ("embed",),
}


@flax.struct.dataclass
class Adapted:
    """A LoRA-adapted quantised weight (QLoRA): read as dequant(base) + a @ b. `a` [*L, *I, r] and `b`
    [*L, r, *O] (the LoRA scale already in `b`) keep the weight's leading layer axis, so `nn.scan` slices
    all three together. Its first leaf is the base's integer array, shaped like the weight."""

    base: Any
    a: jax.Array
    b: jax.Array


def check_mode(name: str, key: str) -> Mode:
    """The `Mode` of `name`; a ConfigError naming `key` when it is not one, or Qwix is not installed."""
    if name not in MODES:
        raise ConfigError(key, f"must be one of {sorted(MODES)}, got {name!r}")
    if qwix is None:
        raise ConfigError(key, "needs Qwix: pip install 'maxlm[quant]' (or pip install qwix)")
    return MODES[name]


def is_quantized(x: Any) -> bool:
    return qwix is not None and isinstance(x, (qwix.QArray, Adapted))


def dequantize(w: Any, dtype: Any) -> jax.Array:
    """The float weight of a leaf (a plain array, a `qwix.QArray` or an `Adapted`), in `dtype`."""
    if isinstance(w, Adapted):
        base = dequantize(w.base, jnp.float32)
        return (base + _lora_product(w.a, w.b, base.shape)).astype(dtype)
    if qwix is not None and isinstance(w, qwix.QArray):
        return qwix.dequantize(w).astype(dtype)
    return w.astype(dtype)


def _lora_product(a: jax.Array, b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """a [*P, *I, r] @ b [*P, r, *O] -> [*P, *I, *O] = `shape`, where P are leading axes both share (the
    layer axis outside a scan, none inside): batched over P, contracted over r."""
    p = a.ndim + b.ndim - 2 - len(shape)  # shared leading axes
    lead, r = a.shape[:p], a.shape[-1]
    a2 = a.reshape(*lead, -1, r).astype(jnp.float32)
    b2 = b.reshape(*lead, r, -1).astype(jnp.float32)
    return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(shape)


def any_quantized(tree: Any) -> bool:
    """Whether any leaf of a parameter tree is quantised."""
    return any(is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def dense(tree: Any, dtype: Any) -> Any:
    """A parameter tree with every quantised leaf dequantised to `dtype` (float leaves as they are): what a
    QLoRA run exports -- its adapters merged into the dequantised base, the model it trained."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def take(w: Any, ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows `ids` of an embedding [V, D] (plain or quantised) in `dtype`: only the looked-up rows are
    dequantised."""
    if qwix is not None and isinstance(w, qwix.QArray):
        rows = qwix.QArray(jnp.take(w.qvalue, ids, axis=0), jnp.take(w.scale, ids, axis=0), None, w.qtype)
        return qwix.dequantize(rows).astype(dtype)
    if isinstance(w, Adapted):
        return jnp.take(dequantize(w, dtype), ids, axis=0)
    return jnp.take(w, ids, axis=0).astype(dtype)


def _path_name(path: tuple) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def _layout(spec: PartitionSpec, shape: tuple[int, ...], name: str, mode: Mode,
            group_size: int) -> tuple[tuple[int, ...], dict[int, int]]:
    """(channelwise axes, tiled axes {axis: group size}) of a weight, from its logical axis names."""
    names = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    contracting = [i for i, n in enumerate(names) if n in CONTRACTING[name]]
    if len(contracting) != len(CONTRACTING[name]):
        raise ValueError(f"{name}: logical axes {names} lack {CONTRACTING[name]}")
    channels = tuple(i for i in range(len(shape)) if i not in contracting)
    if not mode.grouped:
        return channels, {}
    axis = contracting[-1]  # groups run along the last input dim (head_dim for o: within one head)
    if shape[axis] % group_size:
        raise ConfigError("quant group size", f"{group_size} does not divide {name}'s input dim {shape[axis]} "
                          f"(shape {shape})")
    tiled = {axis: group_size}
    tiled.update({i: 1 for i in contracting[:-1]})  # other input dims: a scale per element (per head for o)
    return channels, tiled


def quantize(params: dict, axes: dict, mode_name: str, group_size: int = DEFAULT_GROUP_SIZE,
             key: str = "quant") -> dict:
    """The parameter tree with every weight of `CONTRACTING` replaced by a `qwix.QArray` (float32 scales).
    `axes`: the tree's logical axis names (`decoder.logical_axes`). Other leaves are returned as they are."""
    mode = check_mode(mode_name, key)
    if mode.grouped and group_size < 1:
        raise ConfigError(key, f"group size must be >= 1, got {group_size}")
    flat_axes = {path: spec for path, spec in jax.tree_util.tree_flatten_with_path(
        axes, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]}

    def one(path, w):
        name = _path_name(path)
        if name not in CONTRACTING or is_quantized(w) or getattr(w, "ndim", 0) < 2:
            return w
        channels, tiled = _layout(flat_axes[path], w.shape, name, mode, group_size)
        return qwix.quantize(jnp.asarray(w, jnp.float32), mode.qtype, channelwise_axes=channels,
                             tiled_axes=tiled, scale_dtype=jnp.float32)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)


def quantized_axes(axes: dict, params: dict) -> dict:
    """Logical axis names for a quantised tree: a QArray's integers keep the weight's names; its scales keep
    only the names of axes they still span (one per output channel), so a scale shards like its channels."""
    def one(spec, w):
        if qwix is not None and isinstance(w, qwix.QArray):
            names = tuple(spec) + (None,) * (w.qvalue.ndim - len(tuple(spec)))
            scale = PartitionSpec(*(n if s == q else None for n, s, q in zip(names, w.scale.shape, w.qvalue.shape)))
            return qwix.QArray(spec, scale, None, w.qtype)
        return spec

    return jax.tree.map(one, axes, params, is_leaf=lambda x: isinstance(x, PartitionSpec))


def leaf_bytes(x: Any) -> int:
    """Bytes at rest of an array (or ShapeDtypeStruct): int4 counts half a byte per element, as XLA packs
    it (numpy's int4 itemsize says 1)."""
    bits = 4 if jnp.dtype(x.dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else jnp.dtype(x.dtype).itemsize * 8
    return math.ceil(int(np.prod(x.shape)) * bits / 8)


def weight_bytes(params: Any) -> int:
    """Bytes of a (possibly quantised) parameter tree at rest: integers, scales and float leaves."""
    return sum(leaf_bytes(x) for x in jax.tree.leaves(params))
