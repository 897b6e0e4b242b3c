"""Near-duplicate detection (maxlm/curation/dedup.py) against oracles written here: Python sets of shingle
strings for the Jaccard, a BFS for connected components, quadrature for the LSH areas, and a planted corpus
whose ground truth is computed in this file."""

import functools
import itertools
import random

import numpy as np
import pytest

from maxlm.curation import dedup
from maxlm.data.hashing import CodePoints


def _shingle_set(text, n=5, unit="char"):
    """The definition, written directly: n-grams of the lower-cased, whitespace-collapsed text."""
    t = " ".join(text.lower().split())
    units = list(t) if unit == "char" else t.split(" ")
    if not t:
        return set()
    if len(units) < n:
        return {"\x00".join(units)}
    return {"\x00".join(units[i:i + n]) for i in range(len(units) - n + 1)}


def _jaccard(a, b, n=5, unit="char"):
    sa, sb = _shingle_set(a, n, unit), _shingle_set(b, n, unit)
    return len(sa & sb) / len(sa | sb)


def test_span_hashes_are_position_independent():
    cps = CodePoints(["abcabc", "xabc", "你好你好"])
    h = cps.span_hashes(np.array([0, 3, 7, 10, 12, 0]), np.array([3, 6, 10, 12, 14, 4]))
    assert h[0] == h[1] == h[2]  # "abc" at three places, two documents
    assert h[3] == h[4]  # "你好" twice
    assert h[5] != h[0]


@pytest.mark.parametrize("unit,n", [("char", 5), ("char", 1), ("word", 3)])
def test_distinct_shingle_hashes_match_the_shingle_sets(unit, n):
    texts = ["The cat sat on the mat; the cat sat.", "", "ab", "一 二 三 四 五 六 七 八 九 十 一 二 三",
             "知识就是力量，力量就是知识。", "  Hello   WORLD hello world  "]
    hashes, counts = dedup.shingle_hashes(texts, n, unit)
    assert counts.sum() == len(hashes)
    for text, part in zip(texts, np.split(hashes, np.cumsum(counts)[:-1])):
        assert len(set(part.tolist())) == len(_shingle_set(text, n, unit)), text


def test_minhash_estimates_the_jaccard():
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    hasher = dedup.MinHasher(num_perm=256, seed=1)
    pairs, errors = [], []
    for _ in range(40):
        a = [rng.choice(vocab) for _ in range(200)]
        b = list(a)
        for _ in range(rng.randint(0, 80)):
            b[rng.randrange(len(b))] = rng.choice(vocab)
        pairs.append((" ".join(a), " ".join(b)))
    sig = hasher.signatures([t for p in pairs for t in p])
    for k, (a, b) in enumerate(pairs):
        errors.append((sig[2 * k] == sig[2 * k + 1]).mean() - _jaccard(a, b))
    assert abs(np.mean(errors)) < 0.01  # unbiased
    assert np.std(errors) < 0.045  # binomial: sqrt(J(1-J)/256) <= 0.031
    assert (hasher.signatures(["", "x"])[0] == 0xFFFFFFFF).all()


def test_minhash_is_unbiased_on_short_documents():
    """Short texts leave most one-permutation bins empty: densification must keep P(agree) = Jaccard."""
    rng = random.Random(2)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    errors = []
    for trial in range(150):
        a = [rng.choice(vocab) for _ in range(12)]
        b = list(a)
        for _ in range(rng.randint(0, 4)):
            b[rng.randrange(len(b))] = rng.choice(vocab)
        sig = dedup.MinHasher(num_perm=128, seed=trial).signatures([" ".join(a), " ".join(b)])
        errors.append((sig[0] == sig[1]).mean() - _jaccard(" ".join(a), " ".join(b)))
    assert abs(np.mean(errors)) < 0.015
    assert np.std(errors) < 0.06


def test_signatures_do_not_depend_on_batching():
    texts = ["alpha beta gamma " * k for k in range(1, 30)] + ["", "z"]
    hasher = dedup.MinHasher(num_perm=64)
    whole = hasher.signatures(texts)
    assert np.array_equal(whole, np.concatenate([hasher.signatures(texts[:7]), hasher.signatures(texts[7:])]))


