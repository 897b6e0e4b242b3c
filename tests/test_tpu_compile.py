"""Mosaic kernels and the train step compiled by libtpu for real TPU generations, on this CPU.

`tests/test_flash_attention.py` runs the TPU kernel bodies in the Pallas interpreter and lowers them to a
Mosaic module; here libtpu compiles them (Mosaic's own checks of tiles, layouts and VMEM included) for the
devices of `jax.experimental.topologies`, so a kernel that only the interpreter accepts fails in CI.
Needs the `tpu` extra (`pip install -e '.[tpu]'`); marked `tpu` and skipped without libtpu.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import kernels
from kernels import flash_tpu, mha_reference
from maxlm import config as config_lib
from maxlm.training import aot

pytestmark = [pytest.mark.tpu,
              pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="needs libtpu: pip install -e '.[tpu]'")]

GENERATIONS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
VMEM_BUSTING_TILE = {"v5e": 2048, "v5p": 2048}  # v6e's larger VMEM needs 4096-wide tiles: ~40 s of compile


def _device(generation: str):
    return aot.get_topology(GENERATIONS[generation]).devices[0]


def _abstract(device, *shapes_dtypes):
    sharding = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
    return [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in shapes_dtypes]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_flash_forward_backward_compile(generation, head_dim):
    """Forward + backward (three Mosaic kernels), causal, GQA (8 query heads on 2 kv heads), packed segments,
    a sequence that is not a whole number of tiles, bf16."""
    b, t, n, k = 2, 1000, 8, 2

    def loss(q, kk, v, seg):
        out = kernels.flash_attention(q, kk, v, causal=True, segment_ids=seg)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    args = _abstract(_device(generation), ((b, t, n, head_dim), jnp.bfloat16), ((b, t, k, head_dim), jnp.bfloat16),
                     ((b, t, k, head_dim), jnp.bfloat16), ((b, t), jnp.int32))
    with kernels.compile_target("tpu"):
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args)
    assert lowered.as_text().count("tpu_custom_call") == 3
    compiled = lowered.compile()
    assert compiled.as_text().count("custom_call_target=\"tpu_custom_call\"") == 3
    assert compiled.memory_analysis().argument_size_in_bytes >= 3 * b * t * k * head_dim * 2
    # The kernels' cost estimate reaches XLA's cost analysis (a custom call is otherwise free to it).
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    pairs = b * n * 1024 * 1024 // 2  # padded to two 512-tiles, causal
    assert cost["flops"] >= 2 * (2 + 4 + 3) * pairs * head_dim


def _forward(block: int, interpret: bool, h: int = 128):
    return lambda q, k, v, off: flash_tpu.forward(q, k, v, None, None, off, causal=True, sm_scale=h ** -0.5,
                                                  block_q=block, block_k=block, interpret=interpret)[0]


@pytest.mark.parametrize("generation", list(VMEM_BUSTING_TILE))
def test_tiles_too_large_for_vmem_fail_to_compile_though_the_interpreter_accepts_them(generation):
    """Whole-sequence 2048-wide tiles: legal block shapes (Pallas lowers them to a Mosaic module), and the
    interpreter computes the right answer; but a float32 score tile alone is 16 MiB, and libtpu's compile runs
    out of VMEM (v6e's is larger: 4096-wide tiles fail there too, measured, but cost 40 s to compile).
    512-wide tiles, the default, compile."""
    b, t, n, h = 1, VMEM_BUSTING_TILE[generation], 1, 128
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(3))
    ones = jnp.ones((b, t), jnp.int32)
    out = _forward(t, interpret=True)(q, k, v, jnp.zeros((1,), jnp.int32))
    want = mha_reference(q, k, v, q_segment_ids=ones, kv_segment_ids=ones, causal=True)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    args = _abstract(_device(generation), *[((b, t, n, h), jnp.float32)] * 3, ((1,), jnp.int32))
    jax.jit(_forward(512, interpret=False)).lower(*args).compile()
    lowered = jax.jit(_forward(t, interpret=False)).lower(*args)
    assert "tpu_custom_call" in lowered.as_text()
    with pytest.raises(Exception, match="(?i)vmem"):
        lowered.compile()


@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_tiles_narrower_than_a_lane_row_are_refused_for_tpu(generation):
    """A 64-wide query tile makes the saved log-sum-exp rows [1, 64], less than one 128-lane row: the
    interpreter accepts it, the TPU lowering does not."""
    b, t, n, h = 1, 256, 2, 128
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(3))
    ones = jnp.ones((b, t), jnp.int32)
    call = lambda q, k, v, off, interpret: flash_tpu.forward(q, k, v, None, None, off, causal=True, sm_scale=h ** -0.5,
                                                            block_q=64, block_k=128, interpret=interpret)[0]
    out = call(q, k, v, jnp.zeros((1,), jnp.int32), True)
    want = mha_reference(q, k, v, q_segment_ids=ones, kv_segment_ids=ones, causal=True)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    args = _abstract(_device(generation), *[((b, t, n, h), jnp.float32)] * 3, ((1,), jnp.int32))
    with pytest.raises(Exception, match="divisible by 8 and 128"):
        jax.jit(lambda *a: call(*a, False)).lower(*args).compile()


def test_train_step_with_pallas_attention_compiles():
    """The trainer's step with `attention_impl=pallas` on v5p-8 (4 chips, fsdp): the flash kernels inside the
    per-device `shard_map`, compiled by libtpu; fits, with its memory, FLOPs and collectives read back."""
    config = config_lib.override(config_lib.load_config_file("configs/tiny.py"), **{
        "model.attention_impl": "pallas", "model.compute_dtype": "bfloat16", "data.seq_len": 256,
        "data.batch_size": 8, "mesh.data": 1, "mesh.fsdp": -1})
    topology = aot.get_topology("v5p-8")
    report = aot.run(config, topology, "train")
    assert report.fits and not report.memory.oom
    out = aot.summary(report)
    assert 0 < out["compiled_bytes_per_chip"] < out["hbm_bytes_per_chip"]
    # XLA's count (remat off: forward + backward) against 6N + attention: within the few percent that the
    # norms, softmax, optimizer and the kernels' whole diagonal tiles add.
    assert 0.9 < out["flops_per_step"] / out["analytic_flops_per_step"] < 1.5
    assert "all-gather" in report.costs.collectives  # ZeRO-3 gathers the sharded parameters


def test_layer_extrapolation_matches_the_unrolled_program():
    """XLA counts a scanned layer once; `per_layer_costs` extrapolates from 1- and 2-layer unrolled compiles
    (times the accumulation steps). The oracle: the whole step with every layer unrolled and the batch in one
    call, counted by XLA directly."""
    config = config_lib.override(config_lib.load_config_file("configs/tiny.py"), **{
        "model.num_layers": 4, "data.batch_size": 16, "optim.grad_accum_steps": 2, "mesh.data": 2, "mesh.fsdp": 2})
    topology = aot.get_topology("v5e:2x2")
    got = aot.per_layer_costs("train", config, topology)
    whole = aot.compile_program("train", config_lib.override(config, **{
        "model.scan_layers": False, "optim.grad_accum_steps": 1}), topology)
    assert got.flops == pytest.approx(whole.flops, rel=0.02)
    scanned = aot.compile_program("train", config, topology)
    assert scanned.flops < 0.6 * whole.flops  # what the extrapolation is for


def test_optimizer_offload_moves_adamw_state_to_host_memory():
    """`optim.offload` on v5e-8: the compiled step's AdamW state (8 bytes a parameter, sharded over 8 chips)
    leaves HBM for the host's memory, and nothing else moves."""
    base = config_lib.override(config_lib.load_config_file("configs/tiny.py"), **{
        "model.compute_dtype": "bfloat16", "data.batch_size": 8, "mesh.data": 1, "mesh.fsdp": -1})
    topology = aot.get_topology("v5e-8")
    plain, offloaded = (aot.run(config_lib.override(base, **{"optim.offload": o}), topology, "train")
                        for o in (False, True))
    assert plain.fits and offloaded.fits and plain.memory.host_arguments == 0
    # At least the ideal 8 bytes a parameter over 8 chips (leaves too small to split over 8 stay whole).
    assert 1.0 <= offloaded.memory.host_arguments / config_lib.num_params(base) < 2.0
    assert plain.memory.arguments - offloaded.memory.arguments == pytest.approx(offloaded.memory.host_arguments,
                                                                               rel=0.01)
    assert aot.summary(offloaded)["host_arguments_bytes"] == offloaded.memory.host_arguments
