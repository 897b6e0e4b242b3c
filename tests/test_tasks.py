"""Synthetic SFT tasks: determinism, split hygiene, and answers checked against independent oracles."""

import json
import random
import re
from collections import Counter

import pytest

from maxlm.config import SFT_TASKS
from maxlm.data import tasks

WRAPPERS = {
    "bracket": lambda w: "[" + w + "]",
    "quote": lambda w: '"' + w + '"',
    "json": lambda w: '{"answer": "' + w + '"}',
    "prefix": lambda w: "Answer: " + w,
    "twice": lambda w: w + " " + w,
}
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def splits():
    return {t: (tasks.make_items(t, "train", 2000), tasks.make_items(t, "eval", 200)) for t in SFT_TASKS}


def _expected(item):
    """The answer recomputed from the key alone, without the module's own code."""
    task, rest = item.key.split(":", 1)
    assert task == item.task
    if task == "format":
        variant, letters = rest.split(":")
        assert re.fullmatch(r"[a-z]{3,6}", letters) and " ".join(letters) in item.prompt
        return WRAPPERS[variant](" ".join(letters))
    if task == "add":
        a, b = (int(s) for s in rest.split("+"))
        assert 10 <= a <= 999 and 10 <= b <= 999 and f"{a}" in item.prompt and f"{b}" in item.prompt
        return str(a + b)
    assert re.fullmatch(r"[a-z]{3,6}", rest) and " ".join(rest) in item.prompt
    assert task != "sort" or len(set(rest)) == len(rest)  # sort draws distinct letters
    return " ".join(reversed(rest)) if task == "reverse" else " ".join(sorted(rest))


def test_sizes_and_determinism():
    for t in SFT_TASKS:
        a = tasks.make_items(t, "train", 100, seed=3)
        assert len(a) == 100 and a == tasks.make_items(t, "train", 100, seed=3)
        assert [i.key for i in a] != [i.key for i in tasks.make_items(t, "train", 100, seed=4)]


def test_splits_disjoint_and_unique(splits):
    for t, (train, ev) in splits.items():
        tr_keys, ev_keys = [i.key for i in train], [i.key for i in ev]
        assert len(set(tr_keys)) == 2000 and len(set(ev_keys)) == 200
        assert not set(tr_keys) & set(ev_keys), t


def test_splits_independent_of_sizes():
    for t in SFT_TASKS:
        ev = tasks.make_items(t, "eval", 50)
        tasks.make_items(t, "train", 300)
        assert tasks.make_items(t, "eval", 200)[:50] == ev
        assert tasks.make_items(t, "train", 500)[:100] == tasks.make_items(t, "train", 100)


def test_answers_match_independent_oracle(splits):
    for t, (train, ev) in splits.items():
        for item in train + ev:
            assert item.task == t and item.answer == _expected(item), item


def test_languages_and_phrasings(splits):
    for t, (train, _) in splits.items():
        langs = [i.lang for i in train]
        assert 0.4 < langs.count("zh") / len(langs) < 0.6, t
        for item in train:
            assert bool(CJK.search(item.prompt)) == (item.lang == "zh"), item
        for lang in ("en", "zh"):
            shapes = {re.sub(r"[a-z]( [a-z])+|\b[a-z]{3,7}\b|\d+", "#", i.prompt) for i in train if i.lang == lang}
            assert len(shapes) >= 3, (t, lang, shapes)


def test_format_variants_all_used(splits):
    variants = {i.key.split(":")[1] for i in splits["format"][0]}
    assert variants == set(WRAPPERS)


def test_check():
    for t in SFT_TASKS:
        for item in tasks.make_items(t, "eval", 20):
            assert tasks.check(item, item.answer)
            assert tasks.check(item, "  \n" + item.answer + " \n")
            assert not tasks.check(item, "")
            assert not tasks.check(item, item.answer + ".")


def test_wrong_answer_never_correct_and_plausible(splits):
    rng = random.Random(0)
    for t, (train, _) in splits.items():
        for item in train[:1000]:
            wrong = tasks.wrong_answer(item, rng)
            assert wrong != item.answer and not tasks.check(item, wrong), item
            if t == "add":
                assert 0 < abs(int(wrong) - int(item.answer)) <= 10
            elif t in ("reverse", "sort"):
                w, a = Counter(wrong.split(" ")), Counter(item.answer.split(" "))
                assert w == a or (sum(w.values()) == sum(a.values()) - 1 and not w - a), (item, wrong)
            else:
                assert " ".join(item.key.split(":")[2]) in wrong


def test_messages():
    item = tasks.make_items("add", "train", 1)[0]
    assert tasks.messages(item) == [{"role": "user", "content": item.prompt},
                                    {"role": "assistant", "content": item.answer}]
    m = tasks.messages(item, system_prompt="Be brief.", with_answer=False)
    assert m == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": item.prompt}]


def test_write_jsonl_roundtrip(tmp_path):
    items = [i for t in SFT_TASKS for i in tasks.make_items(t, "train", 30)]
    path = tmp_path / "sft.jsonl"
    tasks.write_jsonl(str(path), items, system_prompt="你是一个助手。")
    raw = path.read_text(encoding="utf-8")
    assert "你是一个助手" in raw and "\\u" not in raw
    rows = [json.loads(line) for line in raw.splitlines()]
    assert len(rows) == len(items)
    for row, item in zip(rows, items):
        assert row["task"] == item.task and row["lang"] == item.lang
        assert row["messages"] == [{"role": "system", "content": "你是一个助手。"},
                                   {"role": "user", "content": item.prompt},
                                   {"role": "assistant", "content": item.answer}]


@pytest.mark.parametrize("args", [("copy", "train", 5), ("add", "test", 5), ("add", "train", 0)])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        tasks.make_items(*args)
