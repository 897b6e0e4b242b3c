"""Few-shot multiple choice in the MMLU / C-Eval shape, scored by comparing the choices' log-likelihoods.

Data: a local folder (nothing is downloaded) with a `dev` split for the k shots and a `test` (or `val`)
split to score, one file per subject -- `DIR/dev/<subject>_dev.csv`, `DIR/test/<subject>_test.csv` as
MMLU ships them (no header) or C-Eval (`id,question,A,B,C,D,answer[,explanation]` header), or the same as
jsonl rows {"question", "A", "B", "C", "D", "answer"}.

Prompts follow the benchmarks' own formats (Hendrycks et al. 2021 for MMLU, Huang et al. 2023 for C-Eval):
a subject header, k solved dev examples, then the question with its lettered options and "Answer:" /
"答案：". Each choice is a continuation of that prompt: its letter (" A", as lm-evaluation-harness's MMLU
does) or, with `choices="text"`, the option's text. `acc` takes the choice with the highest total
log-likelihood; `acc_norm` divides each by the length of the bare choice in characters first, and
`acc_bytes` by its length in UTF-8 bytes -- lm-evaluation-harness's two normalisations (its
`process_results` for multiple choice), of the choice without the " " that joins it to the prompt. With
letter choices every length is 1 and both equal `acc`, as in the harness.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from maxlm import tokenizer as tokenizer_lib
from maxlm.errors import UserError
from maxlm.model import scoring

LETTERS = ("A", "B", "C", "D")
HEADERS = {
    "en": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
}
ANSWER = {"en": "Answer:", "zh": "答案："}


class DataError(UserError):
    """A benchmark folder that cannot be read: one line for the user."""


def _rows(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, encoding="utf-8", newline="") as f:
        table = list(csv.reader(f))
    if table and {"question", "answer"} <= set(table[0]):
        header, table = table[0], table[1:]
    else:
        header = ["question", *LETTERS, "answer"]
    return [dict(zip(header, row)) for row in table if row]


def _subject(path: str, split: str) -> str:
    name = os.path.basename(path).rsplit(".", 1)[0]
    return name[:-len(split) - 1] if name.endswith("_" + split) else name


def load(folder: str, split: str = "") -> dict[str, dict[str, list[dict]]]:
    """{subject: {"dev": rows, split: rows}}; `split` defaults to test, else val."""
    split = split or ("test" if os.path.isdir(os.path.join(folder, "test")) else "val")
    out: dict[str, dict[str, list[dict]]] = {}
    for part in ("dev", split):
        for path in sorted(glob.glob(os.path.join(folder, part, "*.csv")) + glob.glob(os.path.join(folder, part, "*.jsonl"))):
            out.setdefault(_subject(path, part), {"dev": [], split: []})[part] = _rows(path)
    if not any(v[split] for v in out.values()):
        raise DataError(f"{folder}: no {split}/*.csv or {split}/*.jsonl rows (MMLU / C-Eval layout)")
    for subject, parts in out.items():
        for row in parts["dev"] + parts[split]:
            missing = [k for k in ("question", *LETTERS, "answer") if k not in row]
            if missing or row["answer"].strip() not in LETTERS:
                raise DataError(f"{folder}: a {subject} row lacks {missing or 'an answer in A-D'}: {row}")
    return {s: {"dev": p["dev"], "eval": p[split]} for s, p in out.items()}


def format_question(row: dict, lang: str, with_answer: bool) -> str:
    text = row["question"].strip() + "\n" + "".join(f"{k}. {row[k]}\n" for k in LETTERS) + ANSWER[lang]
    return text + (f" {row['answer'].strip()}\n\n" if with_answer else "")


def prompt(subject: str, shots: Sequence[dict], row: dict, lang: str = "en") -> str:
    """The k-shot prompt: header, solved dev examples, the question up to "Answer:"."""
    pretty = subject.replace("_", " ")
    return HEADERS[lang].format(subject=pretty) + "".join(format_question(s, lang, True) for s in shots) + \
        format_question(row, lang, False)


def choice_texts(row: dict, mode: str = "letter") -> list[str]:
    """The bare choices: "A" ... (letters) or each option's text."""
    return [k if mode == "letter" else row[k].strip() for k in LETTERS]


def choices(row: dict, mode: str = "letter") -> list[str]:
    """The continuation of each choice: " A" ... (letters) or " <option text>" (the bare choice after the
    harness's target delimiter " ")."""
    return [" " + c for c in choice_texts(row, mode)]


def score(config: ml_collections.ConfigDict, params: dict, tok: Any, data: dict[str, dict[str, list[dict]]], *,
          shots: int = 5, lang: str = "en", mode: str = "letter") -> dict:
    """Per-item results and acc / acc_norm / acc_bytes over every subject's eval rows (k shots from its dev
    rows)."""
    contexts, continuations, meta = [], [], []
    for subject in sorted(data):
        dev, rows = data[subject]["dev"][:shots], data[subject]["eval"]
        for i, row in enumerate(rows):
            ctx = tokenizer_lib.text_prefix(tok) + tok.encode(prompt(subject, dev, row, lang))
            for c in choices(row, mode):
                contexts.append(ctx)
                continuations.append(tok.encode(c))
            meta.append((subject, i, row))
    ll = scoring.loglikelihoods(config, params, contexts, continuations)
    items = []
    for k, (subject, i, row) in enumerate(meta):
        mine = ll[4 * k:4 * k + 4]
        texts = choice_texts(row, mode)
        norm = [v / max(len(t), 1) for v, t in zip(mine, texts)]
        per_byte = [v / max(len(t.encode("utf-8")), 1) for v, t in zip(mine, texts)]
        pred, pred_norm, pred_bytes = (LETTERS[max(range(4), key=scores.__getitem__)] for scores in (mine, norm, per_byte))
        answer = row["answer"].strip()
        items.append({"subject": subject, "index": i, "answer": answer, "pred": pred, "pred_norm": pred_norm,
                      "pred_bytes": pred_bytes, "loglikelihoods": mine, "correct": pred == answer,
                      "correct_norm": pred_norm == answer, "correct_bytes": pred_bytes == answer})
    n = len(items)
    return {"task": "mc", "acc": sum(r["correct"] for r in items) / max(n, 1),
            "acc_norm": sum(r["correct_norm"] for r in items) / max(n, 1),
            "acc_bytes": sum(r["correct_bytes"] for r in items) / max(n, 1), "n": n, "shots": shots, "items": items}
