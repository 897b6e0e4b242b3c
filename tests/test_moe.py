"""Mixture of experts (maxlm/model/moe.py): the layer against a per-token numpy loop, GShard's capacity and
priority against a numpy slot count, the router losses against numpy and the load-balancing loss against
transformers' Mixtral (padding masked), and the decoder's MoE training loss and gradients the same through the
grouped matmuls (dropless) and the one-hot dispatch (capacity). Logit parity with Mixtral and Qwen3-MoE is in
tests/test_convert.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import config as C
from maxlm.model import decoder as model
from maxlm.model import moe
from maxlm.training import pretrain
from maxlm.interop import hf
from tests.helpers import HF_VOCAB, build_hf, random_params, tiny_model_config

E, K, D, F = 4, 2, 8, 12


def _silu(x):
    return x / (1 + np.exp(-x))


def _layer(impl, capacity_factor=1.25, renormalize=True):
    cfg = C.override(C.default_config(), **{
        "model.d_model": D, "model.mlp_dim": F, "model.num_experts": E, "model.experts_per_token": K,
        "model.compute_dtype": "float32", "model.moe_impl": impl, "model.capacity_factor": capacity_factor,
        "model.router_renormalize": renormalize}).model
    return moe.MoE(cfg, jax.nn.silu)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"router": rng.normal(0, 1, (D, E)).astype(np.float32),
            **{name: rng.normal(0, 0.3, shape).astype(np.float32)
               for name, shape in (("gate", (E, D, F)), ("up", (E, D, F)), ("down", (E, F, D)))}}


def _numpy_layer(p, x, renormalize=True, kept=None):
    """Per token: softmax router, the k best experts (ties: lower index), their SwiGLU outputs weighted;
    `kept[(token, choice)]` False drops that assignment."""
    out = np.zeros_like(x)
    choices = []
    for n, xn in enumerate(x):
        logits = xn.astype(np.float64) @ p["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = sorted(range(E), key=lambda e: (-probs[e], e))[:K]
        w = probs[top] / (probs[top].sum() if renormalize else 1.0)
        choices.append(top)
        for c, (e, we) in enumerate(zip(top, w)):
            if kept is not None and not kept[(n, c)]:
                continue
            h = _silu(xn @ p["gate"][e]) * (xn @ p["up"][e])
            out[n] += we * (h @ p["down"][e])
    return out, choices


@pytest.mark.parametrize("impl", ["dropless", "capacity"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_layer_matches_a_per_token_loop(impl, renormalize):
    p = _params()
    x = np.random.default_rng(1).normal(0, 1, (3, 5, D)).astype(np.float32)
    # Capacity E/K: C = N, so nothing is dropped and both ways compute the same layer.
    layer = _layer(impl, capacity_factor=E / K, renormalize=renormalize)
    y, stats = layer.apply({"params": p}, jnp.asarray(x), jnp.ones((3, 5), bool))
    want, _ = _numpy_layer(p, x.reshape(-1, D), renormalize)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-4, atol=1e-5)
    assert float(moe.losses(stats)["dropped"]) == 0.0


def test_capacity_keeps_first_choices_first_in_token_order():
    p = _params(3)
    x = np.random.default_rng(4).normal(0, 1, (1, 12, D)).astype(np.float32)
    mask = np.ones((1, 12), bool)
    mask[0, -2:] = False  # padding: routed like any token, but not counted in `dropped`
    factor = 0.5  # C = ceil(0.5 * 24 / 4) = 3 slots per expert
    _, choices = _numpy_layer(p, x[0])
    cap, used, kept = 3, [0] * E, {}
    for c in range(K):  # GShard: every token's first choice before any second choice
        for n in range(12):
            e = choices[n][c]
            kept[(n, c)] = used[e] < cap
            used[e] += 1
    want, _ = _numpy_layer(p, x[0], kept=kept)
    y, stats = _layer("capacity", factor).apply({"params": p}, jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(y)[0], want, rtol=1e-4, atol=1e-5)
    real_dropped = sum(not kept[(n, c)] for n in range(10) for c in range(K))
    assert 0 < real_dropped and float(moe.losses(stats)["dropped"]) == pytest.approx(real_dropped / 20)


def test_router_losses_match_numpy_over_real_tokens():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (2, 6, E)).astype(np.float32)
    mask = np.ones((2, 6), bool)
    mask[1, 3:] = False
    probs, _, experts = moe.route(jnp.asarray(logits), K, True)
    stats = moe.aux_stats(jnp.asarray(logits), probs, experts, jnp.asarray(mask))
    real = logits[mask].astype(np.float64)
    p = np.exp(real - real.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :K]
    f = np.array([(top == e).sum() for e in range(E)]) / len(real)  # assignments per token, k in all
    lse = np.log(np.exp(real).sum(-1))
    np.testing.assert_allclose(float(stats["load_balance"]), E * np.sum(f * p.mean(0)), rtol=1e-5)
    np.testing.assert_allclose(float(stats["z_loss"]), np.mean(lse ** 2), rtol=1e-5)
    uniform = moe.aux_stats(jnp.zeros((1, 8, E)), jnp.full((1, 8, E), 1 / E),
                            jnp.asarray(np.tile([[0, 1], [2, 3]], (1, 4, 1))), jnp.ones((1, 8), bool))
    assert float(uniform["load_balance"]) == pytest.approx(K)  # balanced: the minimum, k


def _moe_model(impl):
    return C.override(tiny_model_config(64), **{"model.num_experts": E, "model.experts_per_token": K,
                                                "model.expert_mlp_dim": 16, "model.moe_impl": impl,
                                                "model.capacity_factor": E / K, "model.router_z_coef": 1e-3,
                                                "data.seq_len": 64})


def test_decoder_loss_and_gradients_agree_between_dropless_and_capacity():
    dropless, capacity = _moe_model("dropless"), _moe_model("capacity")
    C.validate(dropless)
    params = random_params(model.abstract_params(dropless), 7, std=0.2)
    assert params["layers"]["moe"]["gate"].shape == (2, E, 32, 16) and "mlp" not in params["layers"]
    rng = np.random.default_rng(8)
    tokens = rng.integers(1, 64, (2, 9))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(8), (2, 1)),
             "segment_ids": np.ones((2, 8), np.int32), "loss_weights": np.ones((2, 8), np.float32)}
    batch["segment_ids"][1, 6:] = 0
    batch["loss_weights"][1, 6:] = 0
    out = {}
    for name, cfg in (("dropless", dropless), ("capacity", capacity)):
        (loss, metrics), grads = jax.jit(jax.value_and_grad(
            lambda p, c=cfg: pretrain.lm_loss(p, c, batch), has_aux=True))(params)
        out[name] = loss, metrics, grads
    (l1, m1, g1), (l2, m2, g2) = out["dropless"], out["capacity"]
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), g1, g2)
    tokens_n = float(m1["weight"])
    aux = 0.01 * float(m1["moe_load_balance"]) + 1e-3 * float(m1["moe_z_loss"])  # both already x tokens
    np.testing.assert_allclose(float(l1), float(m1["cross_entropy"]) + aux, rtol=1e-6)
    assert tokens_n == 14  # the metrics are sums over the real target tokens
    assert np.abs(np.asarray(g1["layers"]["moe"]["router"])).sum() > 0
    # The plain logits are the same model with or without the router stats.
    np.testing.assert_allclose(model.apply(dropless, params, batch["inputs"], segment_ids=batch["segment_ids"]),
                               model.apply_with_aux(dropless, params, batch["inputs"],
                                                    segment_ids=batch["segment_ids"])[0], rtol=1e-6)


def test_param_count_and_config_errors():
    cfg = _moe_model("dropless")
    leaves = jax.tree.leaves(model.abstract_params(cfg))
    assert C.num_params(cfg) == sum(int(np.prod(x.shape)) for x in leaves)
    dense_mlp = 2 * 3 * 32 * 16
    assert C.num_params(cfg) - C.num_params(cfg, active=True) == (E - K) * dense_mlp
    for key, value in (("model.experts_per_token", 5), ("model.moe_impl", "dense"), ("model.capacity_factor", 0.0)):
        with pytest.raises(C.ConfigError, match=key):
            C.validate(C.override(cfg, **{key: value}))


def test_load_balance_matches_transformers_mixtral_with_padding(tmp_path):
    """One layer, where the per-layer loss and transformers' pooled one are the same number."""
    import torch

    hf_model = build_hf("MixtralForCausalLM", num_hidden_layers=1, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2)
    hf_model.save_pretrained(str(tmp_path))
    config, params = hf.from_hf(str(tmp_path))
    tokens = np.random.default_rng(9).integers(0, HF_VOCAB, (2, 11))
    mask = np.ones((2, 11), np.int64)
    mask[1, 7:] = 0  # right padding: positions of the real tokens are unchanged
    with torch.no_grad():
        out = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(mask), output_router_logits=True)
    _, router = model.apply_with_aux(config, params, tokens, segment_ids=mask.astype(np.int32))
    np.testing.assert_allclose(float(router["load_balance"]), float(out.aux_loss), rtol=1e-5)
    _, unmasked = model.apply_with_aux(config, params, tokens)
    assert abs(float(unmasked["load_balance"]) - float(out.aux_loss)) > 1e-4  # the padding matters here
