"""The Pallas flash-attention kernels against the float32 jnp reference, run by the Pallas interpreter.

Both kernel families (GPU/Triton and TPU/Mosaic) run here on CPU with `interpret=True`, so these tests
exercise the kernel bodies a GPU or TPU compiles; `test_lowers_for_*` additionally lowers each family
for its real platform (Triton IR, Mosaic module) to catch constructs that only the interpreter accepts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import BlockSizes, flash_attention, mha_reference

SMALL = BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)
SQUARE = BlockSizes(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=32)


def _inputs(b, t, s, n, k, h, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32).astype(dtype)
    kk = jax.random.normal(ks[1], (b, s, k, h), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, k, h), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, n, h), jnp.float32).astype(dtype)
    return q, kk, v, do


def _packed_segments(b, length, cuts):
    """Segments 1, 2, ... changing at `cuts` (deliberately mid-block), then a padding tail of zeros."""
    ids = np.zeros((b, length), np.int32)
    bounds = [0, *cuts]
    for sid, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        ids[:, lo:hi] = sid
    ids[1:, : cuts[0] // 2] = 7  # rows of the batch differ
    return jnp.asarray(ids)


def _compare(*, backend, causal, n, k, t=64, s=None, h=64, segments=False, blocks=SMALL,
             dtype=jnp.float32, q_offset=0, window=0):
    s = t if s is None else s
    b = 2
    q, kk, v, do = _inputs(b, t, s, n, k, h, dtype)
    if segments:
        q_seg = _packed_segments(b, t, [t // 3, t - 5])
        kv_seg = q_seg if s == t else _packed_segments(b, s, [s // 3, s - 5])
        seg_arg = (q_seg, kv_seg)
    else:
        q_seg, kv_seg, seg_arg = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32), None

    def flash(q, kk, v):
        return flash_attention(q, kk, v, causal=causal, segment_ids=seg_arg, block_sizes=blocks, backend=backend,
                               q_offset=q_offset, window=window)

    def ref(q, kk, v):
        return mha_reference(q, kk, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal,
                             q_offset=q_offset, window=window)

    f32 = lambda x: x.astype(jnp.float32)
    out, vjp = jax.vjp(flash, q, kk, v)
    want, ref_vjp = jax.vjp(ref, f32(q), f32(kk), f32(v))
    _check_against_reference((out, *vjp(do)), (want, *ref_vjp(f32(do))), dtype)


def _check_against_reference(got, expected, dtype) -> None:
    """(out, dq, dk, dv) of a kernel against the float32 reference's, within the dtype's tolerance."""
    f32 = lambda x: x.astype(jnp.float32)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        err = float(jnp.max(jnp.abs(f32(a) - e)))
        if dtype == jnp.float32 and jax.default_backend() == "gpu":
            # Compiled for a GPU, Triton's float32 dots run in TF32 (10-bit mantissa): ~3e-4 of the norm -- of
            # the gradient, or of the output where that is larger (a window of 1 makes dq exactly 0, and
            # TF32's cancellation noise scales with the terms, not with that 0).
            scale = max(float(jnp.linalg.norm(e)), float(jnp.linalg.norm(expected[0])))
            rel = float(jnp.linalg.norm(f32(a) - e)) / scale
            assert rel <= 2e-3, f"{name}: relative error {rel:.2e} (TF32)"
        elif dtype == jnp.float32:
            assert err <= 2e-5, f"{name}: max abs error {err:.2e}"
        else:
            scale = float(jnp.max(jnp.abs(e)))
            assert err <= 2e-2 * scale, f"{name}: error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("causal", [True, False])
# MHA (G=1) and groups of 4 over 2 kv heads run by default; G=2 runs by default at a small size
# (`test_grouped_query_heads`); the other shapes join with -m slow (test-time budget).
@pytest.mark.parametrize("n,k", [(2, 2), pytest.param(4, 2, marks=pytest.mark.slow),
                                 pytest.param(4, 1, marks=pytest.mark.slow), (8, 2),
                                 pytest.param(8, 1, marks=pytest.mark.slow)])
def test_heads_and_masks(backend, causal, n, k):
    _compare(backend=backend, causal=causal, n=n, k=k)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_grouped_query_heads(backend):
    """Groups of 2 query heads over 2 kv heads, small: with K > 1 and G > 1 a wrong head-to-kv-head map
    (n % K instead of n // G) changes the output, which neither MHA nor a single kv head can show."""
    _compare(backend=backend, causal=True, n=4, k=2, t=32, h=16, segments=True)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("blocks", [SMALL, SQUARE], ids=["32x16", "32x32"])
def test_packed_segments(backend, causal, blocks):
    _compare(backend=backend, causal=causal, n=4, k=2, segments=True, blocks=blocks)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("segments", [False, True])
def test_cross_attention_lengths(backend, segments):
    _compare(backend=backend, causal=False, n=4, k=2, t=64, s=96, segments=segments)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("segments", [False, True])
def test_causal_queries_at_an_offset(backend, segments):
    # A sequence shard: 32 queries at slots 48..79 against all 96 keys (the offset is traced, as under
    # shard_map where it comes from the device's index on the sequence axis).
    _compare(backend=backend, causal=True, n=4, k=2, t=32, s=96, segments=segments, q_offset=jnp.int32(48))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("window,segments", [(1, False), (8, True), (18, False), (40, False), (40, True)])
def test_sliding_window(backend, window, segments):
    """Mistral's window, narrower than a tile (1: each query sees only itself; 8), with its edge on a tile's
    last key (18: the forward's 32-row tiles reach back to slot 15, the last of a 16-wide key tile), and
    spanning several (40 over 16- and 32-wide tiles), with packed segments ending mid-tile: forward and
    gradients."""
    _compare(backend=backend, causal=True, n=4, k=2, t=96, segments=segments, window=window)


# Windows whose edge falls on a tile's last key (18: rows 16, 48 see back to slots -1, 31) as well as between.
@pytest.mark.parametrize("window,offset", [(1, 0), (18, 0), (24, 0), (100, 0), (24, 48), (50, 16), (64, 16)])
def test_window_tile_skipping_is_exact(window, offset):
    """The window's tile bounds against the reference mask, tile by tile: every key tile before
    `window_kv_start` (and every query tile from `window_q_end` on) sees nothing, the first tile kept sees
    something, and `tile_kind` calls exactly the tiles the window or the diagonal cuts "needs the mask".
    The kernels therefore do O(T x window) work, not O(T^2)."""
    from kernels import blocks
    from kernels.reference import attention_mask

    t, s, bq, bk = 64, 160, 16, 32
    ones = lambda n: jnp.ones((1, n), jnp.int32)
    mask = np.asarray(attention_mask(ones(t), ones(s), causal=True, q_offset=offset, window=window))[0]
    tiles = mask.reshape(t // bq, bq, s // bk, bk).transpose(0, 2, 1, 3)  # [query tile, key tile, bq, bk]
    for i in range(t // bq):
        start = int(blocks.window_kv_start(i, bq, bk, window, offset))
        assert not tiles[i, :start].any() and tiles[i, start].any()
        for j in range(s // bk):
            visible, needs_mask = (bool(x) for x in blocks.tile_kind(i, j, bq, bk, offset, window))
            assert visible == tiles[i, j].any() and (not visible or needs_mask == (not tiles[i, j].all()))
    for j in range(s // bk):
        end = int(blocks.window_q_end(j, bq, bk, t // bq, window, offset))
        assert not tiles[end:, j].any() and (end == 0 or tiles[end - 1, j].any() or not tiles[:, j].any())
    visited = sum(int(blocks.kv_ranges(i, bq, bk, s // bk, causal=True, masked_everywhere=False, q_offset=offset)[1])
                  - int(blocks.window_kv_start(i, bq, bk, window, offset)) for i in range(t // bq))
    assert visited == int(tiles.any(axis=(2, 3)).sum())  # no tile outside the window is visited


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_window_chosen_per_layer_under_cond_in_a_scan(backend):
    """Gemma 3's local and global layers (Gemma Team 2025, "Gemma 3 Technical Report") as the decoder runs
    them: a `lax.scan` over layers in which a traced flag picks, by `lax.cond`, the kernel compiled with the
    window or the one without, at a logit scale of its own (query_pre_attn_scalar^-0.5). Output and
    gradients equal the reference given each layer's window statically."""
    b, t, n, k, h, window, scale = 1, 48, 2, 1, 32, 12, 0.2
    local = np.array([True, False])
    q, kk, v, do = (jnp.stack(x) for x in zip(*(_inputs(b, t, t, n, k, h, jnp.float32, seed=i) for i in range(2))))
    seg = _packed_segments(b, t, [t // 3, t - 5])

    def kernel(w):
        return lambda q, kk, v: flash_attention(q, kk, v, causal=True, segment_ids=seg, block_sizes=SMALL,
                                                backend=backend, sm_scale=scale, window=w)

    def scanned(q, kk, v):
        def layer(carry, xs):
            is_local, *qkv = xs
            return carry, jax.lax.cond(is_local, kernel(window), kernel(0), *qkv)
        return jax.lax.scan(layer, None, (jnp.asarray(local), q, kk, v))[1]

    def ref(q, kk, v):
        return jnp.stack([mha_reference(q[i], kk[i], v[i], q_segment_ids=seg, kv_segment_ids=seg, causal=True,
                                        sm_scale=scale, window=window if local[i] else 0) for i in range(2)])

    out, vjp = jax.vjp(scanned, q, kk, v)
    want, ref_vjp = jax.vjp(ref, q, kk, v)
    _check_against_reference((out, *vjp(do)), (want, *ref_vjp(do)), jnp.float32)
    assert float(jnp.max(jnp.abs(want[0] - mha_reference(q[0], kk[0], v[0], q_segment_ids=seg, kv_segment_ids=seg,
                                                           sm_scale=scale)))) > 1e-2  # the window matters


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_sliding_window_at_an_offset(backend):
    # A sequence shard's queries at slots 48..79 with a 24-slot window: key tiles before slot 25 are skipped.
    _compare(backend=backend, causal=True, n=4, k=2, t=32, s=96, q_offset=jnp.int32(48), window=24)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_causal_top_left_when_t_differs_from_s(backend):
    _compare(backend=backend, causal=True, n=4, k=1, t=48, s=80)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_head_dim_128_bfloat16(backend):
    _compare(backend=backend, causal=True, n=4, k=2, h=128, dtype=jnp.bfloat16, segments=True)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_bfloat16(backend):
    _compare(backend=backend, causal=True, n=8, k=2, dtype=jnp.bfloat16, blocks=SQUARE)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("t,s,causal", [(50, 50, True), (40, 72, False)])
def test_lengths_not_multiple_of_block(backend, t, s, causal):
    _compare(backend=backend, causal=causal, n=4, k=2, t=t, s=s)


def test_default_blocks_and_backend():
    # The stable-surface call: no backend, no blocks; on CPU it interprets the GPU kernels.
    q, kk, v, _ = _inputs(1, 48, 48, 2, 1, 64, jnp.float32)
    ones = jnp.ones((1, 48), jnp.int32)
    np.testing.assert_allclose(flash_attention(q, kk, v),
                               mha_reference(q, kk, v, q_segment_ids=ones, kv_segment_ids=ones), atol=2e-5)


def test_padding_query_outputs_zero():
    q, kk, v, _ = _inputs(1, 32, 32, 2, 2, 64, jnp.float32)
    seg = jnp.asarray([[1] * 20 + [0] * 12], jnp.int32)
    out = flash_attention(q, kk, v, segment_ids=seg, block_sizes=SQUARE)
    assert float(jnp.abs(out[:, 20:]).max()) == 0.0
    assert bool(jnp.isfinite(jax.grad(lambda q: flash_attention(q, kk, v, segment_ids=seg).sum())(q)).all())


def test_bad_arguments_raise_clear_errors():
    q, kk, v, _ = _inputs(1, 32, 48, 4, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="T == S"):
        flash_attention(q, kk, v, causal=False, segment_ids=jnp.ones((1, 32), jnp.int32))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q[:, :, :3], kk, v, causal=False)
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, kk, v, causal=False, backend="cuda")
    with pytest.raises(ValueError, match="powers of two"):
        flash_attention(q, kk, v, causal=False, block_sizes=BlockSizes(24, 32, 32, 32))
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_attention(q, q, q, block_sizes=BlockSizes(16, 32, 32, 32), backend="tpu", interpret=False)
    with pytest.raises(ValueError, match="segment ids"):
        flash_attention(q, kk, v, causal=False, segment_ids=(jnp.ones((1, 32)), jnp.ones((1, 32))))


def _export(backend, platform, *, causal, segments, q_offset=0):
    b, t, n, k, h = 2, 1024, 8, 2, 128
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, k, h), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, kk, v, seg):
        out = flash_attention(q, kk, v, causal=causal, segment_ids=seg if segments else None,
                              backend=backend, interpret=False, q_offset=q_offset)
        return out.astype(jnp.float32).sum()

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    # Triton kernels are compiled by XLA:GPU at load time, so the export must allow their custom call.
    unsafe = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(fn, platforms=[platform], disabled_checks=unsafe)(q, kv, kv, seg)
    return exported.mlir_module()


@pytest.mark.parametrize("causal,segments", [(True, False), (True, True), (False, False)])
def test_lowers_for_gpu(causal, segments):
    module = _export("gpu", "cuda", causal=causal, segments=segments)
    assert module.count("xla.gpu.triton") == 3  # forward, dK/dV, dQ


@pytest.mark.parametrize("causal,segments", [(True, False), (True, True), (False, False)])
def test_lowers_for_tpu(causal, segments):
    module = _export("tpu", "tpu", causal=causal, segments=segments)
    assert module.count("tpu_custom_call") == 3
