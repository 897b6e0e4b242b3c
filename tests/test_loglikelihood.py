"""`maxlm.evaluate.loglikelihoods` against the same sums computed directly with `transformers` on randomly
initialised Llama and Qwen2 models, over ragged batches (contexts and continuations of many lengths)."""

import numpy as np
import pytest
import torch

from maxlm import evaluate
from maxlm.convert import from_hf
from tests.test_convert import VOCAB, _build


def _direct(hf_model, context, continuation):
    """log p(continuation | context) from one unpadded forward pass of the transformers model."""
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits.double(), dim=-1)[0]
    n = len(context)
    return float(sum(logp[n - 1 + j, tok] for j, tok in enumerate(continuation)))


@pytest.mark.parametrize("class_name,extra", [("LlamaForCausalLM", dict(num_key_value_heads=2)),
                                              ("Qwen2ForCausalLM", dict(num_key_value_heads=2))])
def test_loglikelihoods_match_transformers_on_ragged_batches(tmp_path, class_name, extra):
    hf_model = _build(class_name, seed=7, **extra)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, VOCAB, rng.integers(1, 40)).tolist() for _ in range(11)]
    continuations = [rng.integers(0, VOCAB, rng.integers(1, 9)).tolist() for _ in range(11)]
    got = evaluate.loglikelihoods(config, params, contexts, continuations, batch_size=4)
    want = [_direct(hf_model, c, x) for c, x in zip(contexts, continuations)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # a batch's padding and neighbours change nothing: each pair alone gives the same number
    alone = [evaluate.loglikelihoods(config, params, [c], [x], batch_size=1)[0] for c, x in zip(contexts, continuations)]
    np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5)


def test_loglikelihoods_reject_bad_requests(tmp_path):
    hf_model = _build("LlamaForCausalLM", seed=1, num_key_value_heads=2)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    with pytest.raises(ValueError, match="empty context"):
        evaluate.loglikelihoods(config, params, [[]], [[1]])
    with pytest.raises(ValueError, match="contexts but"):
        evaluate.loglikelihoods(config, params, [[1]], [])
    long_context = list(range(1, VOCAB)) * 3  # longer than max_seq_len (256): cut from the left
    got = evaluate.loglikelihoods(config, params, [long_context], [[5, 6]])[0]
    assert got == pytest.approx(_direct(hf_model, long_context[-(257 - 2):], [5, 6]), abs=1e-4)
