"""Long-context data: which documents are worth training a 32k stage on (InternLM2, section 3.1.3).

InternLM2 selects its long-context data from the ordinary pretraining corpus in three steps, after Lv et al.
(2024, LongWanjuan): a length selection, statistical filters, and a perplexity filter. Long web pages are
mostly not long *texts* -- concatenated listings, tables of numbers, logs, repeated templates -- while books
and papers are; the filters keep the latter. Here, as the curate stage `long`:

  length          at least `long.min_tokens` tokens (counted with `long.tokenizer`, or -- without one -- as
                  units: words, and CJK characters one by one, a tokenizer-free stand-in)
  repeated_lines  at most `max_repeated_line_fraction` of the non-empty lines repeat an earlier line (logs,
                  listings, templates)
  digits          at most `max_digit_fraction` of the non-space characters are digits (tables, patents'
                  numeric listings)
  diversity       the moving-average type-token ratio over `mattr_window`-unit windows (Covington & McFall
                  2010; unlike the plain ratio it does not fall with length) at least `min_mattr`: a coherent
                  text keeps introducing words, a template or a word list does not
  perplexity      (with the perplexity stage) at most `max_perplexity` under the reference model

A document failing a rule is removed and counted as `long_<rule>`; the kept folder is the long corpus that
`maxlm.data.mixture.long_context` weights into a long stage's mixture (configs/internlm2_7b_32k.py).
"""

from __future__ import annotations

import collections
import re

import ml_collections

from maxlm.curation.quality import Doc

RULES = ("length", "repeated_lines", "digits", "diversity")
_DIGIT = re.compile(r"\d")
_NON_SPACE = re.compile(r"\S")


def token_count(text: str, tok=None) -> int:
    """Tokens of `tok` (anything with `encode(text) -> ids`), or units (words, CJK characters) without one."""
    return len(tok.encode(text)) if tok is not None else len(Doc(text).units)


def mattr(units: list[str], window: int) -> float:
    """The moving-average type-token ratio: the mean, over every window of `window` consecutive units, of
    distinct units / `window` (the plain type-token ratio of the whole text when it is shorter)."""
    if not units:
        return 0.0
    if len(units) <= window:
        return len(set(units)) / len(units)
    counts = collections.Counter(units[:window])
    total = len(counts)
    for i in range(window, len(units)):
        gone, come = units[i - window], units[i]
        counts[gone] -= 1
        if not counts[gone]:
            del counts[gone]
        counts[come] += 1
        total += len(counts)
    return total / ((len(units) - window + 1) * window)


def check(text: str, c: ml_collections.ConfigDict, tok=None) -> str | None:
    """The first long-context rule `text` fails ("long_length", ...), or None when it is kept."""
    if token_count(text, tok) < c.min_tokens:
        return "long_length"
    doc = Doc(text)
    lines = doc.lines
    repeats = len(lines) - len(set(lines))
    if repeats > c.max_repeated_line_fraction * max(len(lines), 1):
        return "long_repeated_lines"
    if len(_DIGIT.findall(text)) > c.max_digit_fraction * max(len(_NON_SPACE.findall(text)), 1):
        return "long_digits"
    if mattr([u.lower() for u in doc.units], c.mattr_window) < c.min_mattr:
        return "long_diversity"
    return None