def test_lsh_params_minimise_the_weighted_areas():
    """The chosen (bands, rows) against an exhaustive search with scipy quadrature; the reported areas too."""
    from scipy.integrate import quad

    def areas(b, r, t):
        return quad(lambda s: 1 - (1 - s ** r) ** b, 0, t)[0], quad(lambda s: (1 - s ** r) ** b, t, 1)[0]

    def cost(b, r, t, wfp, wfn):
        fp, fn = areas(b, r, t)
        return wfp * fp + wfn * fn

    for t, p, wfp in [(0.8, 32, 0.1), (0.5, 24, 0.5)]:
        got = dedup.lsh_params(t, p, fp_weight=wfp, fn_weight=1 - wfp)
        assert got.bands * got.rows <= p
        fp, fn = areas(got.bands, got.rows, t)
        assert (got.false_positive_area, got.false_negative_area) == pytest.approx((fp, fn), abs=2e-3)
        best = min((cost(b, r, t, wfp, 1 - wfp), b, r) for b in range(1, p + 1) for r in range(1, p // b + 1))
        assert cost(got.bands, got.rows, t, wfp, 1 - wfp) <= best[0] + 1e-4
    with pytest.raises(ValueError, match="threshold"):
        dedup.lsh_params(1.0, 128)


def test_connected_components_match_bfs():
    """Labels (smallest node of each component) against a BFS, on random graphs and on a single edge, a path
    listed from its far end, and a self-loop."""
    rng = np.random.default_rng(0)
    graphs = [(n, rng.integers(0, n, (m, 2))) for n, m in [(1, 0), (10, 0), (50, 30), (200, 150), (300, 600)]]
    graphs += [(5, np.array([[3, 4]])), (6, np.array([[4, 5], [3, 4], [2, 3], [1, 2], [0, 1]])),
               (3, np.array([[2, 2]]))]
    for n, pairs in graphs:
        got = dedup.connected_components(n, pairs)
        adj = {i: set() for i in range(n)}
        for a, b in pairs:
            adj[a].add(b)
            adj[b].add(a)
        want = np.full(n, -1)
        for s in range(n):
            if want[s] < 0:
                todo, want[s] = [s], s
                while todo:
                    for v in adj[todo.pop()]:
                        if want[v] < 0:
                            want[v] = s
                            todo.append(v)
        assert np.array_equal(got, want)


def test_bucket_pairs_connect_each_bucket():
    """Components of the returned pairs = groups of equal keys (np.unique), and every pair has equal keys."""
    keys = np.array([5, 3, 5, 9, 5, 3, 7], np.uint64)
    pairs = dedup.bucket_pairs(keys)
    labels = dedup.connected_components(len(keys), pairs)
    assert labels.tolist() == [0, 1, 0, 3, 0, 1, 6]
    assert (pairs[:, 0] < pairs[:, 1]).all()
    keys = np.random.default_rng(1).integers(0, 40, 300).astype(np.uint64)
    pairs = dedup.bucket_pairs(keys)
    assert (pairs[:, 0] < pairs[:, 1]).all() and (keys[pairs[:, 0]] == keys[pairs[:, 1]]).all()
    _, group = np.unique(keys, return_inverse=True)
    first = np.full(group.max() + 1, len(keys))
    np.minimum.at(first, group, np.arange(len(keys)))
    assert np.array_equal(dedup.connected_components(len(keys), pairs), first[group])


def test_candidate_probability_matches_enumeration():
    """1 - (1 - J**r)**b against the event itself: sum over every agree/disagree pattern of b*r signature
    positions (independent, each agreeing with probability J) in which some band agrees in all rows."""
    for bands, rows in [(3, 2), (2, 4), (4, 3), (1, 5), (6, 1)]:
        for jac in [0.0, 0.3, 0.55, 0.8, 1.0]:
            want = 0.0
            for pattern in itertools.product([0, 1], repeat=bands * rows):
                if any(all(pattern[b * rows:(b + 1) * rows]) for b in range(bands)):
                    k = sum(pattern)
                    want += jac ** k * (1 - jac) ** (bands * rows - k)
            assert dedup.candidate_probability(jac, bands, rows) == pytest.approx(want, abs=1e-12), (bands, rows)


def test_band_keys_are_equal_exactly_when_band_values_are():
    """Key b of two signatures is equal <=> their columns b*rows .. (b+1)*rows-1 are equal (compared here
    with numpy on a 3-letter alphabet, so equal, permuted and repeated values are common); columns past
    bands*rows are ignored; one changed value changes exactly its own band's key; chunking changes nothing."""
    bands, rows = 5, 3
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 3, (200, bands * rows + 4)).astype(np.uint32)
    keys = dedup.band_keys(sig, bands, rows)
    assert keys.shape == (len(sig), bands) and keys.dtype == np.uint64
    for b in range(bands):
        band = sig[:, b * rows:(b + 1) * rows]
        same_band = (band[:, None, :] == band[None, :, :]).all(-1)
        assert np.array_equal(keys[:, b, None] == keys[None, :, b], same_band), b
        assert len(sig) < same_band.sum() < len(sig) ** 2 / 4  # equal and different bands both occur
    tail = sig.copy()
    tail[:, bands * rows:] = rng.integers(3, 9, (len(sig), 4))
    assert np.array_equal(dedup.band_keys(tail, bands, rows), keys)
    assert np.array_equal(dedup.band_keys(sig, bands, rows, chunk=7), keys)
    for col in range(bands * rows):
        changed = sig[:1].copy()
        changed[0, col] += 5
        diff = dedup.band_keys(changed, bands, rows)[0] != keys[0]
        assert diff.tolist() == [b == col // rows for b in range(bands)], col


def test_estimated_jaccard_is_the_fraction_of_equal_entries():
    """Against a Python count of equal positions / num_perm, on random pairs (self-pairs included), chunked."""
    rng = np.random.default_rng(3)
    sig = rng.integers(0, 4, (30, 24)).astype(np.uint32)
    pairs = rng.integers(0, 30, (50, 2))
    pairs[:3, 1] = pairs[:3, 0]
    want = [sum(int(a == b) for a, b in zip(sig[i], sig[j])) / 24 for i, j in pairs]
    for chunk in (7, 1 << 16):
        assert dedup.estimated_jaccard(sig, pairs, chunk=chunk) == pytest.approx(want, abs=1e-12)
    assert len(dedup.estimated_jaccard(sig, np.zeros((0, 2), np.int64))) == 0


def test_band_collision_alone_does_not_merge():
    """Hand-built signatures (4 bands x 4 rows, threshold 0.75): pairs forced to share one band are merged
    only when the fraction of equal values reaches the threshold -- 12/16 (exactly 0.75) yes, 11/16 and 4/16
    (one shared band, the rest different) no; an exact copy joins its original's cluster."""
    sig = np.arange(7 * 16, dtype=np.uint32).reshape(7, 16) + 1000
    sig[1, 0:4] = sig[0, 0:4]  # shares band 0 only: 4/16
    sig[3] = sig[2]
    sig[3, [0, 8, 12, 13]] = 7  # shares band 1, agrees 12/16
    sig[5] = sig[4]
    sig[5, [0, 1, 8, 12, 13]] = 7  # shares band 1, agrees 11/16
    sig[6] = sig[2]  # exact copy of 2
    result = dedup.near_duplicates(sig, 0.75, params=dedup.LshParams(4, 4, 0.0, 0.0))
    assert result.cluster.tolist() == [0, 1, 2, 2, 4, 5, 2]
    assert result.keep.tolist() == [True, True, True, False, True, True, False]
    # candidates: (0,1), (4,5), and every pair of {2,3,6}; verified: the last three
    assert (result.candidate_pairs, result.verified_pairs) == (5, 3)


def _planted_corpus(seed=0):
    """Families of documents: a random base text and edited copies at a spread of true Jaccard values,
    English (word edits) and Chinese (character edits, no spaces), plus unrelated singletons."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    hanzi = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    docs, family = [], []
    for f in range(120):
        chinese = f % 3 == 0
        units = [rng.choice(hanzi if chinese else vocab) for _ in range(rng.randint(150, 400))]
        join = "".join if chinese else " ".join
        docs.append(join(units))
        family.append(f)
        for _ in range(rng.randint(1, 4)):
            edited = list(units)
            for _ in range(int(len(units) * rng.choice([0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4]))):
                op = rng.random()
                k = rng.randrange(len(edited))
                if op < 0.4:
                    edited[k] = rng.choice(hanzi if chinese else vocab)
                elif op < 0.7:
                    del edited[k]
                else:
                    edited.insert(k, rng.choice(hanzi if chinese else vocab))
            docs.append(join(edited))
            family.append(f)
    for _ in range(200):
        docs.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 300))))
        family.append(-1 - len(docs))
    order = list(range(len(docs)))
    rng.shuffle(order)
    return [docs[i] for i in order], [family[i] for i in order]


@functools.lru_cache(maxsize=None)
def _planted_signatures():
    docs, family = _planted_corpus()
    return docs, family, dedup.MinHasher(num_perm=128).signatures(docs)


def test_planted_near_duplicates_are_found_at_threshold_0_8():
    docs, family, sig = _planted_signatures()
    sets = [_shingle_set(d) for d in docs]
    must, must_not = [], set()
    for i, j in itertools.combinations(range(len(docs)), 2):
        if family[i] == family[j]:
            jac = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            if jac >= 0.9:
                must.append((i, j))
            elif jac <= 0.5:
                must_not.add((i, j))
    assert len(must) > 100 and len(must_not) > 30  # the corpus exercises both sides
    result = dedup.near_duplicates(sig, threshold=0.8)
    cluster = result.cluster
    recall = np.mean([cluster[i] == cluster[j] for i, j in must])
    merged = [(i, j) for i, j in itertools.combinations(range(len(docs)), 2) if cluster[i] == cluster[j]]
    wrong = [p for p in merged if p in must_not or family[p[0]] != family[p[1]]]
    precision = 1 - len(wrong) / max(len(merged), 1)
    assert recall >= 0.95, (recall, result)
    assert precision >= 0.99, (precision, wrong[:5])
    assert result.keep.sum() == len(set(cluster.tolist()))
    assert all(result.keep[c] for c in cluster)  # the kept document is its cluster's first


def test_planted_clusters_match_a_brute_force_oracle():
    """On the planted corpus's signatures, numpy over all pairs: edges = pairs sharing a band (all rows of some
    band equal) whose fraction of equal values is >= 0.8; clusters = scipy's connected components of those
    edges, labelled by their smallest member. Verification must reject some candidates."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, _, sig = _planted_signatures()
    n, threshold = len(sig), 0.8
    result = dedup.near_duplicates(sig, threshold)
    bands, rows = result.params.bands, result.params.rows
    agree, shared_band = np.zeros((n, n)), np.zeros((n, n), bool)
    for i in range(n):
        eq = sig[i] == sig
        agree[i] = eq.sum(1) / sig.shape[1]
        shared_band[i] = eq[:, :bands * rows].reshape(n, bands, rows).all(2).any(1)
    upper = np.triu(np.ones((n, n), bool), 1)
    candidate = shared_band & upper
    edge = candidate & (agree >= threshold)
    assert edge.sum() < candidate.sum()  # the corpus has candidates below the threshold
    k, label = connected_components(coo_matrix(edge), directed=False)
    first = np.full(k, n)
    np.minimum.at(first, label, np.arange(n))
    assert np.array_equal(result.cluster, first[label])
    assert result.keep.sum() == k < n
    assert result.verified_pairs < result.candidate_pairs <= candidate.sum()
    assert n - k <= result.verified_pairs <= edge.sum()


def test_memory_mapped_signatures_give_the_same_clusters(tmp_path):
    docs, _ = _planted_corpus(seed=3)
    sig = dedup.MinHasher(num_perm=64).signatures(docs)
    np.save(tmp_path / "sig.npy", sig)
    mapped = np.load(tmp_path / "sig.npy", mmap_mode="r")
    assert np.array_equal(dedup.band_keys(mapped, 8, 8, chunk=7), dedup.band_keys(sig, 8, 8))
    a, b = dedup.near_duplicates(sig, 0.8), dedup.near_duplicates(mapped, 0.8)
    assert np.array_equal(a.cluster, b.cluster) and a.verified_pairs == b.verified_pairs > 0
