"""Passkey retrieval (maxlm/evaluation/passkey.py): prompts of the asked length with the needle at the asked depth,
scoring by the first number of the answer (with an oracle that reads the key back from the prompt, and one
that never can), the heat map, and the command line on a random model."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from maxlm import tokenizer as tokenizer_lib
from maxlm.evaluation import passkey
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def tok(shared_tok_path):
    return tokenizer_lib.load(shared_tok_path)


@pytest.mark.parametrize("length", [400, 800])  # this test tokenizer spends ~200 tokens on the rest
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_length_and_depth(tok, length, depth):
    ids = passkey.build(tok, length, depth, 12345)
    unit = len(tok.encode(passkey.FILLER))
    assert length - unit < len(ids) <= length
    text = tok.decode(ids[1:])
    at = text.index("The pass key is 12345")
    before = text[:at].count("The grass is green")
    total = text.count("The grass is green")
    assert before == round(total * depth)
    assert text.endswith(passkey.QUESTION) and text.count("12345") == 2


def test_grid_scores_first_numbers(tok, tmp_path):
    def reader(prompts):  # an oracle: answers with the key it finds in the prompt
        return [" " + tok.decode(p).split("The pass key is ")[1].split(".")[0] + ". And 7." for p in prompts]

    perfect = passkey.grid(reader, tok, [300, 500], [0.0, 1.0], trials=3)
    assert perfect["accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and len(perfect["items"]) == 12
    wrong = passkey.grid(lambda ps: [" 7 " for _ in ps], tok, [300], [0.5], trials=2)
    assert wrong["mean"] == 0.0
    assert perfect["mean"] == 1.0 and wrong["accuracy"] == [[0.0]]
    passkey.heat_map(perfect, str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert passkey.first_number(" is 0123 and 5") == "0123" and passkey.first_number("none") == ""
    with pytest.raises(ValueError, match="too short"):
        passkey.build(tok, 20, 0.5, 11111)


# answers of the scripted reader for key k, and whether each one states the key first
FORMS = [(" {k}. And 7.", True), (" 7, then {k}", False), (" {k}0", False), (" is {k}!", True), (" {short}", False),
         (" {k} 42.", True)]


def test_grid_cells_against_a_scripted_reader(tok):
    """A reader that finds the key in each prompt and answers in one of FORMS (picked by the key's value):
    each cell's accuracy, the mean and every item against what the reader meant, and each call's prompts of
    its cell's length and depth."""
    lengths, depths, trials = [300, 500], [0.0, 0.5, 1.0], 4
    calls = []

    def reader(prompts):
        keys = [int(re.search(r"The pass key is (\d{5})\.", tok.decode(p)).group(1)) for p in prompts]
        calls.append((prompts, keys))
        return [FORMS[k % len(FORMS)][0].format(k=k, short=str(k)[:-1]) for k in keys]

    result = passkey.grid(reader, tok, lengths, depths, trials=trials, seed=3)
    assert len(calls) == len(lengths) * len(depths)
    unit = len(tok.encode(passkey.FILLER))
    want, rows = np.zeros((len(lengths), len(depths))), []
    for c, (prompts, keys) in enumerate(calls):
        i, j = divmod(c, len(depths))
        assert len(prompts) == trials
        for p, k in zip(prompts, keys):
            assert lengths[i] - unit < len(p) <= lengths[i]
            text = tok.decode(p)
            at = text.index("The pass key is")
            assert text[:at].count("The grass is green") == round(text.count("The grass is green") * depths[j])
            rows.append({"length": lengths[i], "depth": depths[j], "key": k, "correct": FORMS[k % len(FORMS)][1]})
        want[i, j] = np.mean([FORMS[k % len(FORMS)][1] for k in keys])
    assert len(np.unique(want)) > 1  # the cells differ: a misplaced cell would show
    np.testing.assert_array_equal(result["accuracy"], want)
    assert result["mean"] == pytest.approx(want.mean(), abs=1e-12)
    assert [{k: r[k] for k in ("length", "depth", "key", "correct")} for r in result["items"]] == rows


def test_command_line(tmp_path, shared_tok_path):
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # a random model with room for 600-token prompts
    LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer_lib.load(shared_tok_path).vocab_size, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=1024)).save_pretrained(str(tmp_path / "m"))
    shutil.copy(shared_tok_path, tmp_path / "m" / "tokenizer.model")
    done = subprocess.run([sys.executable, "-m", "maxlm.evaluate", f"--hf={tmp_path}/m", "--task=passkey",
                           "--lengths=300,600", "--depths=0,0.5,1", "--trials=2", f"--out={tmp_path}/out"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["task"] == "passkey" and (summary["lengths"], summary["depths"]) == ([300, 600], [0, 0.5, 1])
    # each cell recomputed from the answers written: right when the answer's first digits are the key
    items = [json.loads(line) for line in open(tmp_path / "out" / "passkey.jsonl")]
    assert len(items) == 2 * 3 * 2
    right = {}
    for r in items:
        found = re.search(r"\d+", r["answer"])
        right.setdefault((r["length"], r["depth"]), []).append(bool(found) and found.group() == str(r["key"]))
    want = [[np.mean(right[(n, d)]) for d in (0, 0.5, 1)] for n in (300, 600)]
    assert summary["accuracy"] == want and summary["mean"] == pytest.approx(np.mean(want), abs=1e-12)
    assert (tmp_path / "out" / "passkey.png").exists()
