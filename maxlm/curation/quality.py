"""Heuristic document-quality rules, each named and configurable, for English and Chinese alike.

The rules and default thresholds are Gopher's (Rae et al. 2021, appendix A: length, mean word length,
symbol-to-word ratio, repetition of lines, paragraphs and n-grams), C4's terminal-punctuation line rule
(Raffel et al. 2020) relaxed to a fraction, an alphabetic-character fraction, and a safety blocklist of
words and URL domains -- the "heuristic statistical rules" InternLM2 and Baichuan-7B filter with.

Chinese has no spaces between words, so every statistic counts *units*: a CJK character is one unit, and
any other run of non-space characters is one unit (an English word with its punctuation). Gopher's n-gram
rules then run over characters for Chinese and over words for English without a segmenter. Mean word
length only makes sense for the non-CJK units, and is skipped when a document has too few of them.

`check(text, config) -> rule name | None` runs the enabled rules in order and names the first one that
removes the document, so the report can count removals per rule. The thresholds live in the curate schema
(`maxlm.config.curate_config().quality`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

# Scripts written without spaces between words (CJK radicals and symbols, kana, bopomofo, ideographs,
# compatibility ideographs, hangul): one character is one unit. Shared with maxlm/evaluation/contamination.py.
CJK = "\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_UNIT = re.compile(rf"[{CJK}]|[^\s{CJK}]+")
_IS_CJK = re.compile(rf"[{CJK}]")
# Chinese and Japanese punctuation (ideographic and full-width forms): between two CJK characters it is a unit of
# its own, but not a word -- counted as one, a page of Chinese prose has a mean word length of 1.
_WIDE_PUNCTUATION = re.compile("[\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]+$")
_TERMINAL = tuple(".!?\"'”’。！？…」』）)")
_SYMBOL = re.compile(r"#|\.\.\.|…+")
_URL_HOST = re.compile(r"https?://([^/\s:?#\"'<>]+)", re.IGNORECASE)


@dataclasses.dataclass
class Doc:
    """One document, split once into what the rules count."""

    text: str
    url: str = ""

    @functools.cached_property
    def units(self) -> list[str]:
        return _UNIT.findall(self.text)

    @functools.cached_property
    def lines(self) -> list[str]:
        return [line.strip() for line in self.text.split("\n") if line.strip()]

    @functools.cached_property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in re.split(r"\n\s*\n", self.text) if p.strip()]


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(count, characters) of the items that repeat an earlier item."""
    seen, count, chars = set(), 0, 0
    for item in items:
        if item in seen:
            count, chars = count + 1, chars + len(item)
        seen.add(item)
    return count, chars


