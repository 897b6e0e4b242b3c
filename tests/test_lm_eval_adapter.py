"""lm-evaluation-harness's requests on maxlm (maxlm/evaluation/lm_eval_adapter.py), without lm_eval installed:
each request type against transformers on the same weights and the export's AutoTokenizer -- the oracle of
how lm_eval's HF model frames requests (its `_encode_pair` split, its disjoint rolling windows re-derived here
from lm_eval's documented algorithm, greedy `generate` cut at the stop strings) -- and its model_args errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from maxlm import tokenizer as tokenizer_lib
from maxlm.evaluation import lm_eval_adapter as A
from maxlm.interop import pretrained
from tests.helpers import ROOT, build_hf

TEXTS = ["the quick brown fox jumps over a lazy dog while seven wizards quietly box and jump " * 2,
         "一 二 三 数据 模型 训练", "doc 7: fox dog.", ""]


@pytest.fixture(scope="module")
def folder(shared_tok_path, tmp_path_factory):
    """A random Llama with O(1) logits (predictions far from ties) and the shared tokenizer's export."""
    out = tmp_path_factory.mktemp("lm_eval_adapter")
    tok = tokenizer_lib.load(shared_tok_path)
    build_hf("LlamaForCausalLM", seed=3, vocab_size=tok.vocab_size).save_pretrained(str(out))
    tokenizer_lib.export(shared_tok_path, str(out))
    return str(out)


@pytest.fixture(scope="module")
def adapter(folder):
    return A.from_model_args(hf=folder, batch_size=4)


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits.double(), -1)[0]


