"""Rotary scaling for context extension (maxlm/model/attention.py: linear, dynamic NTK, YaRN, Llama 3) against Hugging Face's
implementation of the same `rope_scaling`: logits of randomly initialised Llama models, read by `from_hf`,
on sequences longer than the original context, and the export back to a config transformers reads alike; and
frequency by frequency against transformers' own rope initialisation functions (static NTK, which transformers lacks,
against its dynamic NTK at the length where the grown factor equals the static one)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from maxlm.interop.hf import from_hf, to_hf
from maxlm.model import attention
from maxlm.model import decoder as model_lib
from tests.helpers import HF_TOL, HF_VOCAB, build_hf, hf_logits

CASES = {
    "linear": (dict(max_position_embeddings=256, rope_scaling={"rope_type": "linear", "factor": 4.0}), 150),
    "dynamic": (dict(max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 110),
    "yarn": (dict(max_position_embeddings=256, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 64}), 200),
    "yarn_custom": (dict(max_position_embeddings=256, rope_theta=50000.0,
                         rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                                       "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3}), 180),
    "yarn_mscale": (dict(max_position_embeddings=256, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707,
        "mscale_all_dim": 1.0}), 140),
    "llama3": (dict(max_position_embeddings=256, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}), 200),
    "llama3_custom": (dict(max_position_embeddings=256, rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
        "original_max_position_embeddings": 64}), 160),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scaled_rope_logits_match_transformers(case, tmp_path):
    kwargs, length = CASES[case]
    hf_model = build_hf("LlamaForCausalLM", seed=3, num_key_value_heads=2, **kwargs)
    hf_model.save_pretrained(str(tmp_path / "src"), safe_serialization=True)
    config, params = from_hf(str(tmp_path / "src"))
    assert config.model.rope_scaling == kwargs["rope_scaling"]["rope_type"]
    assert config.model.max_seq_len >= length
    tokens = np.random.default_rng(1).integers(0, HF_VOCAB, (2, length)).astype(np.int32)
    got = np.asarray(model_lib.apply(config, params, tokens))
    want = hf_logits(hf_model, tokens)  # a fresh model: its dynamic frequencies start from the original
    assert float(np.max(np.abs(got - want))) < HF_TOL

    # Export: transformers reads the written rope_scaling back to the same logits.
    to_hf(config, params, str(tmp_path / "out"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert float(np.max(np.abs(hf_logits(again.eval(), tokens) - want))) < HF_TOL
    config2, _ = from_hf(str(tmp_path / "out"))
    assert config2.model.to_dict() == config.model.to_dict()


def test_dynamic_ntk_is_plain_rope_within_the_original_length(tmp_path):
    kwargs, _ = CASES["dynamic"]
    hf_model = build_hf("LlamaForCausalLM", seed=3, num_key_value_heads=2, **kwargs)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    plain = config.copy_and_resolve_references()
    with plain.unlocked():
        plain.model.rope_scaling = "none"
    tokens = np.random.default_rng(2).integers(0, HF_VOCAB, (1, 60)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(model_lib.apply(config, params, tokens)),
                                  np.asarray(model_lib.apply(plain, params, tokens)))


# Frequency-level oracles: maxlm's `rope_frequencies` / `rope` against transformers' own rope initialisation
# functions (ROPE_INIT_FUNCTIONS) and its `LlamaRotaryEmbedding` + `apply_rotary_pos_emb`, over head dims, original
# contexts, factors and YaRN betas. Pure function calls: no model is built.

HEAD_DIMS = (128, 64)
ORIGINAL_LENS = (2048, 4096, 8192)
FACTORS = (2.0, 4.0, 8.0)
BETAS = ((32.0, 1.0), (16.0, 2.0), (64.0, 0.5))
# Bases and original lengths that push YaRN's correction range onto its clamps: with a 64-token original context the
# fast boundary falls below dimension 0; with a base of 20 the slow boundary passes h - 1.
YARN_EDGES = ((10000.0, 64), (20.0, 2048))


def _hf_config(h: int, max_len: int, theta: float, **rope) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=2 * h, num_attention_heads=2, head_dim=h,
                                    max_position_embeddings=max_len, rope_parameters={"rope_theta": theta, **rope})


def _hf_frequencies(rope_type: str, config, **kw) -> tuple[np.ndarray, float]:
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, **kw)
    return inv_freq.double().numpy(), float(scale)


def _hf_rope(x: np.ndarray, positions: np.ndarray, config) -> np.ndarray:
    """x [B,T,N,H] rotated by transformers' Llama rotary embedding (its dynamic update included)."""
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.as_tensor(positions, dtype=torch.long))
    xt = torch.as_tensor(x, dtype=torch.float32)
    return apply_rotary_pos_emb(xt, xt, cos, sin, unsqueeze_dim=2)[0].numpy()


