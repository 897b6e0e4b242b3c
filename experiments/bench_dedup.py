"""Near-duplicate detection benchmark: maxlm's MinHash-LSH (maxlm/curation/dedup.py) beside `datasketch`
(MinHash + MinHashLSH, the library people reach for) and `rensa` (a Rust MinHash library: RMinHash +
RMinHashLSH), same corpus, same machine, same shingles.

    python experiments/bench_dedup.py                       # 5000 documents at 1x, 2x, 4x
    python experiments/bench_dedup.py --docs=2000 --scales=1,2
    python experiments/bench_dedup.py --docs=20000 --scales=1 --skip_datasketch   # maxlm vs rensa at 20,000
    python experiments/bench_dedup.py --docs=20000 --scales=1 --skip_datasketch --runners   # + both curate runners

The corpus is synthetic with planted near-duplicates: base documents of random words (~2000 characters),
a fifth of them with an edited copy (word substitutions at rates chosen to spread the copies' Jaccard
similarity from ~0.3 to ~0.97). The true Jaccard of every planted pair is computed exactly on the configured
shingles (character 5-grams of the lower-cased, whitespace-collapsed text, with Python sets); pairs at
>= 0.9 must be merged, pairs at <= 0.5 and unrelated documents must not. Both systems use the same
threshold, number of permutations and LSH band/row weights (recall-leaning, 0.1 / 0.9), and both verify
candidate pairs by their estimated Jaccard before merging; clusters are connected components. Timing
covers everything from the raw texts to the clusters (shingling, hashing, LSH, verification, components).
Prints one table row per scale and, last, one JSON line.

With --runners, the largest corpus also goes through `python -m maxlm.curate --config.stages=near` end to end
(two jsonl shards in, part files out) on the local runner (2 processes) and on the Apache Beam runner
(DirectRunner, 2 worker processes): documents per second of each, whether their outputs are the same bytes,
and the planted pairs at Jaccard >= 0.9 of which one copy was removed.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import tempfile
import time

import numpy as np

from maxlm import config as config_lib
from maxlm.curation import dedup, pipeline

SUBSTITUTION_RATES = (0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.35)


def make_corpus(n_docs: int, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """(documents, planted pairs (i, j)), shuffled; deterministic in seed."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("etaoinshrdlucmfwypvbgkjqxz"[:rng.randint(10, 26)]) for _ in range(rng.randint(2, 10)))
             for _ in range(50_000)]
    docs, pairs = [], []
    n_base = int(n_docs / 1.2)
    for _ in range(n_base):
        words = [rng.choice(vocab) for _ in range(rng.randint(250, 400))]
        docs.append(words)
    for b in rng.sample(range(n_base), n_docs - n_base):
        words = list(docs[b])
        for _ in range(max(1, int(len(words) * rng.choice(SUBSTITUTION_RATES)))):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        pairs.append((b, len(docs)))
        docs.append(words)
    order = list(range(len(docs)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    return [" ".join(docs[i]) for i in order], [(where[a], where[b]) for a, b in pairs]


def shingle_set(text: str, n: int = 5) -> set[str]:
    t = dedup.normalize_for_shingles(text)
    return {t[i:i + n] for i in range(max(len(t) - n + 1, 1))}


def jaccard(a: str, b: str) -> float:
    """The exact Jaccard similarity of two documents' shingle sets: the truth the systems are scored against."""
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb)


def score(cluster: np.ndarray, docs: list[str], pairs: list[tuple[int, int]]) -> dict:
    """Recall on planted pairs at true Jaccard >= 0.9; precision over every merged pair (a merged pair is
    wrong unless it is planted with true Jaccard > 0.5)."""
    truth = {(min(a, b), max(a, b)): jaccard(docs[a], docs[b]) for a, b in pairs}
    must = [p for p, j in truth.items() if j >= 0.9]
    recall = float(np.mean([cluster[a] == cluster[b] for a, b in must])) if must else float("nan")
    members: dict[int, list[int]] = {}
    for i, c in enumerate(cluster.tolist()):
        members.setdefault(c, []).append(i)
    merged = wrong = 0
    for group in members.values():
        for x in range(len(group)):
            for y in range(x + 1, len(group)):
                merged += 1
                wrong += truth.get((group[x], group[y]), 0.0) <= 0.5
    return {"recall": recall, "precision": 1.0 - wrong / merged if merged else 1.0, "must_merge": len(must),
            "must_not": sum(j <= 0.5 for j in truth.values()), "merged_pairs": merged}


def run_maxlm(docs: list[str], threshold: float, num_perm: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    hasher = dedup.MinHasher(num_perm=num_perm, ngram=5, unit="char")
    sig = np.concatenate([hasher.signatures(docs[i:i + 512]) for i in range(0, len(docs), 512)])
    result = dedup.near_duplicates(sig, threshold, dedup.lsh_params(threshold, num_perm, 0.1, 0.9))
    return result.cluster, time.perf_counter() - start


def verified_components(hashes: list, query, threshold: float) -> np.ndarray:
    """A peer's clusters: each signature's LSH candidates (`query`) verified by the library's own estimated
    Jaccard (`a.jaccard(b)`), then connected components (union-find, smallest index as the root)."""
    parent = list(range(len(hashes)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(hashes):
        for j in query(m):
            if j != i and m.jaccard(hashes[j]) >= threshold:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(len(hashes))])


def run_datasketch(docs: list[str], threshold: float, num_perm: int) -> tuple[np.ndarray, float]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    hashes = []
    for i, text in enumerate(docs):
        m = MinHash(num_perm=num_perm)
        m.update_batch([s.encode("utf-8") for s in shingle_set(text)])
        lsh.insert(i, m)
        hashes.append(m)
    cluster = verified_components(hashes, lsh.query, threshold)
    return cluster, time.perf_counter() - start


def run_rensa(docs: list[str], threshold: float, num_perm: int) -> tuple[np.ndarray, float]:
    """`rensa` (a Rust MinHash library): RMinHash signatures of the same shingles, its RMinHashLSH index with
    maxlm's band count, candidates verified by estimated Jaccard, connected components -- as for datasketch."""
    from rensa import RMinHash, RMinHashLSH

    start = time.perf_counter()
    bands = dedup.lsh_params(threshold, num_perm, 0.1, 0.9).bands
    while num_perm % bands:  # rensa's bands split the permutations evenly
        bands += 1
    lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=bands)
    hashes = []
    for i, text in enumerate(docs):
        m = RMinHash(num_perm=num_perm, seed=0)
        m.update(list(shingle_set(text)))
        lsh.insert(i, m)
        hashes.append(m)
    cluster = verified_components(hashes, lsh.query, threshold)
    return cluster, time.perf_counter() - start


def run_curate_runners(docs: list[str], pairs: list[tuple[int, int]], threshold: float, num_perm: int,
                       workers: int = 2) -> dict:
    """The near stage of `maxlm.curate` over `docs` (two shards) on each runner: docs/s, same output, recall."""
    result = {}
    high = [(a, b) for a, b in pairs if jaccard(docs[a], docs[b]) >= 0.9]
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(2):
            with open(os.path.join(tmp, f"in-{k}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"id": i, "text": docs[i]}) + "\n" for i in range(k, len(docs), 2))
        for runner in ("local", "beam"):
            c = config_lib.curate_config()
            c.stages, c.runner, c.workers = "near", runner, workers
            c.dedup.threshold, c.dedup.num_perm = threshold, num_perm
            start = time.perf_counter()
            pipeline.curate(c, os.path.join(tmp, "in-*.jsonl"), os.path.join(tmp, runner))
            seconds = time.perf_counter() - start
            kept = set()
            for k in range(2):
                with open(os.path.join(tmp, runner, f"part-{k:05d}.jsonl"), encoding="utf-8") as f:
                    kept.update(json.loads(line)["id"] for line in f)
            result[runner] = {"seconds": seconds, "docs_per_sec": len(docs) / seconds, "kept": len(kept),
                              "recall": sum((a in kept) != (b in kept) for a, b in high) / max(len(high), 1)}
        names = sorted(os.listdir(os.path.join(tmp, "local")))
        result["same_output"] = all(filecmp.cmp(os.path.join(tmp, "local", name), os.path.join(tmp, "beam", name),
                                                shallow=False) for name in names)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=5000, help="documents at scale 1")
    parser.add_argument("--scales", default="1,2,4")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num_perm", type=int, default=128)
    parser.add_argument("--skip_datasketch", action="store_true")
    parser.add_argument("--skip_rensa", action="store_true")
    parser.add_argument("--runners", action="store_true", help="also `maxlm.curate --config.stages=near` on the "
                        "local and the Beam runner (2 workers each) over the largest corpus")
    args = parser.parse_args()
    print(f"near-dup benchmark: threshold {args.threshold}, {args.num_perm} permutations, character 5-grams; "
          f"{dedup.lsh_params(args.threshold, args.num_perm).describe(args.threshold)}", flush=True)
    peers = {"datasketch": run_datasketch, "rensa": run_rensa}
    peers = {k: v for k, v in peers.items() if not getattr(args, f"skip_{k}")}
    print(f"{'scale':>5} {'docs':>7} | {'maxlm docs/s':>12} {'recall':>6} {'prec':>6} {'sec':>6}"
          + "".join(f" | {name + ' docs/s':>17} {'recall':>6} {'prec':>6} {'sec':>7} {'maxlm x':>7}" for name in peers),
          flush=True)
    rows = []
    for scale in (int(s) for s in args.scales.split(",")):
        docs, pairs = make_corpus(args.docs * scale, seed=scale)
        cluster, seconds = run_maxlm(docs, args.threshold, args.num_perm)
        row = {"scale": scale, "docs": len(docs), "maxlm": dict(score(cluster, docs, pairs), seconds=seconds,
                                                                docs_per_sec=len(docs) / seconds)}
        line = (f"{scale:>5} {len(docs):>7} | {row['maxlm']['docs_per_sec']:>12.0f} {row['maxlm']['recall']:>6.3f} "
                f"{row['maxlm']['precision']:>6.3f} {row['maxlm']['seconds']:>6.2f}")
        for name, run in peers.items():
            cluster, seconds = run(docs, args.threshold, args.num_perm)
            peer = row[name] = dict(score(cluster, docs, pairs), seconds=seconds, docs_per_sec=len(docs) / seconds)
            row[f"speedup_vs_{name}"] = row["maxlm"]["docs_per_sec"] / peer["docs_per_sec"]
            line += (f" | {peer['docs_per_sec']:>17.0f} {peer['recall']:>6.3f} {peer['precision']:>6.3f} "
                     f"{peer['seconds']:>7.2f} {row[f'speedup_vs_{name}']:>6.2f}x")
        if "datasketch" in peers:
            row["speedup"] = row["speedup_vs_datasketch"]  # the name earlier runs' JSON used
        print(line, flush=True)
        rows.append(row)
    growth = rows[-1]["maxlm"]["seconds"] / rows[0]["maxlm"]["seconds"] if len(rows) > 1 else float("nan")
    size = rows[-1]["docs"] / rows[0]["docs"] if len(rows) > 1 else float("nan")
    print(f"maxlm time grows {growth:.2f}x for {size:.0f}x the documents", flush=True)
    summary = {"rows": rows, "time_growth": growth, "size_growth": size}
    if args.runners:
        runners = summary["curate_runners"] = run_curate_runners(docs, pairs, args.threshold, args.num_perm)
        print(f"maxlm.curate --config.stages=near, {len(docs)} documents in 2 shards, 2 workers: "
              + "; ".join(f"{r} runner {runners[r]['docs_per_sec']:.0f} docs/s ({runners[r]['seconds']:.1f} s, "
                          f"recall {runners[r]['recall']:.3f})" for r in ("local", "beam"))
              + f"; same output: {runners['same_output']}", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
