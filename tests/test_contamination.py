"""Contamination check (maxlm/evaluation/contamination.py): a corpus with known overlaps planted in it (case,
punctuation and spacing changed; Chinese without spaces), near misses one unit short of an n-gram, and the
command line's per-benchmark fractions."""

import json
import random
import subprocess
import sys

import pytest

from maxlm.evaluation import contamination
from tests.helpers import ROOT


def _items(rng, n, zh=False):
    if zh:
        chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
        return ["".join(rng.choice(chars) for _ in range(rng.randint(20, 40))) + "？" for _ in range(n)]
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 8))) for _ in range(4000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(18, 30))) + "?" for _ in range(n)]


def _planted(seed=0):
    rng = random.Random(seed)
    bench = {"en": _items(rng, 30), "zh": _items(rng, 20, zh=True), "tiny": ["too short to check"]}
    filler = _items(rng, 200)
    corpus = list(filler)
    dirty = {"en": {3, 17}, "zh": {5}}
    en3 = bench["en"][3].split()
    corpus[10] = "Intro text. " + " ".join(en3[2:15]).upper().replace(" ", " ,  ") + " more words after."  # 13 units
    corpus[50] += " " + bench["en"][17]  # the whole item
    corpus[70] = "前言" + bench["zh"][5][4:17] + "后记"  # 13 characters, no spaces
    en8 = bench["en"][8].split()
    corpus[90] = " ".join(en8[:12])  # a near miss: 12 units only
    corpus[91] = bench["zh"][9][:12]
    return bench, corpus, dirty


def test_finds_exactly_the_planted_overlaps():
    bench, corpus, dirty = _planted()
    result = contamination.check(bench, iter(corpus), n=13)
    for name in ("en", "zh"):
        got = {r["index"] for r in result[name]["items"] if r["contaminated"]}
        assert got == dirty[name], name
        assert result[name]["fraction"] == pytest.approx(len(dirty[name]) / len(bench[name]))
    assert result["tiny"]["too_short"] == 1 and result["tiny"]["checked"] == 0
    en17 = next(r for r in result["en"]["items"] if r["index"] == 17)
    assert en17["matched"] == en17["ngrams"]  # the whole item was copied: every n-gram matches
    assert contamination.check(bench, iter(corpus), n=12)["en"]["items"][8]["contaminated"]  # the near miss


def test_units_ignore_case_punctuation_and_spacing():
    assert contamination.units("Hello,  WORLD!\n你好，世界。") == "hello world 你 好 世 界"


def test_command_line(tmp_path):
    bench, corpus, dirty = _planted(1)
    (tmp_path / "bench").mkdir()
    for name in ("en", "zh"):
        with open(tmp_path / "bench" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for text in bench[name]:
                f.write(json.dumps({"question": text}, ensure_ascii=False) + "\n")
    with open(tmp_path / "corpus.jsonl", "w", encoding="utf-8") as f:
        for text in corpus:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        f.write("{broken\n")
    done = subprocess.run([sys.executable, "-m", "maxlm.evaluate", "--task=contamination", f"--data={tmp_path}/bench",
                           f"--corpus={tmp_path}/corpus.jsonl", f"--out={tmp_path}/out"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["contaminated"] == {"en": 2, "zh": 1}
    assert summary["fractions"]["en"] == pytest.approx(2 / 30)
    assert json.load(open(tmp_path / "out" / "contamination_summary.json")) == summary
    rows = [json.loads(line) for line in open(tmp_path / "out" / "contamination.jsonl")]
    assert {(r["benchmark"], r["index"]) for r in rows if r["contaminated"]} == {("en", 3), ("en", 17), ("zh", 5)}