@pytest.mark.parametrize("h", HEAD_DIMS)
def test_yarn_frequencies_and_scale_match_transformers(h):
    """YaRN inverse frequencies and cos/sin multiplier against transformers' `_compute_yarn_parameters`, over bases,
    original contexts, factors and (beta_fast, beta_slow) pairs, both clamps of the correction range included."""
    cases = list(itertools.product((10000.0, 500000.0), ORIGINAL_LENS, FACTORS, BETAS))
    cases += [(theta, l0, f, b) for (theta, l0), f, b in itertools.product(YARN_EDGES, (4.0, 8.0), BETAS)]
    for theta, l0, factor, (fast, slow) in cases:
        config = _hf_config(h, int(l0 * factor), theta, rope_type="yarn", factor=factor,
                            original_max_position_embeddings=l0, beta_fast=fast, beta_slow=slow)
        want, want_scale = _hf_frequencies("yarn", config)
        got, scale = attention.rope_frequencies(h, theta=theta, scaling="yarn", factor=factor, original_max_len=l0,
                                                beta_fast=fast, beta_slow=slow)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=str((theta, l0, factor, fast, slow)))
        assert scale == pytest.approx(want_scale, rel=1e-12), (theta, l0, factor, fast, slow)


def test_yarn_explicit_attention_factor_matches_transformers():
    """An explicit YaRN `attention_factor` replaces the 0.1 ln(factor) + 1 multiplier, as in transformers."""
    config = _hf_config(128, 16384, 10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=4096,
                        attention_factor=1.3)
    want, want_scale = _hf_frequencies("yarn", config)
    got, scale = attention.rope_frequencies(128, theta=10000.0, scaling="yarn", factor=4.0, original_max_len=4096,
                                            attention_factor=1.3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert scale == pytest.approx(want_scale) == 1.3


@pytest.mark.parametrize("h", HEAD_DIMS)
def test_dynamic_ntk_frequencies_match_transformers(h):
    """Dynamic NTK inverse frequencies against transformers' `_compute_dynamic_ntk_parameters` at sequence lengths
    below, at and above the original context (plain rope up to it, the base grown with the length past it)."""
    for theta, l0, factor in itertools.product((10000.0, 1e6), ORIGINAL_LENS, FACTORS):
        config = _hf_config(h, l0, theta, rope_type="dynamic", factor=factor)
        for length in (l0 // 2, l0 - 1, l0, l0 + 1, 3 * l0 // 2, 2 * l0, 8 * l0):
            want, want_scale = _hf_frequencies("dynamic", config, seq_len=length)
            got, scale = attention.rope_frequencies(h, theta=theta, scaling="dynamic", factor=factor,
                                                    original_max_len=l0, seq_len=jnp.float32(length))
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=str((theta, l0, factor, length)))
            assert scale == want_scale == 1.0


@pytest.mark.parametrize("h", HEAD_DIMS)
def test_static_ntk_is_transformers_dynamic_ntk_at_its_full_factor(h):
    """Static NTK-aware frequencies (transformers has no such rope type) against transformers' dynamic NTK evaluated
    at L = L0 (2 - 1/factor), the length where its grown factor `factor * L / L0 - (factor - 1)` equals `factor`;
    and the defining property: the fastest pair keeps its frequency, the slowest is divided by exactly `factor`."""
    l0 = 4096
    for theta in (10000.0, 500000.0):
        plain = 1.0 / theta ** (np.arange(0, h, 2) / h)
        for factor in (1.5, 2.0, 4.0, 8.0, 16.0):
            config = _hf_config(h, l0, theta, rope_type="dynamic", factor=factor)
            want, _ = _hf_frequencies("dynamic", config, seq_len=l0 * (2.0 - 1.0 / factor))
            got, scale = attention.rope_frequencies(h, theta=theta, scaling="ntk", factor=factor)
            got = np.asarray(got, np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str((theta, factor)))
            assert scale == 1.0
            np.testing.assert_allclose([got[0], got[-1] * factor], [1.0, plain[-1]], rtol=1e-6)


@pytest.mark.parametrize("h", HEAD_DIMS)
def test_linear_keeps_plain_frequencies(h):
    """Linear scaling: `rope_frequencies` returns transformers' linear inverse frequencies times the factor (the plain
    ones; `rope` divides the positions instead, checked in test_rope_rotation_matches_transformers) and scale 1."""
    for l0, factor in itertools.product(ORIGINAL_LENS, FACTORS):
        want, _ = _hf_frequencies("linear", _hf_config(h, l0, 10000.0, rope_type="linear", factor=factor))
        got, scale = attention.rope_frequencies(h, theta=10000.0, scaling="linear", factor=factor)
        np.testing.assert_allclose(np.asarray(got), want * factor, rtol=1e-6)
        assert scale == 1.0


@pytest.mark.parametrize("h", HEAD_DIMS)
def test_llama3_frequencies_match_transformers(h):
    """Llama 3.1's interpolation: transformers' `_compute_llama3_parameters`, over original lengths, factors,
    bases (500000 is Llama 3's) and low/high frequency factors, every regime (kept, blended, divided) hit."""
    for l0, factor, theta, (low, high) in itertools.product(ORIGINAL_LENS, FACTORS, (10000.0, 500000.0),
                                                            ((1.0, 4.0), (2.0, 8.0))):
        config = _hf_config(h, int(l0 * factor), theta, rope_type="llama3", factor=factor, low_freq_factor=low,
                            high_freq_factor=high, original_max_position_embeddings=l0)
        want, want_scale = _hf_frequencies("llama3", config)
        got, scale = attention.rope_frequencies(h, theta=theta, scaling="llama3", factor=factor, original_max_len=l0,
                                                low_freq_factor=low, high_freq_factor=high)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=str((l0, factor, theta, low, high)))
        assert scale == want_scale == 1.0


