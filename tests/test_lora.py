"""LoRA (maxlm/model/lora.py): merge math, gradients through merge, shardings, counts and validation.

References are computed here independently, in float64 numpy: each weight is viewed as a matrix
[L, prod(input dims), prod(output dims)] and W + scale * A @ B is formed with numpy matmuls.
"""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from maxlm import config as C
from maxlm.model import lora, decoder as model
from tests.helpers import random_params

TINY = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "tiny.py")
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def _cfg(**extra):
    """configs/tiny.py shrunk further: L=2, D=32, N=4, K=2, H=8, F=48, V=64."""
    return C.validate(C.override(C.load_config_file(TINY), **{
        "model.vocab_size": 64, "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 48, "model.max_seq_len": 32, "data.seq_len": 16,
        "lora.rank": 4, "lora.alpha": 8.0, **extra}))


def _path_tuple(key_path):
    return tuple(str(getattr(k, "key", k)) for k in key_path)


def _leaves_with_paths(tree):
    return [(_path_tuple(kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _random_adapters(cfg, seed=7):
    """Adapters with random (non-zero) A and B, shaped like `lora.abstract`."""
    return jax.tree.map(jnp.asarray, random_params(lora.abstract(cfg), seed, std=0.3))


def _base(cfg, seed=0):
    """Base parameters: normal(0.02) matrices, as model.init draws them, but from numpy."""
    return jax.tree.map(jnp.asarray, random_params(model.abstract_params(cfg), seed, std=0.02))


def _n_in(name):
    return 2 if name == "o" else 1


def _as_matrices(w, n_in):
    """[L, *I, *O] -> float64 [L, prod(I), prod(O)]."""
    w = np.asarray(w, np.float64)
    return w.reshape(w.shape[0], int(np.prod(w.shape[1:1 + n_in])), -1)


def _np_merged(w, a, b, n_in, s):
    """W + s * A @ B per layer, in float64 numpy, shaped like W."""
    w = np.asarray(w, np.float64)
    a2 = np.asarray(a, np.float64).reshape(a.shape[0], -1, a.shape[-1])  # [L, prod(I), r]
    b2 = np.asarray(b, np.float64).reshape(b.shape[0], b.shape[1], -1)  # [L, r, prod(O)]
    return w + s * np.matmul(a2, b2).reshape(w.shape)


def _expected_shapes(cfg):
    """Adapter shapes per weight name, written out by hand from the spec (A [L,*I,r], B [L,r,*O])."""
    m, r = cfg.model, cfg.lora.rank
    L, D, N, K, F = m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim
    H, G = C.head_dim(m), m.num_heads // m.num_kv_heads
    return {"q": ((L, D, r), (L, r, N, H)), "k": ((L, D, r), (L, r, K, H)), "v": ((L, D, r), (L, r, K, H)),
            "o": ((L, N, H, r), (L, r, D)), "wqkv": ((L, D, r), (L, r, K, G + 2, H)),
            "gate": ((L, D, r), (L, r, F)), "up": ((L, D, r), (L, r, F)), "down": ((L, F, r), (L, r, D))}


@pytest.fixture(scope="module")
def cfg():
    return _cfg()


@pytest.fixture(scope="module")
def base(cfg):
    return _base(cfg)


def _tokens(cfg):
    return np.random.default_rng(3).integers(0, cfg.model.vocab_size, (2, 16)).astype(np.int32)


def _check_merge_against_numpy(cfg, base, expected_names):
    adapters = _random_adapters(cfg)
    merged = lora.merge(cfg, base, adapters)
    paths = lora.target_paths(cfg)
    assert [p[-1] for p in paths] == list(expected_names)
    shapes = _expected_shapes(cfg)
    s = cfg.lora.alpha / cfg.lora.rank
    for path in paths:
        name = path[-1]
        a, b = _get(adapters, path)["a"], _get(adapters, path)["b"]
        assert (a.shape, b.shape) == shapes[name], name
        want = _np_merged(_get(base, path), a, b, _n_in(name), s)
        got = _get(merged, path)
        assert got.dtype == _get(base, path).dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.abs(want - np.asarray(_get(base, path))).max() > 1e-3, name  # the adapter did something
    # every other leaf is the very same object as in the base
    for path, leaf in _leaves_with_paths(base):
        if path not in paths:
            assert _get(merged, path) is leaf, path
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    # jitting the merge changes nothing
    jitted = jax.jit(lambda p, ad: lora.merge(cfg, p, ad))(base, adapters)
    for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(merged)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


# (1) a fresh adapter is the identity ------------------------------------------------------------------------


def test_fresh_adapter_merges_to_the_base_exactly(cfg, base):
    adapters = lora.init(cfg, jax.random.key(1))
    for path in lora.target_paths(cfg):
        a, b = _get(adapters, path)["a"], _get(adapters, path)["b"]
        assert a.dtype == b.dtype == jnp.float32
        assert not np.any(np.asarray(b)) and np.any(np.asarray(a))
        fan_in = math.prod(a.shape[1:-1])
        assert np.abs(np.asarray(a)).max() <= 1.0 / math.sqrt(fan_in)
    merged = lora.merge(cfg, base, adapters)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
        np.testing.assert_array_equal(x, y)
    fwd = jax.jit(lambda p: model.apply(cfg, p, _tokens(cfg)))
    np.testing.assert_array_equal(fwd(merged), fwd(base))


def test_init_is_random_per_layer_and_key(cfg):
    a1 = lora.init(cfg, jax.random.key(5))
    a2 = lora.init(cfg, jax.random.key(6))
    q1 = np.asarray(a1["layers"]["attn"]["q"]["a"])
    assert not np.array_equal(q1[0], q1[1])  # layers get different A
    assert not np.array_equal(q1, np.asarray(a2["layers"]["attn"]["q"]["a"]))
    # near-uniform on [-1/sqrt(fan_in), 1/sqrt(fan_in)]: mean ~0, spread ~bound/sqrt(3)
    down = np.asarray(a1["layers"]["mlp"]["down"]["a"]) * math.sqrt(cfg.model.mlp_dim)
    assert abs(down.mean()) < 0.1 and 0.5 < down.std() * math.sqrt(3) < 1.1


# (2), (3) merge equals W + scale * A @ B --------------------------------------------------------------------


def test_merge_matches_numpy_for_every_target(cfg, base):
    _check_merge_against_numpy(cfg, base, ("k", "o", "q", "v", "down", "gate", "up"))


def test_merge_with_a_subset_of_targets(base):
    cfg = _cfg(**{"lora.targets": ("v", "o", "up"), "lora.rank": 3, "lora.alpha": 5.0})
    _check_merge_against_numpy(cfg, base, ("o", "v", "up"))


def test_merge_matches_numpy_for_fused_qkv():
    cfg = _cfg(**{"model.fused_qkv": True, "lora.targets": ("q", "k", "v", "o", "down")})
    base = _base(cfg)
    assert lora.target_paths(cfg) == [("layers", "attn", "o"), ("layers", "attn", "wqkv"), ("layers", "mlp", "down")]
    _check_merge_against_numpy(cfg, base, ("o", "wqkv", "down"))
    # naming only one of q/k/v still adapts the whole fused projection; "wqkv" may be named directly
    for targets in (("k",), ("wqkv",)):
        assert lora.target_paths(C.override(cfg, **{"lora.targets": targets})) == [("layers", "attn", "wqkv")]


def test_merge_casts_the_delta_to_the_base_dtype():
    cfg = _cfg(**{"model.param_dtype": "bfloat16", "lora.targets": ("q", "o")})
    base = _base(cfg)
    adapters = _random_adapters(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adapters))
    merged = lora.merge(cfg, base, adapters)
    assert jax.tree.map(lambda x: x.dtype, merged) == jax.tree.map(lambda x: x.dtype, base)
    path = ("layers", "attn", "o")
    want = _np_merged(_get(base, path), _get(adapters, path)["a"], _get(adapters, path)["b"], 2, 2.0)
    np.testing.assert_allclose(np.asarray(_get(merged, path), np.float64), want, rtol=2e-2, atol=2e-2)


# (4) gradients through merge and the model -------------------------------------------------------------------


# Gemma 3's switches (Gemma Team 2025): its extra norms are not adapter targets, its projections are.
GEMMA3 = {"model.qk_norm": True, "model.norm_zero_centered": True, "model.post_norms": True,
          "model.mlp_activation": "gelu_tanh", "model.scale_embeddings": True, "model.head_dim": 12,
          "model.query_pre_attn_scalar": 16.0, "model.sliding_window": 4, "model.global_every": 2,
          "model.local_rope_theta": 1e4, "model.rope_theta": 1e6, "model.tie_embeddings": True}


def test_gemma3_merge_matches_numpy_and_a_fresh_adapter_is_the_base():
    cfg = _cfg(**GEMMA3)
    base = _base(cfg)
    assert "attn_post_norm" in base["layers"] and "mlp_post_norm" in base["layers"]
    _check_merge_against_numpy(cfg, base, ("k", "o", "q", "v", "down", "gate", "up"))
    merged = lora.merge(cfg, base, lora.init(cfg, jax.random.key(1)))
    fwd = jax.jit(lambda p: model.apply(cfg, p, _tokens(cfg)))
    np.testing.assert_array_equal(fwd(merged), fwd(base))


@pytest.mark.parametrize("extra", [{}, GEMMA3], ids=["llama", "gemma3"])
def test_adapter_gradient_is_the_chain_rule(extra):
    cfg = _cfg(**extra)
    base = _base(cfg)
    adapters = _random_adapters(cfg, seed=4)
    tokens = _tokens(cfg)

    def loss(params):
        logits = model.apply(cfg, params, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    @jax.jit
    def grads(ad):
        g_ad = jax.grad(lambda x: loss(lora.merge(cfg, base, x)))(ad)  # what a LoRA trainer differentiates
        g_w = jax.grad(loss)(lora.merge(cfg, base, ad))  # dL/dW' at the merged weights
        return g_ad, g_w

    g_adapters, g_full = grads(adapters)
    assert jax.tree.structure(g_adapters) == jax.tree.structure(adapters)
    s = cfg.lora.alpha / cfg.lora.rank
    for path in lora.target_paths(cfg):
        n_in = _n_in(path[-1])
        a, b = _get(adapters, path)["a"], _get(adapters, path)["b"]
        dw = _as_matrices(_get(g_full, path), n_in)  # [L, I, O]
        a2 = np.asarray(a, np.float64).reshape(a.shape[0], -1, a.shape[-1])  # [L, I, r]
        b2 = np.asarray(b, np.float64).reshape(b.shape[0], b.shape[1], -1)  # [L, r, O]
        want_da = (s * dw @ np.swapaxes(b2, 1, 2)).reshape(a.shape)
        want_db = (s * np.swapaxes(a2, 1, 2) @ dw).reshape(b.shape)
        got = _get(g_adapters, path)
        for which, want in (("a", want_da), ("b", want_db)):
            assert np.abs(want).max() > 0, (path, which)
            np.testing.assert_allclose(np.asarray(got[which], np.float64), want, rtol=1e-3,
                                       atol=1e-4 * np.abs(want).max(), err_msg=f"{path} {which}")


# (5) shardings via logical axis names ------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_logical_axes_follow_the_base_weights(fused):
    cfg = _cfg(**{"model.fused_qkv": fused, "lora.targets": ALL})
    axes = lora.logical_axes(cfg)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_spec) == jax.tree.structure(lora.abstract(cfg))
    shapes = lora.abstract(cfg)
    base_axes = model.logical_axes(cfg)
    for path in lora.target_paths(cfg):
        n_in = _n_in(path[-1])
        w_mesh = tuple(nn.logical_to_mesh_axes(_get(base_axes, path), C.DEFAULT_RULES))
        a_spec, b_spec = _get(axes, path)["a"], _get(axes, path)["b"]
        assert len(a_spec) == len(_get(shapes, path)["a"].shape) and len(b_spec) == len(_get(shapes, path)["b"].shape)
        a_mesh = tuple(nn.logical_to_mesh_axes(a_spec, C.DEFAULT_RULES))
        b_mesh = tuple(nn.logical_to_mesh_axes(b_spec, C.DEFAULT_RULES))
        assert a_mesh == (w_mesh[0], *w_mesh[1:1 + n_in], None), path
        assert b_mesh == (w_mesh[0], None, *w_mesh[1 + n_in:]), path
        assert a_spec[-1] is None and b_spec[1] is None
    # concretely, e.g. q's A shards its D dim over fsdp and B its heads over tensor (both their layers over the
    # pipeline's stages, as the base's)
    if not fused:
        assert tuple(nn.logical_to_mesh_axes(axes["layers"]["attn"]["q"]["a"], C.DEFAULT_RULES)) == (
            "pipeline", "fsdp", None)
        assert tuple(nn.logical_to_mesh_axes(axes["layers"]["attn"]["q"]["b"], C.DEFAULT_RULES)) == (
            "pipeline", None, "tensor", None)


# (6) parameter counts ----------------------------------------------------------------------------------------


def test_num_params_for_tiny_at_rank_8():
    cfg = C.validate(C.override(C.load_config_file(TINY), **{"lora.rank": 8}))
    assert tuple(cfg.lora.targets) == ALL  # the default: all seven projections
    n = lora.num_params(cfg)
    adapters = lora.init(cfg, jax.random.key(0))
    assert n == sum(x.size for x in jax.tree.leaves(adapters))
    assert n == sum(math.prod(s.shape) for s in jax.tree.leaves(lora.abstract(cfg)))
    # by hand: L * r * sum over projections of (in + out) with L=3, D=128, N=4, K=2, H=32, F=256
    L, r, D, N, K, H, F = 3, 8, 128, 4, 2, 32, 256
    assert n == L * r * ((D + N * H) + 2 * (D + K * H) + (N * H + D) + 2 * (D + F) + (F + D))
    full = C.num_params(cfg)
    # 49,152 / 967,552 = 5.08%: a 128-wide model is so narrow that r=8 is a sizeable fraction of it.
    assert n / full < 0.06
    # at rank 4 it is comfortably below 5%
    assert lora.num_params(C.override(cfg, **{"lora.rank": 4})) / full < 0.05


def test_scale(cfg):
    assert lora.scale(cfg) == 2.0
    assert lora.scale(C.override(cfg, **{"lora.rank": 16, "lora.alpha": 32.0})) == 2.0


# (7) disabled / invalid --------------------------------------------------------------------------------------


def test_rank_zero_and_bad_targets_raise(cfg):
    off = C.override(cfg, **{"lora.rank": 0})
    C.validate(off)  # rank 0 is a valid config: LoRA disabled
    for fn in (lora.target_paths, lora.abstract, lora.logical_axes, lora.num_params, lora.scale):
        with pytest.raises(ValueError, match="lora.rank"):
            fn(off)
    with pytest.raises(ValueError, match="lora.rank"):
        lora.init(off, jax.random.key(0))
    with pytest.raises(ValueError, match="lora.rank"):
        lora.merge(off, {}, {})
    with pytest.raises(ValueError, match="lora.rank"):
        C.validate(C.override(cfg, **{"lora.rank": -1}))
    for targets in (("wqkv",), ("q", "nope"), ()):
        bad = C.override(cfg, **{"lora.targets": targets})
        with pytest.raises(ValueError, match="lora.targets"):
            C.validate(bad)
        with pytest.raises(ValueError, match="lora.targets"):
            lora.target_paths(bad)


def test_merge_rejects_mismatched_adapters(cfg, base):
    adapters = lora.init(cfg, jax.random.key(0))
    fewer = C.override(cfg, **{"lora.targets": ("q",)})
    with pytest.raises(ValueError, match="adapter tree"):
        lora.merge(fewer, base, adapters)
    wrong_rank = C.override(cfg, **{"lora.rank": 2})
    with pytest.raises(ValueError, match="do not fit"):
        lora.merge(wrong_rank, base, adapters)


def test_lm_head_target_and_trainable_token_rows_match_numpy(base):
    """The untied LM head as a target (A [1,D,r], B [1,r,V]) and the trainable rows of `lora.token_ids`:
    embedding rows and head columns move by their deltas, nothing else in those matrices does."""
    cfg = _cfg(**{"lora.targets": ("q", "lm_head"), "lora.token_ids": (3, 9)})
    adapters = _random_adapters(cfg)
    assert adapters["lm_head"]["a"].shape == (1, 32, 4) and adapters["lm_head"]["b"].shape == (1, 4, 64)
    assert adapters["tokens"]["embedding"].shape == (2, 32) and adapters["tokens"]["lm_head"].shape == (32, 2)
    merged = jax.jit(lambda b, a: lora.merge(cfg, b, a))(base, adapters)
    s = cfg.lora.alpha / cfg.lora.rank
    head = np.asarray(base["lm_head"], np.float64) + s * (np.asarray(adapters["lm_head"]["a"][0], np.float64)
                                                           @ np.asarray(adapters["lm_head"]["b"][0], np.float64))
    head[:, [3, 9]] += np.asarray(adapters["tokens"]["lm_head"], np.float64)
    np.testing.assert_allclose(np.asarray(merged["lm_head"]), head, rtol=1e-5, atol=1e-6)
    emb = np.asarray(base["embedding"], np.float64).copy()
    emb[[3, 9]] += np.asarray(adapters["tokens"]["embedding"], np.float64)
    np.testing.assert_allclose(np.asarray(merged["embedding"]), emb, rtol=1e-6, atol=1e-7)
    axes = lora.logical_axes(cfg)
    assert axes["lm_head"] == {"a": PartitionSpec(None, "embed", None), "b": PartitionSpec(None, None, "vocab")}
    assert axes["tokens"] == {"embedding": PartitionSpec(None, "embed"), "lm_head": PartitionSpec("embed", None)}
    assert lora.num_params(cfg) == sum(x.size for x in jax.tree.leaves(adapters))
    with pytest.raises(ValueError, match="token rows"):
        lora.merge(_cfg(**{"lora.targets": ("q", "lm_head")}), base, adapters)
    with pytest.raises(C.ConfigError, match="lora.targets"):
        C.validate(C.override(cfg, **{"model.tie_embeddings": True, "lora.token_ids": ()}))
