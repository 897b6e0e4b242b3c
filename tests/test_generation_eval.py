"""GSM8K-style generation evaluation (maxlm/generation_eval.py): answer extraction on literal cases, the
few-shot prompt against a literal string, and greedy continuations equal to `transformers.generate`, item by
item, with the same extracted answers."""

import json

import pytest
import torch

from maxlm import generation_eval as gen
from maxlm import pretrained
from maxlm import tokenizer as tokenizer_lib


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
    import os
    import subprocess
    import sys

    (tmp_path / "gsm").mkdir()
    rows = [{"question": f"What is {a} times 2?", "answer": f"{a} * 2 = {2 * a}\n#### {2 * a}"} for a in range(6)]
    (tmp_path / "gsm" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "gsm" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "maxlm.evaluate", f"--hf={hf_base}", "--task=gen",
                           f"--data={tmp_path}/gsm", "--shots=2", f"--out={tmp_path}/out"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["task"] == "gen" and summary["n"] == 4 and summary["shots"] == 2
    items = [json.loads(line) for line in open(tmp_path / "out" / "gen.jsonl")]
    assert [i["gold"] for i in items] == ["4", "6", "8", "10"]
