"""Generation benchmarks in the GSM8K shape: few-shot prompts, greedy continuation, answer extraction.

Rows are jsonl `{"question", "answer"}` where the answer may carry its worked solution and end in
"#### <final answer>" as GSM8K's do (Cobbe et al. 2021). The prompt is k solved examples from a `train`
file (or the first rows) as "Question: ...\\nAnswer: ...\\n\\n", then the question and "Answer:" -- the
format of lm-evaluation-harness's gsm8k task. The model continues greedily through the generation engine; the
continuation is cut where it starts a new "Question:" or a blank line, and the final answer is extracted:
the number after "####" when there is one, else the last number in the text (commas and a trailing period
dropped). Exact match compares the extracted strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from maxlm import tokenizer as tokenizer_lib
from maxlm.errors import InputError
from maxlm.inference import engine as engine_lib
from maxlm.model import sampler as sample

_HASHES = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """"#### 1,234" -> "1234"; otherwise the last number; "" when there is none."""
    found = _HASHES.search(text)
    if found:
        value = found.group(1)
    else:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return ""
        value = numbers[-1]
    value = value.replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def load_rows(path: str) -> list[dict]:
    """The `{"question", "answer"}` rows of a jsonl file; a line that is not one is an InputError naming it
    (a benchmark file is small and curated: a broken line is a broken benchmark, not noise to skip)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise InputError(f"{path}:{n}: rows need question and answer fields, got {line.strip()[:80]}")
            rows.append(row)
    return rows


def prompt(shots: Sequence[dict], row: dict) -> str:
    solved = "".join(f"Question: {s['question'].strip()}\nAnswer: {s['answer'].strip()}\n\n" for s in shots)
    return solved + f"Question: {row['question'].strip()}\nAnswer:"


def cut(continuation: str) -> str:
    """The answer part of a continuation: up to a new "Question:" or a blank line."""
    return re.split(r"\n\s*\n|Question:", continuation, maxsplit=1)[0]


def score(config: ml_collections.ConfigDict, params: dict, tok: Any, rows: Sequence[dict], shots: Sequence[dict], *,
          max_new_tokens: int = 256) -> dict:
    """Greedy exact match of the extracted final answers -> {"task", "exact_match", "n", "unscoreable",
    "items"}. The continuation gets `max_new_tokens`, or what the model's context leaves after the longest
    prompt. A row whose answer has no final answer to extract cannot be scored: it is counted in
    `unscoreable` by reason, left out of `n` and the mean, and its item has `correct` None; no scoreable row
    at all is an InputError."""
    golds = [extract_answer(str(r["answer"])) for r in rows]
    unscoreable = {"no_gold_answer": golds.count("")} if "" in golds else {}
    if len(rows) == golds.count(""):
        raise InputError(f"no scoreable row among {len(rows)}: no row's answer has a final answer to extract "
                         "(a number, or '#### <answer>')")
    prompts = [tokenizer_lib.text_prefix(tok) + tok.encode(prompt(shots, r)) for r in rows]
    room = config.model.max_seq_len - max((len(p) for p in prompts), default=0)
    if room < 1:
        raise sample.SampleError(f"the longest {len(shots)}-shot prompt fills model.max_seq_len="
                                 f"{config.model.max_seq_len}: use fewer shots")
    max_new_tokens = min(max_new_tokens, room)
    outs = engine_lib.generate(config, params, prompts, max_new_tokens=max_new_tokens, greedy=True, eos_id=tok.eos_id)
    outputs = [tok.decode(o) for o in outs]
    items = []
    for row, out, gold in zip(rows, outputs, golds):
        pred = extract_answer(cut(out))
        items.append({"question": row["question"], "response": cut(out), "pred": pred, "gold": gold,
                      "correct": pred == gold if gold else None})
    scored = [i["correct"] for i in items if i["correct"] is not None]
    return {"task": "gen", "exact_match": sum(scored) / len(scored), "n": len(scored), "unscoreable": unscoreable,
            "shots": len(shots), "items": items}