def _score(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    lp = _logprobs(model, ctx + cont)
    rows = lp[len(ctx) - 1:len(ctx) - 1 + len(cont)]
    return float(sum(rows[j, t] for j, t in enumerate(cont))), bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_loglikelihood_equals_transformers_with_lm_evals_framing(adapter, reference):
    model, hf_tok = reference
    pairs = [("Answer:", " A"), ("The quick brown ", "fox jumps"), ("doc 1: the", " quick brown fox"),
             ("", "the lazy dog"), ("数据", " 模型 训练"), ("x" * 300, " dog")]  # the last is cut from the left
    got = adapter.loglikelihood(pairs)
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        if context:  # lm_eval's split: trailing spaces move over, then whole minus context
            spaces = len(context) - len(context.rstrip())
            ctx_text, cont_text = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
            whole, ctx = hf_tok.encode(ctx_text + cont_text), hf_tok.encode(ctx_text)
            cont = whole[len(ctx):]
        else:  # unconditional: after the prefix token (bos)
            ctx, cont = [hf_tok.bos_token_id], hf_tok.encode(continuation, add_special_tokens=False)
        assert (ctx, cont) == tuple(map(list, adapter.encode_pair(context, continuation)))
        ctx = ctx[-(adapter.max_length + 1 - len(cont)):]
        want, want_greedy = _score(model, ctx, cont)
        assert abs(ll - want) < 1e-3 and greedy == want_greedy


def _rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm_eval's get_rolling_token_windows(context_len=1) + make_disjoint_window, from its documentation."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    out, done = [([prefix] + tokens[:first - 1], tokens[:first])], first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        out.append((tokens[max(0, end - max_len - 1):end - 1], tokens[end - n:end]))
        done = end
    return [(inputs[:len(inputs) - (len(preds) - 1)], preds) for inputs, preds in out]  # make_disjoint_window


@pytest.mark.parametrize("max_length", [None, 12])
def test_loglikelihood_rolling_equals_transformers_over_lm_evals_windows(folder, reference, max_length):
    model, hf_tok = reference
    adapter = A.from_model_args(hf=folder, max_length=max_length, batch_size=3)
    got = adapter.loglikelihood_rolling(TEXTS)
    for text, ll in zip(TEXTS, got):
        tokens = hf_tok.encode(text, add_special_tokens=False)
        windows = _rolling_windows(tokens, hf_tok.bos_token_id, adapter.max_length)
        if max_length:
            assert len(windows) > 1 or len(tokens) <= max_length
        want = sum(_score(model, ctx, cont)[0] for ctx, cont in windows)
        assert abs(ll - want) < 1e-3


def test_generate_until_is_transformers_greedy_cut_at_the_stops(adapter, reference):
    model, hf_tok = reference
    contexts = ["Question: what is two plus two?\nAnswer:", "doc 3: the quick", "数据"]
    plain = adapter.generate_until([(c, {"max_gen_toks": 10}) for c in contexts])
    for context, text in zip(contexts, plain):
        ids = hf_tok.encode(context)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                 eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)[0, len(ids):]
        new = [int(t) for t in out]
        new = new[:new.index(hf_tok.eos_token_id)] if hf_tok.eos_token_id in new else new
        assert text == adapter.tok.decode(new, skip_special=True)
    # stop strings cut the same continuations at their first occurrence, whichever string comes first
    stops = [t[len(t) // 2:len(t) // 2 + 2] or "never" for t in plain]
    cut = adapter.generate_until([(c, {"max_gen_toks": 10, "until": [s, "\u2603"], "do_sample": False})
                                  for c, s in zip(contexts, stops)])
    assert cut == [t[:t.index(s)] if s in t else t for t, s in zip(plain, stops)]
    assert all(len(c) < len(t) for c, t in zip(cut, plain) if t)


def test_cut_at_stops_and_generation_args(adapter):
    assert A.cut_at_stops("a. b\n\nc Question: d", ["Question:", "\n\n"]) == "a. b"
    assert A.cut_at_stops("abc", ["", "z"]) == "abc"
    until, n, args = adapter.generation_args({"until": "\n", "max_new_tokens": 7})
    assert (until, n, args["greedy"]) == (["\n"], 7, True)
    _, n, args = adapter.generation_args({"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert n == min(A.MAX_GEN_TOKS, adapter.max_length // 2) and not args["greedy"]
    assert (args["temperature"], args["top_p"]) == (0.7, 0.9)
    with pytest.raises(A.LmEvalArgsError, match="num_beams are not supported"):
        adapter.generation_args({"num_beams": 4})
    with pytest.raises(A.LmEvalArgsError, match="leaves no room"):
        adapter.generation_args({"max_gen_toks": adapter.max_length})


@pytest.mark.parametrize("args, message", [
    (dict(), "exactly one of workdir=W"),
    (dict(workdir="/nonexistent", hf="/nonexistent"), "exactly one of workdir=W"),
    (dict(workdir="/nonexistent"), "is not a directory"),
    (dict(hf="/"), "is not a Hugging Face folder"),
    (dict(hf="FOLDER", pretrained="x"), "unknown model_args pretrained"),
    (dict(hf="FOLDER", batch_size="many"), "batch_size must be a positive integer"),
    (dict(hf="FOLDER", max_length=100_000), "exceeds the model's max_seq_len"),
    (dict(hf="FOLDER", step=3), "step= selects a checkpoint of a workdir"),
])
def test_bad_model_args_are_one_line_errors(folder, args, message):
    args = {k: folder if v == "FOLDER" else v for k, v in args.items()}
    with pytest.raises(A.LmEvalArgsError, match=message) as e:
        A.from_model_args(**args)
    assert "\n" not in str(e.value)


def test_a_tokenizer_without_bos_frames_nothing_and_scores_after_eos(tmp_path):
    """Qwen's convention: no bos anywhere (maxlm used to put id -1 first); documents scored after eos, as
    lm_eval's prefix_token_id -- checked against transformers on a Qwen2 folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|endoftext|>"}))
    build_hf("Qwen2ForCausalLM", seed=4, vocab_size=tok.get_vocab_size(), num_key_value_heads=2,
             tie_word_embeddings=False).save_pretrained(str(tmp_path))
    adapter = A.from_model_args(hf=str(tmp_path))
    assert not adapter.tok.add_bos and tokenizer_lib.text_prefix(adapter.tok) == []
    assert adapter.encode_pair("Answer:", " dog")[0] == adapter.tok.encode("Answer:")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    eos = tok.token_to_id("<|endoftext|>")
    for text, ll in zip(TEXTS[:3], adapter.loglikelihood_rolling(TEXTS[:3])):
        assert abs(ll - _score(model, [eos], adapter.tok.encode(text))[0]) < 1e-3
    from maxlm.model import scoring

    config, params, _ = pretrained.load_base(str(tmp_path))
    r = scoring.perplexity(config, params, adapter.tok, TEXTS[:3])
    assert np.allclose([-i["nll"] for i in r["items"]], adapter.loglikelihood_rolling(TEXTS[:3]), atol=1e-4)


def test_command_line_without_lm_eval_says_how_to_install():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("lm_eval is installed here; tests/test_lm_eval_agreement.py runs the command line")
    done = subprocess.run([sys.executable, "-m", "maxlm.lm_eval", "--model", "maxlm"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 2 and "pip install 'maxlm[lm_eval]'" in done.stderr and "Traceback" not in done.stderr
