"""Decoder invariants not covered by the Hugging Face parity tests (tests/test_convert.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from kernels import reference
from maxlm import config as C
from maxlm.model import attention
from maxlm.model import decoder as model


def _cfg(**extra):
    return C.validate(C.override(C.default_config(), **{
        "model.vocab_size": 97, "model.num_layers": 3, "model.d_model": 32, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 48, "model.compute_dtype": "float32", "model.max_seq_len": 64,
        "data.seq_len": 16, **extra}))


@pytest.fixture(scope="module")
def params():
    return jax.jit(lambda k: model.init(_cfg(), k))(jax.random.key(1))


def _tokens():
    return jax.random.randint(jax.random.key(2), (2, 16), 0, 97)


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full"), (False, "dots"), (True, "save_attention_out")])
def test_scan_and_remat_keep_the_tree_and_the_math(params, scan, remat):
    base, variant = _cfg(), _cfg(**{"model.scan_layers": scan, "model.remat_policy": remat})
    assert jax.tree.structure(model.abstract_params(variant)) == jax.tree.structure(params)

    def loss(cfg):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply(cfg, p, _tokens()) ** 2)))

    (l0, g0), (l1, g1) = loss(base)(params), loss(variant)(params)
    assert abs(float(l0) - float(l1)) < 1e-6
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_every_parameter_has_logical_axes():
    for fused in (False, True):
        cfg = _cfg(**{"model.fused_qkv": fused, "model.qkv_bias": True})
        shapes = model.abstract_params(cfg)
        axes = model.logical_axes(cfg)
        flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
        for shape, spec in zip(jax.tree.leaves(shapes), flat_axes):
            assert len(spec) == len(shape.shape) and all(isinstance(n, str) for n in spec), spec
        rule_names = {name for name, _ in cfg.mesh.rules}
        assert {n for spec in flat_axes for n in spec} <= rule_names


def _numpy_attention(q, k, v, seg, causal=True):
    """Naive per-head attention with explicitly repeated K/V heads (HF `repeat_kv`), in float64."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    k = np.repeat(k, g, axis=2)
    v = np.repeat(v, g, axis=2)
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for ni in range(n):
            s = q[bi, :, ni] @ k[bi, :, ni].T / np.sqrt(h)
            allowed = (seg[bi][:, None] == seg[bi][None, :]) & (seg[bi][None, :] != 0)
            if causal:
                allowed &= np.tril(np.ones((t, t), bool))
            s = np.where(allowed, s, -1e30)
            p = np.exp(s - s.max(-1, keepdims=True)) * allowed
            p = p / np.maximum(p.sum(-1, keepdims=True), 1e-30)
            out[bi, :, ni] = p @ v[bi, :, ni]
    return out


def test_reference_attention_matches_numpy():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 12, n, 8)) for n in (6, 2, 2))
    seg = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    out = reference.mha_reference(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), q_segment_ids=jnp.asarray(seg),
                                  kv_segment_ids=jnp.asarray(seg))
    expected = _numpy_attention(q, k, v, seg)
    # Padding queries (segment 0) see no key and output zeros, as the numpy oracle's all-masked rows do.
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


