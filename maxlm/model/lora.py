"""Low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Pure functions over the parameter pytree, nothing inside the model. The adapted forward pass is
`model.apply(config, merge(config, base, adapters), tokens)`: every adapted weight W becomes

    W' = W + (alpha / rank) * A @ B

computed per layer ("merge in the forward pass"). Because `merge` is an ordinary differentiable function,
a trainer takes `jax.grad` with respect to `adapters` only: the base tree is a constant of the loss, gets no
gradient and needs no optimizer state. The same `merge` exports a fine-tuned model as a plain parameter tree.

Shapes. A weight has a leading 'layers' axis L (layers are always stacked, see model.py), then its input
dims I, then its output dims O. Input dims are the single D (or F, for `down`) dim after L for
q / k / v / wqkv / gate / up / down, and (N, H) for `o`. The adapter of that weight is

    A: [L, *I, r]    initialised uniform(-1/sqrt(prod(I)), 1/sqrt(prod(I)))  (Kaiming-uniform with a=sqrt(5))
    B: [L, r, *O]    zeros, so a fresh adapter leaves the model unchanged

Adapters are always float32, whatever `model.param_dtype`; `merge` computes the delta in float32 and casts
it to the base weight's dtype before adding it.

Sharding. `logical_axes` reuses the base weight's logical axis names: A = ('layers', *in_axes, None) and
B = ('layers', None, *out_axes). The rank axis is None (never sharded: it is tiny), so under any mesh the
product A @ B comes out laid out like W and the add needs no communication.

The adapter tree mirrors the base tree: {"layers": {"attn": {"q": {"a": A, "b": B}, ...}, "mlp": {...}}}.

The untied output projection `lm_head` [D, V] may be a target too (A [1, D, r], B [1, r, V]: a layer axis of
one keeps the code uniform). It matters for small or domain-shifted bases: tokens rare in pretraining end
up with nearly identical output columns (every step pushes all unseen tokens' logits down together), and
no adapter below a frozen head can tell them apart again -- measured on the tiny base, LoRA on every other
projection (or full fine-tuning with a frozen head) stalls at ln(k) loss between k such letters.

Trainable tokens. Chat markers added for fine-tuning (or reserved in the base vocabulary but never seen in
pretraining) have untrained embedding rows and LM-head columns; with those frozen, no adapter can make the
model emit `<|im_end|>` -- it cannot learn to stop. So, as PEFT's `trainable_token_indices` does, the rows
of `lora.token_ids` (set by `maxlm.sft` to the template's markers) are trained too, as deltas: the tree gets
{"tokens": {"embedding": [n, D], "lm_head": [D, n]}} (no lm_head with tied embeddings), zeros at start,
added to those rows / columns by `merge`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

from maxlm.errors import ConfigError
from maxlm.model import decoder as model
from maxlm.model import quant

# The weights an adapter can target (`lora.targets`); q/k/v mean `wqkv` on a fused-qkv model.
TARGETS = ("q", "k", "v", "o", "wqkv", "gate", "up", "down", "lm_head")
LORA_TARGETS = TARGETS

Path = tuple[str, ...]

ADAPTER_DTYPE = jnp.float32
_QKV = ("q", "k", "v")
_PARENTS = ("attn", "mlp")
_LETTERS = "abcdefghijkmnopqstuvwxyz"  # einsum letters for weight dims; 'l' (layers) and 'r' (rank) reserved


def _num_in_dims(path: Path) -> int:
    """How many weight dims after L are input dims: (N, H) for the attention output, one for the rest."""
    return 2 if path[-1] == "o" else 1


def _target_names(config: ml_collections.ConfigDict) -> frozenset[str]:
    """`config.lora.targets` resolved against the model: q/k/v mean `wqkv` on a fused-qkv model."""
    lo, m = config.lora, model.model_config(config)
    if lo.rank <= 0:
        raise ConfigError("lora.rank", f"LoRA is disabled (rank {lo.rank}); set lora.rank > 0 to use adapters")
    names = set(lo.targets)
    if not names:
        raise ConfigError("lora.targets", "must name at least one projection")
    unknown = names - set(LORA_TARGETS)
    if unknown:
        raise ConfigError("lora.targets", f"unknown projections {sorted(unknown)}; choose from {LORA_TARGETS}")
    if m.fused_qkv:
        if names & set(_QKV):
            names = (names - set(_QKV)) | {"wqkv"}
    elif "wqkv" in names:
        raise ConfigError("lora.targets", "'wqkv' needs model.fused_qkv=True; name q, k, v instead")
    return frozenset(names)


def _paths_in(tree: dict, names: frozenset[str]) -> list[Path]:
    """Paths ('layers', 'attn' | 'mlp', name) of `tree` whose name is targeted, in tree (flatten) order."""
    paths = []
    for key_path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)[0]:
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        if (len(path) == 3 and path[0] == "layers" and path[1] in _PARENTS and path[2] in names) or \
                (path == ("lm_head",) and "lm_head" in names):
            paths.append(path)
    missing = names - {p[-1] for p in paths}
    if missing:
        raise ConfigError("lora.targets", f"the model has no weight named {sorted(missing)} under layers/attn "
                                          "or layers/mlp (lm_head: only with untied embeddings)")
    return paths


def _get(tree: dict, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _replace(tree: dict, path: Path, value: Any) -> dict:
    """A copy of `tree` with the leaf at `path` replaced: only the dicts along the path are new."""
    head, *rest = path
    return {**tree, head: _replace(tree[head], tuple(rest), value) if rest else value}


def _nest(items: list[tuple[Path, Any]]) -> dict:
    out: dict = {}
    for path, value in items:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _split_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(L, input dims, output dims) of a stacked weight; the unstacked lm_head counts as L = 1."""
    if path == ("lm_head",):
        return 1, tuple(shape[:1]), tuple(shape[1:])
    n_in = _num_in_dims(path)
    return shape[0], tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