@pytest.mark.parametrize("case,factor", [("none", 1.0), ("linear", 2.0), ("linear", 8.0), ("dynamic", 2.0),
                                         ("dynamic", 8.0), ("yarn", 2.0), ("yarn", 8.0), ("llama3", 8.0)])
def test_rope_rotation_matches_transformers(case, factor):
    """`rope` on [B,T,N,H] against transformers' `LlamaRotaryEmbedding` + `apply_rotary_pos_emb` (cos/sin times its
    attention scaling) at head dim 64 and a 32-token original context, at largest positions just below, at and past
    the original length (dynamic NTK's sequence length is the largest position + 1) and far past it."""
    h, l0, theta = 64, 32, 10000.0
    rope_params = {"none": dict(rope_type="default"), "linear": dict(rope_type="linear", factor=factor),
                   "dynamic": dict(rope_type="dynamic", factor=factor),
                   "yarn": dict(rope_type="yarn", factor=factor, original_max_position_embeddings=l0, beta_fast=16.0,
                                beta_slow=2.0),
                   "llama3": dict(rope_type="llama3", factor=factor, original_max_position_embeddings=l0,
                                  low_freq_factor=1.0, high_freq_factor=4.0)}[case]
    config = _hf_config(h, l0 if case == "dynamic" else int(l0 * factor), theta, **rope_params)
    rng = np.random.default_rng(1)
    for last in (l0 - 2, l0 - 1, l0, 5 * l0):
        x = rng.standard_normal((2, 6, 2, h)).astype(np.float32)
        positions = np.array([[0, 3, l0 // 2, last - 1, last, 7], [1, 2, 5, l0 - 3, l0 // 4, 0]])
        out = attention.rope(jnp.asarray(x), jnp.asarray(positions), theta=theta, scaling=case, factor=factor,
                             original_max_len=l0, beta_fast=16.0, beta_slow=2.0, low_freq_factor=1.0,
                             high_freq_factor=4.0)
        np.testing.assert_allclose(np.asarray(out), _hf_rope(x, positions, config), atol=1e-4, err_msg=str(last))
