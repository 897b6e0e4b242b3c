"""Near-duplicate detection (maxlm/data/dedup.py) against oracles written here: Python sets of shingle
strings for the Jaccard, a BFS for connected components, quadrature for the LSH areas, and a planted corpus
whose ground truth is computed in this file."""

import itertools
import random

import numpy as np
import pytest

from maxlm.data import dedup
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
    from scipy.integrate import quad

    def cost(b, r, t, wfp, wfn):
        fp = quad(lambda s: 1 - (1 - s ** r) ** b, 0, t)[0]
        fn = quad(lambda s: (1 - s ** r) ** b, t, 1)[0]
        return wfp * fp + wfn * fn

    for t, p, wfp in [(0.8, 32, 0.1), (0.5, 24, 0.5)]:
        got = dedup.lsh_params(t, p, fp_weight=wfp, fn_weight=1 - wfp)
        assert got.bands * got.rows <= p
        best = min((cost(b, r, t, wfp, 1 - wfp), b, r) for b in range(1, p + 1) for r in range(1, p // b + 1))
        assert cost(got.bands, got.rows, t, wfp, 1 - wfp) <= best[0] + 1e-4
    with pytest.raises(ValueError, match="threshold"):
        dedup.lsh_params(1.0, 128)


def test_connected_components_match_bfs():
    rng = np.random.default_rng(0)
    for n, m in [(1, 0), (10, 0), (50, 30), (200, 150), (300, 600)]:
        pairs = rng.integers(0, n, (m, 2))
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
    keys = np.array([5, 3, 5, 9, 5, 3, 7], np.uint64)
    pairs = dedup.bucket_pairs(keys)
    labels = dedup.connected_components(len(keys), pairs)
    assert labels.tolist() == [0, 1, 0, 3, 0, 1, 6]
    assert (pairs[:, 0] < pairs[:, 1]).all()


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


def test_planted_near_duplicates_are_found_at_threshold_0_8():
    docs, family = _planted_corpus()
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
    result = dedup.near_duplicates(dedup.MinHasher(num_perm=128).signatures(docs), threshold=0.8)
    cluster = result.cluster
    recall = np.mean([cluster[i] == cluster[j] for i, j in must])
    merged = [(i, j) for i, j in itertools.combinations(range(len(docs)), 2) if cluster[i] == cluster[j]]
    wrong = [p for p in merged if p in must_not or family[p[0]] != family[p[1]]]
    precision = 1 - len(wrong) / max(len(merged), 1)
    assert recall >= 0.95, (recall, result)
    assert precision >= 0.99, (precision, wrong[:5])
    assert result.keep.sum() == len(set(cluster.tolist()))
    assert all(result.keep[c] for c in cluster)  # the kept document is its cluster's first


def test_memory_mapped_signatures_give_the_same_clusters(tmp_path):
    docs, _ = _planted_corpus(seed=3)
    sig = dedup.MinHasher(num_perm=64).signatures(docs)
    np.save(tmp_path / "sig.npy", sig)
    mapped = np.load(tmp_path / "sig.npy", mmap_mode="r")
    assert np.array_equal(dedup.band_keys(mapped, 8, 8, chunk=7), dedup.band_keys(sig, 8, 8))
    a, b = dedup.near_duplicates(sig, 0.8), dedup.near_duplicates(mapped, 0.8)
    assert np.array_equal(a.cluster, b.cluster) and a.verified_pairs == b.verified_pairs > 0
