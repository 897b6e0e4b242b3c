"""Benchmark contamination: which evaluation items share an n-gram with a training corpus.

GPT-3 (Brown et al. 2020, appendix C) flags a benchmark item as contaminated when any of its 13-grams
occurs in the training data; InternLM2 and Baichuan report the same kind of overlap check. Text is compared
as *units* -- lower-cased runs of letters and digits, and single CJK characters -- so punctuation, case and
spacing do not hide a copy, and Chinese needs no segmenter. Items shorter than n units cannot be checked
and are reported as such.

Scaling: the benchmarks' n-grams (a few million at most) are hashed into one sorted array; the corpus is
streamed file by file, document batch by batch, its n-grams hashed vectorised (the span hashes of
maxlm/data/hashing.py) and looked up with `np.isin`. Memory is the benchmark's n-grams plus one batch.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Sequence

import numpy as np

from maxlm.curation import dedup
from maxlm.curation.quality import CJK
from maxlm.data.records import Shard, iter_records

_UNIT = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")  # a CJK character, or a run of other letters and digits
BATCH = 256  # corpus documents per hashing call


def units(text: str) -> str:
    """The comparable form of a text: its units, lower-cased, joined by single spaces."""
    return " ".join(_UNIT.findall(text.lower()))


def ngram_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, counts): every n-gram of units of each text (a text shorter than n has none)."""
    forms = [units(t) for t in texts]
    long_enough = np.array([f.count(" ") + 1 >= n if f else False for f in forms])
    hashes, counts = dedup.shingle_hashes([f if ok else "" for f, ok in zip(forms, long_enough)], n, "word")
    return hashes, counts


def check(benchmarks: dict[str, list[str]], corpus: Iterable[str], n: int = 13) -> dict:
    """{benchmark: {"fraction", "contaminated", "checked", "too_short", "items": [per-item dicts]}}."""
    per_item: dict[str, list[np.ndarray]] = {}  # benchmark -> each item's n-gram hashes
    for name in sorted(benchmarks):
        hashes, counts = ngram_hashes(benchmarks[name], n)
        per_item[name] = np.split(hashes, np.cumsum(counts)[:-1]) if len(counts) else []
    every = [h for parts in per_item.values() for h in parts]
    wanted = np.unique(np.concatenate(every)) if every else np.zeros(0, np.uint64)
    found: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        if batch:
            h, _ = ngram_hashes(batch, n)
            found.append(np.unique(h[np.isin(h, wanted)]))
            batch.clear()

    for text in corpus:
        batch.append(text)
        if len(batch) == BATCH:
            flush()
    flush()
    seen = np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64)
    out = {}
    for name, parts in per_item.items():
        items = []
        for i, h in enumerate(parts):
            hits = int(np.isin(h, seen).sum())
            items.append({"index": i, "ngrams": int(len(h)), "matched": hits, "contaminated": hits > 0,
                          "checked": len(h) > 0})
        checked = [r for r in items if r["checked"]]
        dirty = sum(r["contaminated"] for r in checked)
        out[name] = {"fraction": dirty / len(checked) if checked else 0.0, "contaminated": dirty,
                     "checked": len(checked), "too_short": len(items) - len(checked), "items": items}
    return out


def corpus_texts(pattern: str, text_key: str = "text") -> Iterable[str]:
    """Every valid record's text of the jsonl files (.gz / .zst too) matching `pattern`, streamed."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"--corpus={pattern!r} matches no file")
    for path in paths:
        for record, _ in iter_records(Shard("file", path), text_key, 1 << 30):
            if record is not None:
                yield record[text_key]
