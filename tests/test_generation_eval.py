"""GSM8K-style generation evaluation (maxlm/evaluation/generation.py): answer extraction on literal cases, the
few-shot prompt against a literal string, and greedy continuations equal to `transformers.generate`, item by
item, with the same extracted answers."""

import json

import numpy as np
import pytest
import torch

from maxlm import tokenizer as tokenizer_lib
from maxlm.evaluation import generation as gen
from maxlm.interop import pretrained
from tests.helpers import ROOT


@pytest.mark.parametrize("text,want", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("so the total is 12.50 dollars.", "12.5"),
    ("The answer is -3.", "-3"),
    ("first 5, then 10, finally 2,500.", "2500"),
    ("答案是 42。", "42"),
    ("no number here", ""),
])
def test_extract_answer(text, want):
    assert gen.extract_answer(text) == want


def test_prompt_and_cut():
    shot = {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}
    assert gen.prompt([shot], {"question": " What is 2 + 3? ", "answer": "5"}) == (
        "Question: What is 1 + 1?\nAnswer: 1 + 1 = 2\n#### 2\n\nQuestion: What is 2 + 3?\nAnswer:")
    assert gen.cut(" 2 + 3 = 5\n#### 5\n\nQuestion: next") == " 2 + 3 = 5\n#### 5"
    assert gen.cut(" 5 Question: more") == " 5 "


class _CharTokenizer:
    """One token per character (ids above 2), so scripted continuations decode exactly."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text):
        return [ord(ch) + 3 for ch in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


# (question, reference answer, the scripted continuation, right?) -- rightness decided here by reading them
SCRIPT = [
    ("q1", "3 + 9 = 12\n#### 12", " 3 + 9 = 12\n#### 12", True),
    ("q2", "#### 1,234", " The total is 1234.", True),
    ("q3", "#### 7", " 7\n\nQuestion: what is 8?", True),
    ("q4", "#### 7", " 5\n\nQuestion: is it 7?", False),  # a number after the cut does not count
    ("q5", "no number", " no idea", None),  # no gold answer to extract: unscoreable, not wrong
    ("q6", "#### 2.50", " it costs 2.5", True),
    ("q7", "#### 10", " 100", False),
]


def test_exact_match_over_scripted_continuations(monkeypatch):
    """`score`'s exact match and items, with the sampler replaced by scripted continuations: 4 of the 6
    scoreable right; the row without a gold answer counted as unscoreable, not as wrong."""
    from maxlm import config as C

    tok = _CharTokenizer()
    replies = {q: reply for q, _, reply, _ in SCRIPT}
    seen = []

    def generate(config, params, prompts, *, max_new_tokens, greedy, eos_id):
        assert greedy and eos_id == tok.eos_id and all(p[0] == tok.bos_id for p in prompts)
        seen.extend(tok.decode(p) for p in prompts)
        return [tok.encode(replies[tok.decode(p).rsplit("Question: ", 1)[1].split("\n")[0]]) for p in prompts]

    monkeypatch.setattr(gen.engine_lib, "generate", generate)
    shot = {"question": "What is 1 + 1?", "answer": "#### 2"}
    rows = [{"question": q, "answer": a} for q, a, _, _ in SCRIPT]
    result = gen.score(C.default_config(), None, tok, rows, [shot])
    assert seen == [gen.prompt([shot], r) for r in rows]
    assert [i["correct"] for i in result["items"]] == [right for *_, right in SCRIPT]
    assert [i["pred"] for i in result["items"]] == ["12", "1234", "7", "5", "", "2.5", "100"]
    assert [i["gold"] for i in result["items"]] == ["12", "1234", "7", "7", "", "2.5", "10"]
    assert (result["exact_match"], result["n"], result["shots"]) == (4 / 6, 6, 1)
    assert result["unscoreable"] == {"no_gold_answer": 1}
    with pytest.raises(ValueError, match="no scoreable row among 2"):
        gen.score(C.default_config(), None, tok, [rows[4], rows[4]], [shot])


def test_greedy_answers_match_transformers(tmp_path, hf_base):
    from transformers import LlamaForCausalLM

    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in [(2, 3), (10, 7), (1, 1), (4, 0), (6, 6)]]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = gen.load_rows(str(path))
    config, params, tok_path = pretrained.load_base(hf_base)
    tok = tokenizer_lib.load(tok_path)
    result = gen.score(config, params, tok, rows[1:], rows[:1], max_new_tokens=12)
    hf = LlamaForCausalLM.from_pretrained(hf_base).eval()
    for row, item in zip(rows[1:], result["items"]):
        ids = torch.tensor([[tok.bos_id] + tok.encode(gen.prompt(rows[:1], row))])
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id)[0, ids.shape[1]:].tolist()
        if tok.eos_id in out:
            out = out[:out.index(tok.eos_id)]
        assert item["response"] == gen.cut(tok.decode(out))
        assert item["pred"] == gen.extract_answer(gen.cut(tok.decode(out))) and item["gold"] == row["answer"][-2:].strip("# ")
    assert result["n"] == 4 and result["exact_match"] == sum(i["correct"] for i in result["items"]) / 4
    with pytest.raises(ValueError, match="question and answer"):
        (tmp_path / "bad.jsonl").write_text('{"q": 1}\n')
        gen.load_rows(str(tmp_path / "bad.jsonl"))


def test_command_line(tmp_path, hf_base):
    import subprocess
    import sys

    (tmp_path / "gsm").mkdir()
    rows = [{"question": f"What is {a} times 2?", "answer": f"{a} * 2 = {2 * a}\n#### {2 * a}"} for a in range(6)]
    (tmp_path / "gsm" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "gsm" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    done = subprocess.run([sys.executable, "-m", "maxlm.evaluate", f"--hf={hf_base}", "--task=gen",
                           f"--data={tmp_path}/gsm", "--shots=2", f"--out={tmp_path}/out"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["task"] == "gen" and summary["n"] == 4 and summary["shots"] == 2
    items = [json.loads(line) for line in open(tmp_path / "out" / "gen.jsonl")]
    assert [i["gold"] for i in items] == ["4", "6", "8", "10"]
    assert summary["exact_match"] == np.mean([i["pred"] == g for i, g in zip(items, ["4", "6", "8", "10"])])
