"""Mixtures of curated sources (maxlm/data/mixture.py): realised byte shares against the requested weights,
per-quality-bucket repetition counted directly, determinism, a split without leaks, and pretraining on a
`python -m maxlm.curate` output folder end to end."""

import collections
import glob
import json
import os
import random

import numpy as np
import pytest

from maxlm import config as C
from maxlm.curation import pipeline as curate
from maxlm.data import make_source
from maxlm.data.mixture import MixtureError, MixtureSource
from maxlm.training import pretrain as train
from tests.helpers import WORDS, small_config


def _shard(path, n, prefix, rng, quality=None, size=(20, 80)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            record = {"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*size)))}
            if quality:
                record["quality"] = quality[i % len(quality)]
            f.write(json.dumps(record) + "\n")


def _keys(source):
    return [(int(source._source_of[i]), int(source._doc[i])) for i in range(len(source))]


def test_byte_shares_follow_the_weights(tmp_path):
    rng = random.Random(0)
    _shard(tmp_path / "a" / "part-00000.jsonl", 400, "a", rng, size=(40, 80))  # big documents
    _shard(tmp_path / "b" / "part-00000.jsonl", 300, "b", rng, size=(5, 20))  # small ones
    _shard(tmp_path / "b" / "part-00001.jsonl", 300, "b2", rng, size=(5, 20))
    entries = ((str(tmp_path / "a"), 0.3), (str(tmp_path / "b" / "part-*.jsonl"), 0.7))
    mix = MixtureSource(entries, "train", 0.1)
    sizes = [np.array([len(line.encode()) for line in open(p, encoding="utf-8").read().splitlines()])
             for p in (tmp_path / "a" / "part-00000.jsonl",)]
    got = collections.Counter()
    for s, d in _keys(mix):
        got[s] += mix.sources[s].line_bytes()[d]
    assert got[0] / (got[0] + got[1]) == pytest.approx(0.3, abs=0.02)
    assert np.allclose(mix.byte_shares(), [got[0] / (got[0] + got[1]), got[1] / (got[0] + got[1])])
    assert mix.sources[0].line_bytes().tolist() == sizes[0].tolist()
    assert _keys(MixtureSource(entries, "train", 0.1)) == _keys(mix)  # deterministic
    assert _keys(MixtureSource(((entries[0][0], 3), (entries[1][0], 7)), "train", 0.1)) == _keys(mix)  # w / sum(w)
    eval_mix = MixtureSource(entries, "eval", 0.1)
    held_out = set(_keys(eval_mix))
    assert held_out and not held_out & set(_keys(mix))  # no copy of an eval document is trained on
    # the realised counts against the epoch's documents counted here; train + eval documents = every line
    line_bytes = [[len(line.encode()) for p in sorted(glob.glob(path)) for line in open(p, encoding="utf-8")
                   .read().splitlines()] for path in (str(tmp_path / "a" / "*.jsonl"), entries[1][0])]
    for s, lines in enumerate(line_bytes):
        mine = [d for t, d in _keys(mix) if t == s]
        want = {"documents": len(mine), "bytes": float(sum(lines[d] for d in mine)), "distinct": len(set(mine))}
        assert {k: mix.realised[s][k] for k in want} == want
        assert mix.realised[s]["available"] + eval_mix.realised[s]["available"] == len(lines) == (400, 600)[s]
        share = want["bytes"] / (got[0] + got[1])
        assert (f"weight {(0.3, 0.7)[s]:.3f} -> {share:.3f} of bytes, {len(mine)} documents ({len(set(mine))} "
                f"distinct of {mix.realised[s]['available']})") in mix.describe()


def test_quality_buckets_repeat_documents(tmp_path):
    rng = random.Random(1)
    _shard(tmp_path / "q.jsonl", 300, "q", rng, quality=["high", "medium", "low"], size=(30, 30))
    _shard(tmp_path / "plain.jsonl", 30, "p", rng, size=(30, 30))
    mix = MixtureSource(((str(tmp_path / "q.jsonl"), 1.0),), "train", 0.0,
                        quality_repeat=(("high", 2.0), ("medium", 1.0), ("low", 0.0)))
    copies = collections.Counter(d for _, d in _keys(mix))
    bucket = {i: ["high", "medium", "low"][i % 3] for i in range(300)}
    assert {copies[i] for i in range(300) if bucket[i] == "high"} == {2}
    assert {copies[i] for i in range(300) if bucket[i] == "medium"} == {1}
    assert all(copies[i] == 0 for i in range(300) if bucket[i] == "low")
    sizes = [len(line.encode()) for line in open(tmp_path / "q.jsonl", encoding="utf-8").read().splitlines()]
    assert mix.realised == [{"documents": 300, "bytes": float(sum(2 * sizes[i] for i in range(0, 300, 3)) +
                                                             sum(sizes[i] for i in range(1, 300, 3))),
                             "distinct": 200, "available": 300}]
    # fractional factors: floor plus a fixed coin, so the expected count is exact on average
    mix = MixtureSource(((str(tmp_path / "q.jsonl"), 1.0),), "train", 0.0, quality_repeat=(("high", 1.5),))
    high = [collections.Counter(d for _, d in _keys(mix))[i] for i in range(0, 300, 3)]
    assert set(high) == {1, 2} and 1.3 <= np.mean(high) <= 1.7
    with pytest.raises(MixtureError, match="data.mixture"):
        MixtureSource(((str(tmp_path / "q.jsonl"), 1.0),), "train", 0.0,
                      quality_repeat=(("high", 0.0), ("medium", 0.0), ("low", 0.0)))


def test_mixture_config_is_validated():
    c = C.default_config()
    c.data.source = "mixture"
    with pytest.raises(C.ConfigError, match="data.mixture"):
        C.validate(c)


def test_pretraining_reads_a_curated_folder(tmp_path):
    rng = random.Random(2)
    _shard(tmp_path / "raw" / "a.jsonl", 200, "a", rng)
    with open(tmp_path / "raw" / "a.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "dup", "text": open(tmp_path / "raw" / "a.jsonl").readline()}) + "\n")
    _shard(tmp_path / "raw2" / "b.jsonl", 100, "b", rng)
    cfg = C.curate_config()
    cfg.workers, cfg.stages = 1, "normalize,dedup"
    curate.curate(cfg, str(tmp_path / "raw" / "*.jsonl"), str(tmp_path / "cur_a"))
    curate.curate(cfg, str(tmp_path / "raw2" / "*.jsonl"), str(tmp_path / "cur_b"))
    config = small_config(tmp_path / "unused", **{
        "data.source": "mixture", "data.path": "",
        "data.mixture": ((str(tmp_path / "cur_a"), 0.5), (str(tmp_path / "cur_b"), 0.5)),
        "train.num_steps": 3, "optim.decay_steps": 3, "train.num_samples": 0})
    source = make_source(config, "train")
    assert {source.sources[s].get(d).split()[0] for s, d in _keys(source)[:5]}  # readable documents
    got = np.zeros(2)
    for s, d in _keys(source):
        got[s] += source.sources[s].line_bytes()[d]
    assert got / got.sum() == pytest.approx([0.5, 0.5], abs=0.01)  # equal weights: equal bytes of the epoch
    records = train.train(config, str(tmp_path / "run"))
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
