"""Few-shot multiple choice (maxlm/evaluation/multiple_choice.py) on a small MMLU-shaped folder built here: loading both
layouts, prompts against literal strings, and predictions equal item for item to an independent computation
with `transformers` (each choice's log-likelihood summed from the model's own softmax)."""

import csv
import json

import numpy as np
import pytest
import torch

from maxlm import tokenizer as tokenizer_lib
from maxlm.evaluation import multiple_choice as mc
from maxlm.interop import pretrained
from tests.helpers import ROOT

ROWS = [
    ("What is two plus two?", "3", "4", "5", "22", "B"),
    ("Which planet is known as the red planet?", "Venus", "Earth", "Mars", "Jupiter", "C"),
    ("Water boils at sea level at what Celsius temperature?", "100", "50", "0", "212", "A"),
    ("Which word is a verb?", "blue", "quickly", "table", "run", "D"),
    ("How many legs does a spider have?", "six", "eight", "ten", "four", "B"),
    ("Which animal barks?", "fox", "训练数据", "dog", "lazy", "C"),  # 12 bytes in 4 characters: norm and bytes differ
]


def _folder(tmp_path, header=False, jsonl=False):
    for split, rows in (("dev", ROWS[:2]), ("test", ROWS)):
        (tmp_path / split).mkdir(parents=True, exist_ok=True)
        if jsonl:
            with open(tmp_path / split / f"general_knowledge_{split}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(dict(zip(["question", "A", "B", "C", "D", "answer"], r))) + "\n")
            continue
        with open(tmp_path / split / f"general_knowledge_{split}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            if header:
                w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
            for k, r in enumerate(rows):
                w.writerow(([k] if header else []) + list(r))
    return str(tmp_path)


@pytest.mark.parametrize("layout", [dict(), dict(header=True), dict(jsonl=True)], ids=["mmlu", "ceval", "jsonl"])
def test_layouts_load_alike(tmp_path, layout):
    data = mc.load(_folder(tmp_path, **layout))
    assert list(data) == ["general_knowledge"]
    assert [r["answer"] for r in data["general_knowledge"]["eval"]] == [r[-1] for r in ROWS]
    assert data["general_knowledge"]["dev"][1]["C"] == "Mars"


def test_prompt_formats():
    row = dict(zip(["question", "A", "B", "C", "D", "answer"], ROWS[0]))
    shot = dict(zip(["question", "A", "B", "C", "D", "answer"], ROWS[1]))
    assert mc.prompt("general_knowledge", [shot], row) == (
        "The following are multiple choice questions (with answers) about general knowledge.\n\n"
        "Which planet is known as the red planet?\nA. Venus\nB. Earth\nC. Mars\nD. Jupiter\nAnswer: C\n\n"
        "What is two plus two?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    assert mc.prompt("高中_物理", [], row, lang="zh").startswith("以下是中国关于高中 物理考试的单项选择题")
    assert mc.prompt("x", [], row, lang="zh").endswith("D. 22\n答案：")


def test_bad_folder(tmp_path):
    with pytest.raises(mc.DataError, match="no val"):
        mc.load(str(tmp_path))


@pytest.mark.parametrize("mode", ["letter", "text"])
def test_predictions_match_transformers_item_for_item(tmp_path, hf_base, mode):
    from transformers import LlamaForCausalLM

    data = mc.load(_folder(tmp_path))
    config, params, tok_path = pretrained.load_base(hf_base)
    tok = tokenizer_lib.load(tok_path)
    result = mc.score(config, params, tok, data, shots=1, mode=mode)
    hf = LlamaForCausalLM.from_pretrained(hf_base).eval()
    dev = data["general_knowledge"]["dev"][:1]
    hits, hits_norm = [], []
    for item, row in zip(result["items"], data["general_knowledge"]["eval"]):
        ctx = [tok.bos_id] + tok.encode(mc.prompt("general_knowledge", dev, row))
        assert len(ctx) + 8 <= config.model.max_seq_len  # no truncation: the transformers pass sees it all
        lls, lens, byte_lens = [], [], []
        for letter in "ABCD":
            cont = tok.encode(f" {letter}" if mode == "letter" else f" {row[letter].strip()}")
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits.double(), -1)[0]
            lls.append(float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))))
            bare = letter if mode == "letter" else row[letter].strip()  # lm_eval's choice, without the " "
            lens.append(len(bare))
            byte_lens.append(len(bare.encode()))
        np.testing.assert_allclose(item["loglikelihoods"], lls, atol=1e-4)
        pred, pred_norm = "ABCD"[int(np.argmax(lls))], "ABCD"[int(np.argmax(np.array(lls) / np.array(lens)))]
        pred_bytes = "ABCD"[int(np.argmax(np.array(lls) / np.array(byte_lens)))]
        assert (item["pred"], item["pred_norm"], item["pred_bytes"]) == (pred, pred_norm, pred_bytes)
        assert (item["correct"], item["correct_norm"]) == (pred == row["answer"], pred_norm == row["answer"])
        hits.append(pred == row["answer"])
        hits_norm.append(pred_norm == row["answer"])
    assert result["n"] == len(ROWS) and (result["acc"], result["acc_norm"]) == (np.mean(hits), np.mean(hits_norm))
    if mode == "text":  # options of very different byte lengths: normalising changes the answers here
        assert np.mean(hits) != np.mean(hits_norm)


def test_command_line(tmp_path, hf_base):
    import subprocess
    import sys

    folder = _folder(tmp_path / "data")
    run = lambda *a: subprocess.run([sys.executable, "-m", "maxlm.evaluate", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    done = run(f"--hf={hf_base}", "--task=mc", f"--data={folder}", "--shots=1", "--choices=text",
               f"--out={tmp_path}/out")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["task"] == "mc" and summary["n"] == len(ROWS) and summary["shots"] == 1
    items = [json.loads(line) for line in open(tmp_path / "out" / "mc.jsonl")]
    # acc, acc_norm and acc_bytes recomputed from each item's four log-likelihoods and the bare option texts'
    # lengths in characters and in UTF-8 bytes (lm-evaluation-harness's definitions)
    lls = np.array([i["loglikelihoods"] for i in items])
    lens = np.array([[len(o.strip()) for o in row[1:5]] for row in ROWS])
    byte_lens = np.array([[len(o.strip().encode()) for o in row[1:5]] for row in ROWS])
    answers = np.array(["ABCD".index(row[-1]) for row in ROWS])
    assert summary["acc"] == np.mean(lls.argmax(1) == answers)
    assert summary["acc_norm"] == np.mean((lls / lens).argmax(1) == answers)
    assert summary["acc_bytes"] == np.mean((lls / byte_lens).argmax(1) == answers)
    assert json.load(open(tmp_path / "out" / "mc_summary.json")) == summary
    missing = run(f"--hf={hf_base}", "--task=mc")
    assert missing.returncode == 2 and "--data" in missing.stderr and "Traceback" not in missing.stderr
