"""Pipeline parallelism (maxlm/model/pipeline.py): the pipelined layer stack against the plain layer scan --
logits, router statistics and gradients in one process -- and three train steps on 8 forced CPU devices
against one device (tests/parallel_steps_check.py, in a subprocess)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as C
from maxlm.model import decoder as model
from maxlm.model import pipeline
from tests.helpers import parallel_params, parallel_rel

SMALL = {"model.vocab_size": 64, "model.num_layers": 4, "model.d_model": 32, "model.num_heads": 4,
         "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.max_seq_len": 32, "model.compute_dtype": "float32",
         "data.seq_len": 16, "data.batch_size": 8}
MOE = {"model.num_experts": 4, "model.experts_per_token": 2, "model.expert_mlp_dim": 32}


def _inputs(batch=8, length=16):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (batch, length)), jnp.int32)
    segments = np.ones((batch, length), np.int32)
    segments[:, 10:] = 2
    segments[1, 13:] = 0  # padding
    positions = np.concatenate([np.arange(10), np.arange(length - 10)])[None].repeat(batch, 0)
    return tokens, jnp.asarray(positions, jnp.int32), jnp.asarray(segments)


@pytest.mark.parametrize("stages,micro,schedule,moe", [
    (2, 4, "gpipe", True),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [(4, 8, "gpipe", True), (2, 4, "circular", False),
                                                               (2, 2, "gpipe", False),
                                                               (2, 2, "circular", True), (4, 1, "gpipe", False)])])
def test_pipelined_forward_and_gradient_equal_the_layer_scan(stages, micro, schedule, moe):
    over = {**SMALL, **(MOE if moe else {}), "mesh.pipeline": stages, "train.microbatches": micro,
            "mesh.pipeline_schedule": schedule}
    piped = C.validate(C.override(C.default_config(), **over))
    plain = C.validate(C.override(piped, **{"mesh.pipeline": 1}))
    assert pipeline.from_config(piped) is not None and pipeline.from_config(plain) is None
    params = model.init(plain, jax.random.key(0))
    tokens, positions, segments = _inputs()

    def loss(cfg, p):
        logits, router = model.apply_with_aux(cfg, p, tokens, positions=positions, segment_ids=segments)
        return jnp.mean(jax.nn.logsumexp(logits, -1) * (segments > 0)) + sum(router.values()), (logits, router)

    (l1, (logits1, router1)), g1 = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(params)
    (l2, (logits2, router2)), g2 = jax.value_and_grad(lambda p: loss(piped, p), has_aux=True)(params)
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits1), rtol=1e-5, atol=1e-5)
    assert router1.keys() == router2.keys() and bool(router1) == moe
    for name in router1:  # sums over micro-batches: the whole batch's losses, not a mean of per-micro ones
        np.testing.assert_allclose(float(router2[name]), float(router1[name]), rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)


def test_bubble_and_micro_batches_per_batch():
    gpipe, circular = pipeline.Pipeline(4, 8), pipeline.Pipeline(4, 8, repeats=2)
    assert gpipe.iterations == 11 and gpipe.bubble() == pytest.approx(3 / 11)
    assert circular.iterations == 19 and circular.bubble() == pytest.approx(3 / 19)
    assert "27.3%" in gpipe.describe() and "circular, 2 repeats" in circular.describe()
    # An evaluation batch of 6 rows takes 2 micro-batches; below 4 the circular schedule becomes GPipe.
    assert circular.for_batch(6) == pipeline.Pipeline(4, 2, repeats=1)
    assert circular.for_batch(16) == circular


@pytest.mark.parametrize("over,key", [({"model.num_layers": 3, "mesh.pipeline": 2}, "mesh.pipeline"),
                                      ({"mesh.pipeline": 2, "mesh.pipeline_schedule": "circular", "model.num_layers": 6},
                                       "mesh.pipeline"),
                                      ({"mesh.pipeline": 2, "train.microbatches": 3}, "train.microbatches"),
                                      ({"mesh.pipeline": 4, "mesh.pipeline_schedule": "circular", "model.num_layers": 8,
                                        "train.microbatches": 2}, "train.microbatches"),
                                      ({"mesh.pipeline": -1, "mesh.data": 1}, "mesh.pipeline"),
                                      ({"mesh.pipeline_schedule": "1f1b"}, "mesh.pipeline_schedule")])
def test_bad_pipeline_configs_name_the_key(over, key):
    with pytest.raises(C.ConfigError, match=re.escape(key)):
        C.validate(C.override(C.default_config(), **{**SMALL, **over}))


# 8 forced CPU devices: each mesh's three losses against one device's, 1e-4 relative (float32).
FAST = []
SLOW = ["pipeline=4,train.microbatches=8", "pipeline=2", "pipeline=2,pipeline_schedule=circular,train.microbatches=4,fsdp=2,tensor=2",
        "pipeline=2,fsdp=2,zero_stage=1,model.remat_policy=full",
        "configs/moe_tiny.py@expert=4", "configs/moe_tiny.py@expert=2,fsdp=2,pipeline=2"]


@pytest.mark.parametrize("spec", parallel_params(FAST, SLOW))
def test_pipelined_and_expert_parallel_steps_equal_one_device(spec):
    assert parallel_rel(spec, FAST, SLOW) <= 1e-4