def _ngram_ids(units: list[str], n: int) -> np.ndarray:
    """An id per n-gram position (equal n-grams, equal ids), from per-unit ids combined polynomially."""
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(u, len(vocab)) for u in units], np.uint64) + np.uint64(1)
    h = np.zeros(len(units) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(0x100000001B3) + ids[j:len(units) - n + 1 + j]
    return h


def top_ngram_fraction(units: list[str], n: int) -> float:
    """Characters covered by the most frequent n-gram's occurrences / characters in all units (Gopher)."""
    if len(units) < n:
        return 0.0
    counts = Counter(tuple(units[i:i + n]) for i in range(len(units) - n + 1))
    gram, count = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if count < 2:
        return 0.0
    return count * sum(len(u) for u in gram) / max(sum(len(u) for u in units), 1)


def duplicate_ngram_fraction(units: list[str], n: int) -> float:
    """Characters of the units covered by any n-gram that occurs more than once / all characters (Gopher;
    overlapping occurrences count each unit once)."""
    if len(units) < n:
        return 0.0
    h = _ngram_ids(units, n)
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    starts = np.flatnonzero(counts[inverse] > 1)
    if not len(starts):
        return 0.0
    cover = np.zeros(len(units) + 1, np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    lengths = np.array([len(u) for u in units], np.int64)
    return float(lengths[np.cumsum(cover[:-1]) > 0].sum() / max(lengths.sum(), 1))


def _length(doc: Doc, c: ml_collections.ConfigDict) -> bool:
    return c.min_units <= len(doc.units) <= c.max_units


def _mean_word_length(doc: Doc, c: ml_collections.ConfigDict) -> bool:
    words = [u for u in doc.units if not _IS_CJK.match(u) and not _WIDE_PUNCTUATION.match(u)]
    if len(words) < c.min_words:  # Chinese (or nearly all CJK) text: no words to measure
        return True
    return c.min <= sum(len(w) for w in words) / len(words) <= c.max


def _symbol_ratio(doc: Doc, c: ml_collections.ConfigDict) -> bool:
    return len(_SYMBOL.findall(doc.text)) <= c.max * max(len(doc.units), 1)


def _line_punctuation(doc: Doc, c: ml_collections.ConfigDict) -> bool:
    ended = sum(line.endswith(_TERMINAL) for line in doc.lines)
    return ended >= c.min_fraction * max(len(doc.lines), 1)


def _repeated_lines(doc: Doc, c: ml_collections.ConfigDict) -> bool:
    count, chars = _duplicates(doc.lines)
    return count <= c.max_fraction * max(len(doc.lines), 1) and chars <= c.max_char_fraction * len(doc.text)


def _repeated_paragraphs(doc: Doc, c: ml_collections.ConfigDict) -> bool:
    count, chars = _duplicates(doc.paragraphs)
    return count <= c.max_fraction * max(len(doc.paragraphs), 1) and chars <= c.max_char_fraction * len(doc.text)


def _top_ngrams(doc: Doc, c: ml_collections.ConfigDict) -> bool:
    return all(top_ngram_fraction(doc.units, n) <= limit for n, limit in zip(c.n, c.max_fraction))


def _repeated_ngrams(doc: Doc, c: ml_collections.ConfigDict) -> bool:
    return all(duplicate_ngram_fraction(doc.units, n) <= limit for n, limit in zip(c.n, c.max_fraction))


def _alpha_fraction(doc: Doc, c: ml_collections.ConfigDict) -> bool:
    visible = re.sub(r"\s", "", doc.text)
    return sum(ch.isalpha() for ch in visible) >= c.min * max(len(visible), 1)


@functools.lru_cache(maxsize=8)
def _blocklist_patterns(words: tuple[str, ...]) -> tuple[re.Pattern | None, re.Pattern | None]:
    """(words with word boundaries, CJK words matched anywhere): Chinese has no word boundaries."""
    cjk = sorted({w.lower() for w in words if _IS_CJK.search(w)})
    latin = sorted({w.lower() for w in words if w and not _IS_CJK.search(w)})
    return (re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, latin)) + r")(?!\w)") if latin else None,
            re.compile("|".join(map(re.escape, cjk))) if cjk else None)


def blocked_domain(host: str, domains: tuple[str, ...]) -> bool:
    """`host` is a blocked domain or a subdomain of one ("www.example.com" under "example.com")."""
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in (d.lower().strip(".") for d in domains if d))


@functools.lru_cache(maxsize=8)
def _words_file(path: str) -> tuple[str, ...]:
    """One blocked word or phrase per line; blank lines and '#' comments ignored."""
    with open(path, encoding="utf-8") as f:
        return tuple(w.strip() for w in f if w.strip() and not w.lstrip().startswith("#"))


def _blocklist(doc: Doc, c: ml_collections.ConfigDict) -> bool:
    text = doc.text.lower()
    words = tuple(c.words) + (_words_file(c.words_file) if c.words_file else ())
    hits = sum(len(p.findall(text)) for p in _blocklist_patterns(words) if p is not None)
    hosts = _URL_HOST.findall(doc.text) + ([_URL_HOST.findall(doc.url)[0]] if _URL_HOST.findall(doc.url) else [])
    hits += sum(blocked_domain(h, tuple(c.domains)) for h in hosts)
    return hits <= c.max_hits


RULES: dict[str, Callable[[Doc, Any], bool]] = {
    "length": _length,
    "mean_word_length": _mean_word_length,
    "symbol_ratio": _symbol_ratio,
    "line_punctuation": _line_punctuation,
    "repeated_lines": _repeated_lines,
    "repeated_paragraphs": _repeated_paragraphs,
    "top_ngrams": _top_ngrams,
    "repeated_ngrams": _repeated_ngrams,
    "alpha_fraction": _alpha_fraction,
    "blocklist": _blocklist,
}


def check(text: str, q: ml_collections.ConfigDict, url: str = "", rules: tuple[str, ...] | None = None) -> str | None:
    """The first of `rules` (default: the enabled ones, `q.rules`) that removes `text`, or None."""
    doc = Doc(text, url)
    for name in q.rules if rules is None else rules:
        if not RULES[name](doc, q[name]):
            return name
    return None
