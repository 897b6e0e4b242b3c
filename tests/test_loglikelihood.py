"""`maxlm.evaluate.loglikelihoods` against the same sums computed directly with `transformers` on randomly
initialised Llama and Qwen2 models, over ragged batches (contexts and continuations of many lengths)."""

import numpy as np
import pytest
import torch

from maxlm.interop.hf import from_hf
from maxlm.model import scoring
from tests.helpers import HF_VOCAB, ROOT, build_hf


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
    hf_model = build_hf(class_name, seed=7, **extra)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, HF_VOCAB, rng.integers(1, 40)).tolist() for _ in range(11)]
    continuations = [rng.integers(0, HF_VOCAB, rng.integers(1, 9)).tolist() for _ in range(11)]
    got = scoring.loglikelihoods(config, params, contexts, continuations, batch_size=4)
    want = [_direct(hf_model, c, x) for c, x in zip(contexts, continuations)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # a batch's padding and neighbours change nothing: each pair alone gives the same number
    alone = [scoring.loglikelihoods(config, params, [c], [x], batch_size=1)[0] for c, x in zip(contexts, continuations)]
    np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5)


def test_loglikelihoods_reject_bad_requests(tmp_path):
    hf_model = build_hf("LlamaForCausalLM", seed=1, num_key_value_heads=2)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = from_hf(str(tmp_path))
    with pytest.raises(ValueError, match="empty context"):
        scoring.loglikelihoods(config, params, [[]], [[1]])
    with pytest.raises(ValueError, match="contexts but"):
        scoring.loglikelihoods(config, params, [[1]], [])
    long_context = list(range(1, HF_VOCAB)) * 3  # longer than max_seq_len (256): cut from the left
    got = scoring.loglikelihoods(config, params, [long_context], [[5, 6]])[0]
    assert got == pytest.approx(_direct(hf_model, long_context[-(257 - 2):], [5, 6]), abs=1e-4)


def _hf_docs_recipe(hf_model, ids, window, stride):
    """Summed NLL by the sliding-window loop of Hugging Face's "perplexity of fixed-length models" guide."""
    total, prev_end = 0.0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        scored = end - prev_end
        chunk = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(chunk).logits.double(), -1)[0]
        targets = range(max(1, end - begin - scored), end - begin)  # positions scored in this window
        total -= float(sum(logp[t - 1, ids[begin + t]] for t in targets))
        prev_end = end
        if end == len(ids):
            break
    return total


def test_perplexity_and_bits_per_byte_match_transformers(shared_tok_path, hf_base):
    from transformers import LlamaForCausalLM

    from maxlm.interop import pretrained
    from maxlm import tokenizer as tokenizer_lib

    config, params, _ = pretrained.load_base(hf_base)
    tok = tokenizer_lib.load(shared_tok_path)
    hf = LlamaForCausalLM.from_pretrained(hf_base).eval()
    text = "The quick brown fox jumps over the lazy dog. " * 4 + "数据 999."
    ids = [tok.bos_id] + tok.encode(text)
    n, window = len(ids), 100
    assert window < n < 2 * window - 1
    stride = n - window  # two windows, placed exactly where the guide's loop puts them
    r = scoring.perplexity(config, params, tok, [text], window=window, stride=stride)
    want = _hf_docs_recipe(hf, ids, window, stride)
    assert r["tokens"] == n - 1 and r["items"][0]["nll"] == pytest.approx(want, abs=1e-3)
    assert r["ppl"] == pytest.approx(np.exp(want / (n - 1)), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(want / np.log(2) / len(text.encode()), rel=1e-5)
    short = "A short text."
    ids = [tok.bos_id] + tok.encode(short)
    whole = scoring.perplexity(config, params, tok, [short], window=64, stride=32)
    assert whole["items"][0]["nll"] == pytest.approx(_hf_docs_recipe(hf, ids, 64, 32), abs=1e-4)
    # Several texts of very different lengths: perplexity and bits per byte pool every token and byte
    # (exp(total nll / total tokens)), not a mean of per-text values.
    texts = [text, short, "数据"]
    docs = [[tok.bos_id] + tok.encode(t) for t in texts]
    nlls = [_hf_docs_recipe(hf, d, window, stride) for d in docs]
    tokens, nbytes = sum(len(d) - 1 for d in docs), sum(len(t.encode()) for t in texts)
    many = scoring.perplexity(config, params, tok, texts, window=window, stride=stride)
    assert (many["tokens"], many["bytes"], many["n"]) == (tokens, nbytes, 3)
    assert many["ppl"] == pytest.approx(np.exp(sum(nlls) / tokens), rel=1e-5)
    assert many["bits_per_byte"] == pytest.approx(sum(nlls) / np.log(2) / nbytes, rel=1e-5)
    per_text = [np.exp(nll / (len(d) - 1)) for nll, d in zip(nlls, docs)]
    assert abs(np.mean(per_text) - many["ppl"]) > 1e-3 * many["ppl"]  # the texts tell the two apart


def test_sliding_windows_score_every_token_once():
    for n in range(2, 40):
        for window, stride in [(4, 2), (4, 3), (8, 1), (5, 4)]:
            spans = scoring.sliding_windows(n, window, stride)
            scored = [t for _, a, b in spans for t in range(a, b)]
            assert scored == list(range(1, n)) and all(e - b <= window for b, _, e in spans)
    with pytest.raises(ValueError, match="stride"):
        scoring.sliding_windows(10, 4, 4)


def test_ppl_command_line(tmp_path, hf_base):
    import json
    import subprocess
    import sys

    from maxlm.interop import pretrained
    from maxlm import tokenizer as tokenizer_lib

    texts = ["One document of plain words.", "Another, a little longer: " * 5, "第三个文件。"]
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        f.write("not json\n")
    done = subprocess.run([sys.executable, "-m", "maxlm.evaluate", f"--hf={hf_base}", "--task=ppl",
                           f"--data={tmp_path}/docs.jsonl", "--window=32", "--stride=16", f"--out={tmp_path}/out"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    config, params, tok_path = pretrained.load_base(hf_base)
    want = scoring.perplexity(config, params, tokenizer_lib.load(tok_path), texts, window=32, stride=16)
    assert summary["n"] == 3 and summary["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert summary["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-5)
