"""Vectorised 64-bit hashing for data pipelines: a splitmix64 mixer and polynomial hashes of text spans.

Hashing every shingle of a corpus with a Python call per shingle (hashlib, as `datasketch` users do) costs
about a microsecond each; here a whole batch of documents is one array of code points and every span hash
is a handful of numpy operations over it. Arithmetic is modulo 2**64 (numpy's unsigned overflow wraps), where
an odd base P is invertible, so the hash of span [s, e) is (S[e] - S[s]) * P**-s for the prefix sums
S[i] = sum_{j<i} c[j] * P**j -- the Rabin-Karp rolling hash without the rolling loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_BASE = 0x100000001B3  # odd (the FNV-1a 64-bit prime), so invertible mod 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al. 2014): a bijection on uint64 that scrambles every bit."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64."""
    out = np.full(n, base, np.uint64)
    if n:
        out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


class CodePoints:
    """Several texts as one array of Unicode code points, with prefix sums for O(1) span hashes."""

    def __init__(self, texts: Sequence[str]):
        self.lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64) if len(texts) else (
            np.zeros(0, np.int64))
        self.cp = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32)
        with np.errstate(over="ignore"):
            weighted = (self.cp.astype(np.uint64) + np.uint64(1)) * _powers(_BASE, len(self.cp))
            self._prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(weighted, dtype=np.uint64)])
        self._inv = _powers(_BASE_INV, len(self.cp) + 1)

    def span_hashes(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """uint64 hashes of the spans [start, end) of the joined text: equal spans hash equal wherever they
        sit, and the length is mixed in, so spans of different lengths do not collide structurally."""
        with np.errstate(over="ignore"):
            h = (self._prefix[end] - self._prefix[start]) * self._inv[start]
            return splitmix64(h ^ (end - start).astype(np.uint64))
