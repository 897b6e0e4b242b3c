"""Long-context selection (maxlm/curation/long.py, the curate `long` stage) against answers known by
construction, its moving-average type-token ratio against a brute-force loop, the perplexity ceiling against
the scorer's own perplexities, and the long-context mixture helper used by configs/internlm2_7b_32k.py."""

import json
import os
import random

import numpy as np
import pytest

from maxlm import config as C
from maxlm import tokenizer
from maxlm.curation import long, pipeline
from maxlm.data import mixture

WORDS = ["".join("abcdefghijklmnopqrstuvwxyz"[i // 26 ** k % 26] for k in range(3)) for i in range(3000)]


def _prose(rng: random.Random, n_words: int) -> str:
    """Diverse text: sentences of words from a 3,000-word vocabulary, 12 words to a line."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return "\n".join(" ".join(words[i:i + 12]) + "." for i in range(0, n_words, 12))


def _config(**overrides):
    return C.override(C.curate_config(), **{"stages": "long", "workers": 1, "long.min_tokens": 600, **overrides})


def test_mattr_against_a_brute_force_loop():
    rng = random.Random(0)
    for n, window, vocab in [(50, 100, 30), (400, 100, 60), (1000, 37, 500), (101, 100, 5)]:
        units = [f"u{rng.randrange(vocab)}" for _ in range(n)]
        windows = [units[i:i + window] for i in range(max(len(units) - window + 1, 1))]
        expected = np.mean([len(set(w)) / len(w) for w in windows])
        assert long.mattr(units, window) == pytest.approx(expected, rel=1e-12)
    assert long.mattr([], 10) == 0.0


def test_each_rule_on_a_document_built_to_fail_it():
    rng = random.Random(1)
    c = _config()["long"]
    good = _prose(rng, 900)
    assert long.check(good, c) is None
    assert long.check(_prose(rng, 500), c) == "long_length"  # 500 units (a word with its full stop is one)
    lines = good.split("\n")
    assert long.check("\n".join(lines + lines[:len(lines) // 2]), c) == "long_repeated_lines"  # 1/3 repeat
    table = "\n".join(" ".join(str(rng.randrange(10**6)) for _ in range(12)) for _ in range(80))
    assert long.check(table, c) == "long_digits"
    listing = "\n".join(f"item {i % 7} of list number {i} a a a b b b" for i in range(120))  # distinct lines
    assert long.check(listing, c) == "long_diversity"
    assert long.token_count(good) == len(good.split()) == 900


def test_token_count_with_a_tokenizer(shared_tok_path):
    tok = tokenizer.load(shared_tok_path)
    text = _prose(random.Random(2), 50)
    assert long.token_count(text, tok) == len(tok.encode(text)) != long.token_count(text)


def test_curate_long_stage_counts_each_rule(tmp_path):
    rng = random.Random(3)
    docs = [{"id": f"good{i}", "text": _prose(rng, 700 + 50 * i)} for i in range(4)]
    docs += [{"id": "short", "text": _prose(rng, 100)}]
    docs += [{"id": "table", "text": "\n".join(" ".join(str(rng.randrange(10**6)) for _ in range(12))
                                               for _ in range(80))}]
    docs += [{"id": "listing", "text": "\n".join(f"item {i % 7} of list number {i} a a a b b b" for i in range(120))}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    report = pipeline.curate(_config(), str(tmp_path / "in.jsonl"), str(tmp_path / "out"))
    kept = [json.loads(line)["id"] for line in open(tmp_path / "out" / "part-00000.jsonl")]
    assert kept == ["good0", "good1", "good2", "good3"]
    assert report["removed"] == {"long_length": 1, "long_repeated_lines": 0, "long_digits": 1, "long_diversity": 1}
    # the default pipeline ("all") does not select: long is asked for by name
    assert "long" not in C.curate_stages(C.curate_config())


def test_perplexity_ceiling_against_the_scorer(tmp_path, hf_base):
    from maxlm.curation import perplexity
    from maxlm.interop import pretrained

    rng = random.Random(5)
    texts = [_prose(rng, 40 + 10 * i) for i in range(8)]
    config, params, tok_path = pretrained.load_base(hf_base)
    scores = perplexity.perplexities(config, params, tokenizer.load(tok_path), texts, max_tokens=32, batch_size=4)
    ceiling = float(np.median(scores))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    cfg = _config(stages="long,perplexity", **{"long.min_tokens": 10, "long.max_perplexity": ceiling,
                                               "perplexity.workdir": hf_base, "perplexity.max_tokens": 32,
                                               "perplexity.drop_above": 100.0})
    report = pipeline.curate(cfg, str(tmp_path / "in.jsonl"), str(tmp_path / "out"))
    kept = sorted(json.loads(line)["id"] for line in open(tmp_path / "out" / "part-00000.jsonl"))
    assert kept == [i for i, s in enumerate(scores) if s <= ceiling] and len(kept) == 4
    assert report["removed"]["long_perplexity"] == 4


def test_long_context_mixture_and_the_32k_config():
    assert mixture.long_context("L", "S", 0.25) == (("L", 0.25), ("S", 0.75))
    with pytest.raises(mixture.MixtureError, match="long_share"):
        mixture.long_context("L", "S", 1.0)
    config = C.validate(C.load_config_file(os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                                                        "internlm2_7b_32k.py")))
    stage = C.stage_plan(config)[1].config
    assert stage.data.source == "mixture" and stage.data.mixture == (("curated/long", 0.5), ("curated/all", 0.5))
    assert stage.data.seq_len == 32768