@pytest.mark.parametrize("scaling,factor", [("none", 1.0), ("linear", 4.0), ("ntk", 4.0), ("ntk", 2.5)])
def test_rope_closed_form(scaling, factor):
    """`rope` against rotations written out in numpy: pair (i, i + H/2) turns by p * 10000^(-2i/H); linear divides p by
    the factor; static NTK-aware scaling (bloc97) by its defining property, the log-frequencies interpolated from the
    fastest pair's kept intact to the slowest pair's divided by exactly `factor` (frequency i / factor^(i/(H/2-1)))."""
    h = 8
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 2, h))
    pos = np.array([[0, 1, 7, 100, 3000]])
    out = attention.rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), theta=10000.0, scaling=scaling, factor=factor)
    p = pos / factor if scaling == "linear" else pos
    expected = np.empty_like(x)
    for i in range(h // 2):  # pairs (i, i + 4) rotate together: "rotate half" layout
        freq = 10000.0 ** (-2 * i / h)
        if scaling == "ntk":
            freq /= factor ** (i / (h // 2 - 1))
        ang = p[..., None] * freq
        a, b = x[..., i], x[..., i + h // 2]
        expected[..., i] = a * np.cos(ang) - b * np.sin(ang)
        expected[..., i + h // 2] = b * np.cos(ang) + a * np.sin(ang)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-4)


def test_bfloat16_compute_tracks_float32(params):
    f32 = model.apply(_cfg(), params, _tokens())
    bf16 = model.apply(_cfg(**{"model.compute_dtype": "bfloat16"}), params, _tokens())
    assert bf16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.05
    assert float(jnp.mean(jnp.argmax(bf16, -1) == jnp.argmax(f32, -1))) > 0.9


def test_documents_in_a_packed_row_do_not_interact(params):
    tokens = _tokens()
    seg = jnp.array([[1] * 6 + [2] * 10] * 2)
    pos = jnp.array([list(range(6)) + list(range(10))] * 2)
    packed = model.apply(_cfg(), params, tokens, positions=pos, segment_ids=seg)
    alone = model.apply(_cfg(), params, tokens[:, 6:])
    np.testing.assert_allclose(packed[:, 6:], alone, atol=1e-5)
    changed = tokens.at[:, :6].set(0)  # editing document 1 leaves document 2's logits unchanged
    np.testing.assert_allclose(model.apply(_cfg(), params, changed, positions=pos, segment_ids=seg)[:, 6:],
                               packed[:, 6:], atol=1e-6)


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full")])
def test_pallas_attention_matches_xla_loss_and_grads(params, scan, remat):
    # The Pallas flash kernel (interpreted on CPU) inside the full model: same loss, same gradients,
    # on a packed batch with a padding tail (segment 0) so every masking path is exercised.
    from maxlm.training.pretrain import loss_fn

    tokens = jax.random.randint(jax.random.key(3), (2, 17), 0, 97)
    seg = jnp.array([[1] * 5 + [2] * 9 + [0] * 2, [3] * 16])
    pos = jnp.array([list(range(5)) + list(range(9)) + [0, 0], list(range(16))])
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
             "loss_weights": (seg > 0).astype(jnp.float32)}
    results = []
    for impl in ("xla", "pallas"):
        cfg = _cfg(**{"model.attention_impl": impl, "model.scan_layers": scan, "model.remat_policy": remat})
        results.append(jax.jit(jax.value_and_grad(lambda p: loss_fn(p, cfg, batch)[0]))(params))
    (l_xla, g_xla), (l_pallas, g_pallas) = results
    assert abs(float(l_xla) - float(l_pallas)) <= 1e-5 * abs(float(l_xla))
    for a, b in zip(jax.tree.leaves(g_xla), jax.tree.leaves(g_pallas)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_pallas_config_decodes_with_a_cache(params):
    # Cached decoding (queries at an offset into the cache) takes the XLA path under attention_impl=pallas;
    # prefill + one step must give the logits of a full forward pass.
    cfg = _cfg(**{"model.attention_impl": "pallas"})
    tokens = _tokens()
    full = model.apply(cfg, params, tokens)
    cache = model.init_cache(cfg, 2, 16)
    seg = jnp.ones((2, 15), jnp.int32)
    prefill, cache = model.decode(cfg, params, tokens[:, :15], cache, positions=jnp.arange(15)[None].repeat(2, 0),
                                  segment_ids=seg)
    step, _ = model.decode(cfg, params, tokens[:, 15:], cache, positions=jnp.full((2, 1), 15),
                           segment_ids=jnp.ones((2, 1), jnp.int32))
    np.testing.assert_allclose(prefill, full[:, :15], atol=2e-5)
    np.testing.assert_allclose(step[:, 0], full[:, 15], atol=2e-5)


def test_attention_mask_hand_built():
    """`reference.attention_mask` against boolean matrices written out by hand: same non-zero segment id (padding,
    id 0, sees nothing, not even other padding), key slot <= query slot, and slots offset by q_offset in decoding."""
    seg = jnp.array([[1, 1, 2, 2, 2, 0, 0]])
    causal = np.array([[1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0, 0],
                       [0, 0, 1, 1, 1, 0, 0],
                       [0, 0, 0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 0, 0, 0]], bool)
    full = np.array([[1, 1, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0, 0],
                     [0, 0, 1, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(reference.attention_mask(seg, seg, causal=True), causal[None])
    np.testing.assert_array_equal(reference.attention_mask(seg, seg, causal=False), full[None])
    # Left padding, and two new tokens of segment 2 decoded at cache slots 3 and 4 of 6 (slot 5 still empty).
    left = jnp.array([[0, 0, 1, 1]])
    np.testing.assert_array_equal(reference.attention_mask(left, left, causal=True),
                                  np.array([[[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]], bool))
    cache = jnp.array([[1, 2, 2, 2, 2, 0]])
    np.testing.assert_array_equal(reference.attention_mask(jnp.array([[2, 2]]), cache, causal=True, q_offset=3),
                                  np.array([[[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]]], bool))


def test_padding_neither_leaks_into_nor_reads_from_the_row(params):
    """Model logits of one 8-token document right-padded, left-padded (positions restarting at 0) and unpadded (the
    row's last 4 slots hold a continuation, which causality hides) agree; and a padding slot attends to nothing,
    so its logits depend on its own token only (other tokens changed, other slot, same logits)."""
    cfg = _cfg()
    doc, other = jax.random.randint(jax.random.key(4), (2, 8), 3, 97)
    pads = jnp.array([5, 6, 7, 9])
    tokens = jnp.stack([jnp.concatenate([doc, pads]), jnp.concatenate([pads[::-1], doc]),
                        jnp.concatenate([other, pads[::-1]]), jnp.concatenate([doc, other[:4]])])
    seg = jnp.array([[1] * 8 + [0] * 4, [0] * 4 + [1] * 8, [1] * 8 + [0] * 4, [1] * 12])
    pos = jnp.array([list(range(8)) + [0] * 4, [0] * 4 + list(range(8)), list(range(8)) + [0] * 4, list(range(12))])
    logits = np.asarray(jax.jit(lambda p: model.apply(cfg, p, tokens, positions=pos, segment_ids=seg))(params))
    alone = logits[3, :8]
    np.testing.assert_allclose(logits[0, :8], alone, atol=1e-5)
    np.testing.assert_allclose(logits[1, 4:], alone, atol=1e-5)
    # Token 9 sits in slot 11 of row 0 (after 3 pads), slot 0 of row 1 and slot 8 of row 2 (after `other`).
    np.testing.assert_allclose(logits[1, 0], logits[0, 11], atol=1e-5)
    np.testing.assert_allclose(logits[2, 8], logits[0, 11], atol=1e-5)
    assert np.abs(logits[0, 11] - logits[0, 10]).max() > 1e-3  # a different token: different logits
