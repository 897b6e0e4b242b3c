"""Schedules and the weight-decay mask, against closed forms written here."""

import math

import jax
import numpy as np
import pytest

from maxlm import config as C
from maxlm.model import decoder as model
from maxlm.training import optim


def _config(schedule, **extra):
    c = C.override(C.default_config(), **{"optim.schedule": schedule, "optim.peak_lr": 1.0, "optim.warmup_steps": 10,
                                          "optim.end_lr_ratio": 0.1, "train.num_steps": 110, **extra})
    return C.validate(c)


def _expected(schedule, step, warmup=10, total=110, end=0.1, wsd_frac=0.2):
    if step < warmup:
        return step / warmup
    t = step - warmup
    rest = total - warmup
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 + (end - 1.0) * min(t / rest, 1.0)
    if schedule == "cosine":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(t / rest, 1.0)))
    if schedule == "wsd":
        decay = round(rest * wsd_frac)
        if t < rest - decay:
            return 1.0
        return 1.0 + (end - 1.0) * min((t - (rest - decay)) / decay, 1.0)
    raise ValueError(schedule)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules(schedule):
    fn = optim.schedule(_config(schedule))
    for step in [0, 1, 5, 10, 11, 40, 85, 90, 95, 109, 110, 200]:
        assert float(fn(step)) == pytest.approx(_expected(schedule, step), abs=1e-5), step


def test_decay_mask_skips_norms_biases_and_embeddings():
    c = C.override(C.default_config(), **{"model.num_layers": 2, "model.d_model": 32, "model.num_heads": 4,
                                          "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.vocab_size": 64,
                                          "model.qkv_bias": True})
    mask = optim.decay_mask(c, model.abstract_params(c))
    assert mask["embedding"] is False and mask["lm_head"] is True
    assert mask["final_norm"]["scale"] is False
    assert mask["layers"]["attn_norm"]["scale"] is False  # [L, D]: rank 2, still not decayed
    assert mask["layers"]["attn"]["q_bias"] is False and mask["layers"]["attn"]["q"] is True
    assert mask["layers"]["mlp"]["down"] is True
    c2 = C.override(c, **{"optim.decay_embeddings": True})
    assert optim.decay_mask(c2, model.abstract_params(c2))["embedding"] is True


def test_adamw_matches_numpy_reference():
    """Two AdamW steps with clipping on a toy tree, against a numpy implementation of Loshchilov & Hutter."""
    c = C.override(C.default_config(), **{"optim.schedule": "constant", "optim.warmup_steps": 0, "optim.peak_lr": 0.1,
                                          "optim.grad_clip": 1.0, "optim.weight_decay": 0.5})
    params = {"w": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32), "scale": np.array([1.0, 1.0], np.float32)}
    grads = [{"w": np.array([[3.0, 0.0], [4.0, 0.0]], np.float32), "scale": np.array([0.0, 0.0], np.float32)},
             {"w": np.array([[0.1, 0.2], [0.0, -0.1]], np.float32), "scale": np.array([0.2, 0.0], np.float32)}]
    opt = optim.make_optimizer(c, params)
    state = opt.init(params)
    p = jax.tree.map(np.copy, params)
    for g in grads:
        updates, state = opt.update(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)

    ref = {k: v.astype(np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v2 = {k: np.zeros_like(v) for k, v in ref.items()}
    for t, g in enumerate(grads, start=1):
        norm = math.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in g.values()))
        factor = min(1.0, 1.0 / norm)
        for k in ref:
            gk = g[k] * factor
            m[k] = 0.9 * m[k] + 0.1 * gk
            v2[k] = 0.95 * v2[k] + 0.05 * gk * gk
            update = (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v2[k] / (1 - 0.95 ** t)) + 1e-8)
            if k == "w":
                update = update + 0.5 * ref[k]
            ref[k] = ref[k] - 0.1 * update
    for k in ref:
        np.testing.assert_allclose(p[k], ref[k], rtol=1e-5, atol=1e-6)


def test_lora_plus_scales_only_b_updates():
    """LoRA+ (`lora.lr_ratio`): one step moves B by exactly ratio x the plain-LoRA step, A not at all differently."""
    base = {"optim.schedule": "constant", "optim.warmup_steps": 0, "optim.peak_lr": 0.01, "lora.rank": 2}
    tree = {"layers": {"attn": {"q": {"a": np.ones((1, 3, 2), np.float32), "b": np.zeros((1, 2, 3), np.float32)}}}}
    grads = {"layers": {"attn": {"q": {"a": np.full((1, 3, 2), 0.5, np.float32),
                                       "b": np.full((1, 2, 3), -2.0, np.float32)}}}}
    steps = {}
    for ratio in (1.0, 16.0):
        c = C.override(C.default_config(), **base, **{"lora.lr_ratio": ratio})
        opt = optim.make_optimizer(c, tree)
        updates, _ = opt.update(grads, opt.init(tree), tree)
        steps[ratio] = updates["layers"]["attn"]["q"]
    np.testing.assert_allclose(steps[16.0]["a"], steps[1.0]["a"], rtol=1e-6)
    np.testing.assert_allclose(steps[16.0]["b"], 16.0 * steps[1.0]["b"], rtol=1e-6)
    assert np.all(np.asarray(steps[1.0]["b"]) > 0)  # sanity: a real (non-zero) step was taken
