"""A weighted mixture of curated jsonl sources, with per-quality-bucket repetition: one random-access Source.

    data.source = "mixture"
    data.mixture = (("curated/en", 0.7), ("curated/zh", 0.3))     # folders or globs, weights
    data.quality_repeat = (("high", 2.0), ("medium", 1.0), ("low", 0.0))

InternLM2 weights its pretraining data by quality -- high-quality text is seen several times, medium once,
low not at all -- and Baichuan-7B picks the language mixture that scores best. Here each document's
repetition factor comes from its `quality` field (written by `python -m maxlm.curate`'s perplexity stage;
documents without one count as factor 1), and each source is then scaled so that its share of the epoch's
*bytes* (a tokenizer-free stand-in for tokens, the unit Megatron and InternEvo weight by) is its weight.
A factor like 2.6 means every document twice plus a third copy for 60% of them (by bytes), chosen by fixed
per-document coins: the epoch's multiset is a deterministic function of the config and the files. The packer then
shuffles it each epoch as it does any source.

The train/eval split is decided per source document *before* repetition, so no copy of an eval document
is trained on. `describe()` reports the realised mixture next to the requested weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from maxlm.data.sources import JsonlSource, Lookup, Source, Subset, make_base_source, split_indices, unit_hash
from maxlm.errors import UserError


class MixtureError(UserError):
    """A mixture that cannot be built (no documents left in a source): names the config key."""


def _expand(factor: np.ndarray, size: np.ndarray, salt: int) -> np.ndarray:
    """Integer copies per document: floor(factor), plus one more copy for documents drawn by priority
    sampling (key = coin / frac, smallest first) until the extra bytes reach sum(frac * size). Exact to
    within one document's bytes, where an independent coin per document would be off by the noise of a
    binomial; documents with a larger fractional part are likelier to be drawn."""
    whole = np.floor(factor)
    frac = factor - whole
    copies = whole.astype(np.int64)
    candidates = np.flatnonzero(frac > 0)
    if len(candidates):
        key = unit_hash(len(factor), salt)[candidates] / frac[candidates]
        order = candidates[np.argsort(key, kind="stable")]
        cum = np.cumsum(size[order])
        copies[order[cum - size[order] / 2 <= (frac * size).sum()]] += 1
    return copies


class MixtureSource(Source):
    def __init__(self, entries: Sequence[tuple[str, float]], split: str, eval_fraction: float, *,
                 quality_repeat: Sequence[tuple[str, float]] = (), text_key: str = "text", seed: int = 0):
        self.names = [str(path) for path, _ in entries]
        weights = np.array([float(w) for _, w in entries], np.float64)
        self.weights = weights / weights.sum()
        self.sources = [JsonlSource(path, text_key) for path in self.names]
        repeat = dict(quality_repeat)
        per_source = []
        for s, source in enumerate(self.sources):
            idx = split_indices(len(source), eval_fraction, split)
            factor = np.ones(len(idx), np.float64)
            if any(v != 1.0 for v in repeat.values()):
                for k, i in enumerate(idx):
                    factor[k] = repeat.get(source.field(int(i), "quality"), 1.0)
            size = source.line_bytes()[idx].astype(np.float64)
            if (factor * size).sum() <= 0:
                raise MixtureError(f"data.mixture: source {self.names[s]!r} has no {split} documents left "
                                   f"(after data.quality_repeat)")
            per_source.append((idx, factor, size))
        total = sum((f * b).sum() for _, f, b in per_source)
        self._source_of, self._doc, self.realised = [], [], []
        for s, (idx, factor, size) in enumerate(per_source):
            scale = self.weights[s] * total / (factor * size).sum()
            copies = _expand(factor * scale, size, salt=(seed + 1) * 1_000_003 + s)
            self._source_of.append(np.full(copies.sum(), s, np.int32))
            self._doc.append(np.repeat(idx, copies))
            self.realised.append({"documents": int(copies.sum()), "bytes": float((copies * size).sum()),
                                  "distinct": int((copies > 0).sum()), "available": int(len(idx))})
        self._source_of = np.concatenate(self._source_of)
        self._doc = np.concatenate(self._doc)
        if not len(self._doc):
            raise MixtureError("data.mixture: the mixture has no documents")

    def __len__(self) -> int:
        return len(self._doc)

    def lookup(self, i: int) -> Lookup:
        self._check_index(i)
        return self.sources[int(self._source_of[i])].lookup(int(self._doc[i]))

    def byte_shares(self) -> np.ndarray:
        b = np.array([r["bytes"] for r in self.realised])
        return b / b.sum()

    def describe(self) -> str:
        shares = self.byte_shares()
        parts = [f"{name}: weight {w:.3f} -> {share:.3f} of bytes, {r['documents']} documents "
                 f"({r['distinct']} distinct of {r['available']})"
                 for name, w, share, r in zip(self.names, self.weights, shares, self.realised)]
        return "data mixture: " + "; ".join(parts)


def long_context(long: str, standard: str, long_share: float = 0.5) -> tuple[tuple[str, float], ...]:
    """`data.mixture` for a long-context stage: `long_share` of the bytes from the long corpus (a `maxlm.curate`
    folder selected with the `long` stage), the rest from the standard corpus -- InternLM2's 32k stage mixes
    its long data in at half. Shares are of bytes, so a long corpus of L bytes beside a standard one of S is
    upsampled: seen (S / L) * long_share / (1 - long_share) times for every pass over the standard corpus."""
    if not 0.0 < long_share < 1.0:
        raise MixtureError(f"long_context: long_share must be in (0, 1), got {long_share}")
    return ((long, float(long_share)), (standard, round(1.0 - float(long_share), 12)))


def make_source(config: ml_collections.ConfigDict, split: str) -> Source:
    """The "train" or "eval" documents of the configured source (held out by `config.data.eval_fraction`)."""
    d = config.data
    if d.source == "mixture":
        return MixtureSource(d.mixture, split, d.eval_fraction, quality_repeat=d.quality_repeat, text_key=d.text_key,
                             seed=d.shuffle_seed)
    base = make_base_source(config)
    return Subset(base, split_indices(len(base), config.data.eval_fraction, split))