# ----------------------------------------------------------------------------------------------------------
# Public API


def scale(config: ml_collections.ConfigDict) -> float:
    """The LoRA scaling alpha / rank."""
    _target_names(config)  # raises when LoRA is disabled
    return float(config.lora.alpha) / float(config.lora.rank)


def target_paths(config: ml_collections.ConfigDict) -> list[Path]:
    """Paths such as ('layers', 'attn', 'q') of the adapted weights, in tree order. ValueError (ConfigError)
    when lora.rank is 0 or a target does not exist in this model."""
    return _paths_in(model.abstract_params(config), _target_names(config))


def init(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Fresh float32 adapters: A Kaiming-uniform-like, B zeros (so `merge` returns the base weights).

    All A's come from one flat uniform draw, sliced per weight in tree order: a single random-number
    program (XLA:CPU compiles one threefry per distinct draw, seconds each for multi-dim shapes).
    """
    names = _target_names(config)
    shapes = model.abstract_params(config)
    r = config.lora.rank
    layout = []
    for path in _paths_in(shapes, names):
        layers, in_dims, out_dims = _split_shape(path, _get(shapes, path).shape)
        layout.append((path, layers, in_dims, out_dims))
    sizes = [layers * math.prod(in_dims) * r for _, layers, in_dims, _ in layout]
    unit = jax.random.uniform(rng, (sum(sizes),), ADAPTER_DTYPE, -1.0, 1.0)
    items, start = [], 0
    for (path, layers, in_dims, out_dims), size in zip(layout, sizes):
        bound = 1.0 / math.sqrt(math.prod(in_dims))  # fan_in = prod(I): PEFT's kaiming_uniform_(a=sqrt(5))
        a = (unit[start:start + size] * bound).reshape(layers, *in_dims, r)
        b = jnp.zeros((layers, r, *out_dims), ADAPTER_DTYPE)
        items.append((path, {"a": a, "b": b}))
        start += size
    out = _nest(items)
    if config.lora.token_ids:
        out["tokens"] = {k: jnp.zeros(v, ADAPTER_DTYPE) for k, v in _token_shapes(config).items()}
    return out


def _token_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    m = model.model_config(config)
    n = len(config.lora.token_ids)
    shapes = {"embedding": (n, m.d_model)}
    if not m.tie_embeddings:
        shapes["lm_head"] = (m.d_model, n)
    return shapes


def abstract(config: ml_collections.ConfigDict) -> dict:
    """ShapeDtypeStructs of `init(config, rng)`, without allocating anything."""
    return jax.eval_shape(lambda: init(config, jax.random.key(0)))


def logical_axes(config: ml_collections.ConfigDict) -> dict:
    """A PartitionSpec of logical axis names per adapter leaf, from the base weight's names:
    A = ('layers', *in_axes, None), B = ('layers', None, *out_axes); None is the (unsharded) rank axis."""
    names = _target_names(config)
    base_axes = model.logical_axes(config)
    items = []
    for path in _paths_in(model.abstract_params(config), names):
        spec = tuple(_get(base_axes, path))
        if path == ("lm_head",):
            spec = (None, *spec)
        n_in = _num_in_dims(path)
        items.append((path, {"a": PartitionSpec(spec[0], *spec[1:1 + n_in], None),
                             "b": PartitionSpec(spec[0], None, *spec[1 + n_in:])}))
    out = _nest(items)
    if config.lora.token_ids:
        token_axes = {"embedding": PartitionSpec(None, "embed"), "lm_head": PartitionSpec("embed", None)}
        out["tokens"] = {k: token_axes[k] for k in _token_shapes(config)}
    return out


def num_params(config: ml_collections.ConfigDict) -> int:
    """Adapter parameter count from shapes alone: sum over targets of L * r * (prod(I) + prod(O))."""
    names = _target_names(config)
    shapes = model.abstract_params(config)
    r = config.lora.rank
    total = 0
    for path in _paths_in(shapes, names):
        layers, in_dims, out_dims = _split_shape(path, _get(shapes, path).shape)
        total += layers * r * (math.prod(in_dims) + math.prod(out_dims))
    if config.lora.token_ids:
        total += sum(math.prod(shape) for shape in _token_shapes(config).values())
    return total


def _delta(a: jax.Array, b: jax.Array, lora_scale: float) -> jax.Array:
    """lora_scale * A @ B per layer, shaped like the weight: A [L, *I, r], B [L, r, *O] -> [L, *I, *O].

    Written as one einsum over the named dims (no reshapes), so sharded inputs give a product laid out like
    the weight. float32 at full precision: its cost (L * |W| * r) is small next to any forward pass.
    """
    n_in, n_out = a.ndim - 2, b.ndim - 2
    if n_in + n_out > len(_LETTERS):
        raise ValueError(f"weight of rank {n_in + n_out + 1} is too large for an adapter")
    ins, outs = _LETTERS[:n_in], _LETTERS[n_in:n_in + n_out]
    product = jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a.astype(jnp.float32), b.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    return product * lora_scale


def merge(config: ml_collections.ConfigDict, base: dict, adapters: dict) -> dict:
    """The full parameter tree with each adapted W replaced by W + scale * A @ B (in W's dtype).

    Every leaf that is not adapted is the very object found in `base`. Pure, so it can be jitted and
    differentiated (a trainer differentiates it with respect to `adapters` only).
    """
    names = _target_names(config)
    s = scale(config)
    paths = _paths_in(base, names)
    tokens = adapters.get("tokens")
    adapters = {k: v for k, v in adapters.items() if k != "tokens"}
    adapter_paths = {tuple(str(getattr(k, "key", k)) for k in kp)[:-1]
                     for kp, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    if adapter_paths != set(paths):
        raise ValueError(f"adapter tree does not match lora.targets: adapters for {sorted(adapter_paths)}, "
                         f"targets {paths}")
    out = base
    for path in paths:
        w, ad = _get(base, path), _get(adapters, path)
        expected = _split_shape(path, w.shape)
        got = (ad["a"].shape[0], tuple(ad["a"].shape[1:-1]), tuple(ad["b"].shape[2:]))
        if got != expected or not ad["a"].shape[-1] == ad["b"].shape[1] == config.lora.rank:
            raise ValueError(f"adapter for {'/'.join(path)}: A {ad['a'].shape}, B {ad['b'].shape} do not fit "
                             f"the weight {w.shape} at rank {config.lora.rank}")
        if quant.is_quantized(w):  # QLoRA: the layer reads dequant(W) + A @ B (`quant.Adapted`)
            a, b = ad["a"], ad["b"] * jnp.asarray(s, ad["b"].dtype)
            out = _replace(out, path, quant.Adapted(w, a[0], b[0]) if path == ("lm_head",) else quant.Adapted(w, a, b))
            continue
        delta = _delta(ad["a"], ad["b"], s)
        out = _replace(out, path, w + (delta[0] if path == ("lm_head",) else delta).astype(w.dtype))
    if bool(config.lora.token_ids) != (tokens is not None):
        raise ValueError(f"lora.token_ids={tuple(config.lora.token_ids)} but the adapters "
                         f"{'have' if tokens is not None else 'lack'} token rows")
    if tokens is not None:
        ids = jnp.asarray(config.lora.token_ids, jnp.int32)
        # Rows added to a quantised embedding / head need it whole: dequantised (once per step, like the tied head).
        out = dict(out, **{k: quant.dequantize(out[k], config.model.param_dtype) for k in tokens
                           if quant.is_quantized(out[k])})
        out = dict(out, embedding=out["embedding"].at[ids].add(tokens["embedding"].astype(out["embedding"].dtype)))
        if "lm_head" in tokens:
            out["lm_head"] = out["lm_head"].at[:, ids].add(tokens["lm_head"].astype(out["lm_head"].dtype))
    return out
