"""Rotary scaling for context extension (maxlm/attention.py: linear, dynamic NTK, YaRN) against Hugging Face's
implementation of the same `rope_scaling`: logits of randomly initialised Llama models, read by `from_hf`,
on sequences longer than the original context, and the export back to a config transformers reads alike."""

import numpy as np
import pytest
import transformers

from maxlm import model as model_lib
from maxlm.convert import from_hf, to_hf
from tests.test_convert import TOL, VOCAB, _build, _hf_logits

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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scaled_rope_logits_match_transformers(case, tmp_path):
    kwargs, length = CASES[case]
    hf_model = _build("LlamaForCausalLM", seed=3, num_key_value_heads=2, **kwargs)
    hf_model.save_pretrained(str(tmp_path / "src"), safe_serialization=True)
    config, params = from_hf(str(tmp_path / "src"))
    assert config.model.rope_scaling == kwargs["rope_scaling"]["rope_type"]
    assert config.model.max_seq_len >= length
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, length)).astype(np.int32)
    got = np.asarray(model_lib.apply(config, params, tokens))
    want = _hf_logits(hf_model, tokens)  # a fresh model: its dynamic frequencies start from the original
    assert float(np.max(np.abs(got - want))) < TOL

    # Export: transformers reads the written rope_scaling back to the same logits.
    to_hf(config, params, str(tmp_path / "out"))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert float(np.max(np.abs(_hf_logits(again.eval(), tokens) - want))) < TOL
    config2, _ = from_hf(str(tmp_path / "out"))
    assert config2.model.to_dict() == config.model.to_dict()


def test_dynamic_ntk_is_plain_rope_within_the_original_length(tmp_path):
    kwargs, _ = CASES["dynamic"]
    hf_model = _build("LlamaForCausalLM", seed=3, num_key_value_heads=2, **kwargs)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    plain = config.copy_and_resolve_references()
    with plain.unlocked():
        plain.model.rope_scaling = "none"
    tokens = np.random.default_rng(2).integers(0, VOCAB, (1, 60)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(model_lib.apply(config, params, tokens)),
                                  np.asarray(model_lib.apply(plain, params, tokens)))
