"""Every heuristic quality rule (maxlm/curation/quality.py) on an English and a Chinese case: clean text passes,
text with the rule's defect is removed by that rule, and the statistics match direct computations."""

import json
import os

import pytest

from maxlm import config as config_lib
from maxlm.curation import pipeline
from maxlm.curation import quality
from tests.helpers import GOOD_EN

GOOD_ZH = (
    "清晨的小镇在集市日慢慢醒来。农民们天还没亮就推着装满苹果、洋葱和南瓜的小车赶到广场，面包师也在第一缕阳光照进来时打开了店门。\n\n"
    "到了九点，摊位前已经挤满了人。孩子们在桌子之间跑来跑去，大人们一边讨价还价一边说笑，一位老人拉着谁也叫不出名字的曲子。\n\n"
    "中午钟声响起，商贩们开始收拾货物，数着零钱，约好下周再来。"
)


def _only(rule, **overrides):
    q = config_lib.curate_config().quality
    q.rules = (rule,)
    for key, value in overrides.items():
        q[rule][key] = value
    return q


@pytest.mark.parametrize("text", [GOOD_EN, GOOD_ZH], ids=["en", "zh"])
def test_clean_text_passes_every_rule(text):
    assert quality.check(text, config_lib.curate_config().quality) is None


BAD = {
    "length": ("Too short to be a document.", "太短了，不是文档。"),
    "mean_word_length": (
        " ".join(["a", "b", "of", "it", "x", "to"] * 10) + ".",
        GOOD_ZH + " " + " ".join(["aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQ="] * 25),
    ),
    "symbol_ratio": (GOOD_EN + " " + " ".join(f"#tag{i}" for i in range(20)), GOOD_ZH + "等等……" * 30),
    "line_punctuation": (
        "\n".join(["Home", "About us", "Products and services", "Contact", "Careers", "Press", "Log in"] * 3)
        + "\n" + GOOD_EN.split("\n")[0],
        "\n".join(["首页", "关于我们", "产品与服务", "联系我们", "加入我们", "新闻中心", "登录"] * 3) + "\n" + GOOD_ZH.split("\n")[0],
    ),
    "repeated_lines": (GOOD_EN + "\n" + "\n".join(["Subscribe to our newsletter for daily updates."] * 8),
                       GOOD_ZH + "\n" + "\n".join(["订阅我们的新闻通讯，获取每日更新。"] * 8)),
    "repeated_paragraphs": (GOOD_EN + "\n\n" + "\n\n".join([GOOD_EN.split("\n\n")[1]] * 3),
                            GOOD_ZH + "\n\n" + "\n\n".join([GOOD_ZH.split("\n\n")[1]] * 3)),
    "top_ngrams": (GOOD_EN + " " + " ".join(f"buy now {w}." for w in "abcdefghijklmnopqrstuvwxyz"),
                   GOOD_ZH + "".join(f"快来{c}。" for c in "一二三四五六七八九十百千万亿甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉戌亥")),
    "repeated_ngrams": (GOOD_EN + " " + " ".join(["click here to win a free prize today"] * 6),
                        GOOD_ZH + "点击这里赢取免费大奖" * 8),
    "alpha_fraction": (" ".join(str(1000 + 37 * i) for i in range(80)) + " units.",
                       "数据：" + "，".join(str(1000 + 37 * i) for i in range(80)) + "。"),
}


@pytest.mark.parametrize("rule", sorted(BAD))
@pytest.mark.parametrize("lang", [0, 1], ids=["en", "zh"])
def test_each_rule_removes_its_defect(rule, lang):
    q = _only(rule)
    assert quality.check((GOOD_EN, GOOD_ZH)[lang], q) is None
    assert quality.check(BAD[rule][lang], q) == rule
    assert quality.check(BAD[rule][lang], config_lib.curate_config().quality) is not None


@pytest.mark.parametrize("lang", [0, 1], ids=["en", "zh"])
def test_blocklist_words_and_domains(lang):
    good = (GOOD_EN, GOOD_ZH)[lang]
    q = _only("blocklist", words=("crimson", "违禁词"), domains=("evil.example",))
    assert quality.check(good, q) is None
    if lang == 0:
        assert quality.check(good + " A Crimson banner.", q) == "blocklist"
        assert quality.check(good + " Crimsonness is not a blocked word.", q) is None  # word boundaries
    else:
        assert quality.check(good + "这里有违禁词。", q) == "blocklist"  # no spaces in Chinese: substring
    assert quality.check(good + " See https://www.evil.example/page.", q) == "blocklist"
    assert quality.check(good + " See https://notevil.example/page.", q) is None
    assert quality.check(good, q, url="http://evil.example/a") == "blocklist"
    assert quality.check(good + "违禁词 crimson", _only("blocklist", words=("crimson", "违禁词"), max_hits=2)) is None


def test_chinese_punctuation_is_not_a_word():
    """Real Chinese prose with more full-width punctuation marks than `min_words`: before the marks were left out of
    the words, each counted as a one-character word and every such page failed mean_word_length."""
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(__file__), "data", "langid.jsonl"),
                                              encoding="utf-8")]
    text = "\n\n".join("".join(r["text"] for r in rows if r["lang"] == "zh")[i:i + 300] for i in range(0, 900, 300))
    assert sum(text.count(p) for p in "，。") > 20
    assert quality.check(text, config_lib.curate_config().quality) is None
    assert quality.check(text + "\n\n" + " ".join(["Supercalifragilistic"] * 30) + ".",
                         _only("mean_word_length")) == "mean_word_length"  # the Latin words are still measured


def test_units_count_cjk_characters():
    assert quality.Doc("Hello, world! 你好世界。").units == ["Hello,", "world!", "你", "好", "世", "界", "。"]


def test_ngram_statistics_match_direct_counts():
    units = "a b c a b c a b d e".split()
    # most frequent 2-gram: (a, b) 3 times, 2 chars each -> 6 / 10
    assert quality.top_ngram_fraction(units, 2) == pytest.approx(6 / 10)
    # 3-grams: "a b c" twice (positions 0, 3) covers units 0..5; "b c a" twice (1, 4) covers 1..6;
    # "c a b" twice (2, 5) covers 2..7 -> units 0..7 covered = 8 of 10
    assert quality.duplicate_ngram_fraction(units, 3) == pytest.approx(8 / 10)
    # 5-grams: "a b c a b" at 0 and 3 covers units 0..7; no 6-gram repeats
    assert quality.duplicate_ngram_fraction(units, 5) == pytest.approx(8 / 10)
    assert quality.duplicate_ngram_fraction(units, 6) == 0.0
    assert quality.duplicate_ngram_fraction(["x"] * 3, 5) == 0.0


def test_validate_names_the_key():
    c = config_lib.curate_config()
    c.quality.rules = ("length", "nonsense")
    with pytest.raises(config_lib.ConfigError, match="quality.rules"):
        pipeline.validate_curate(c)
    c = config_lib.curate_config()
    c.stages = "dedup,typo"
    with pytest.raises(config_lib.ConfigError, match="stages"):
        pipeline.validate_curate(c)
    c.stages = "dedup"
    assert config_lib.curate_stages(c) == ("exact", "near")
