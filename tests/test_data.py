"""Data sources and packing, checked against an independent re-implementation of the packed stream."""

import collections
import gzip
import json
import os

import numpy as np
import pytest

from maxlm import data, tokenizer
from maxlm.config import default_config, override
from tests.helpers import build_tiny_tfds

WORDS = "alpha beta gamma delta def return import class 0123456789 ( ) : = + \n    ".split(" ")


def _docs(n, seed=0):
    """Documents of very different lengths: some fit many to a row, some span several rows."""
    rng = np.random.default_rng(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 120)))) for i in range(n)]


class ListSource(data.Source):
    """In-memory documents (None = unreadable) that records which indices were read."""

    def __init__(self, docs):
        self.docs, self.reads = docs, []

    def __len__(self):
        return len(self.docs)

    def lookup(self, i):
        self._check_index(i)
        self.reads.append(i)
        return (self.docs[i], None) if self.docs[i] is not None else (None, "empty")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    config = override(default_config(), **{"model.vocab_size": 300})
    return tokenizer.train(_docs(200, seed=1), str(tmp_path_factory.mktemp("tok") / "sp"), config)


def _config(**overrides):
    return override(default_config(), **overrides)


# ----------------------------------------------------------------------------------------------- jsonl

BAD_LINES = {
    b'{"text": "fine one"}': None,
    b'{"text": "caf\xc3\xa9 \\u4f60\\u597d"}': None,
    b'{"text": "broken': "bad_json",
    b'{"text": "\xff\xfe not utf8"}': "bad_utf8",
    b'{"text": "lone \\ud800 surrogate"}': "bad_utf8",
    b'{"other": "no text key"}': "missing_text",
    b'["not", "an", "object"]': "missing_text",
    b'{"text": 42}': "not_string",
    b'{"text": null}': "not_string",
    b'{"text": ""}': "empty",
    b'{"text": "   \\n "}': "empty",
    b"": "empty",
}


def _write_jsonl(path, lines, final_newline=True, compress=False):
    payload = b"\n".join(lines) + (b"\n" if final_newline else b"")
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [False, True])
def test_jsonl_counts_malformed_lines(tmp_path, compress):
    suffix = ".jsonl.gz" if compress else ".jsonl"
    _write_jsonl(tmp_path / f"a{suffix}", list(BAD_LINES), compress=compress)
    _write_jsonl(tmp_path / f"b{suffix}", [b'{"body": "custom key"}', b'{"text": "wrong key"}'],
                 final_newline=False, compress=compress)
    source = data.JsonlSource(str(tmp_path / f"*{suffix}"), text_key="text")
    assert len(source) == len(BAD_LINES) + 2
    results = [source.lookup(i) for i in range(len(source))]
    assert [reason for _, reason in results[:len(BAD_LINES)]] == list(BAD_LINES.values())
    assert results[1][0] == "café 你好"
    assert results[-1] == ("wrong key", None) and results[-2] == (None, "missing_text")
    assert data.JsonlSource(str(tmp_path / f"b{suffix}"), text_key="body").get(0) == "custom key"
    with pytest.raises(IndexError):
        source.get(len(source))


def test_iterator_counts_skips_by_reason(tmp_path, tok):
    _write_jsonl(tmp_path / "a.jsonl", list(BAD_LINES))
    source = data.JsonlSource(str(tmp_path / "a.jsonl"))
    it = data.PackedIterator(source, tok, seq_len=8, batch_size=1, seed=0)
    while it.epoch == 0:
        next(it)
    expected = collections.Counter(r for r in BAD_LINES.values() if r)
    stats = it.stats
    assert {k: v for k, v in stats.items() if k.startswith("skipped_") and v} == \
        {f"skipped_{k}": v for k, v in expected.items()}
    assert stats["docs"] == 2 and stats["tokens"] > 0


def test_all_unreadable_raises(tok):
    it = data.PackedIterator(ListSource([None, None]), tok, seq_len=8, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="no readable document"):
        next(it)


# ------------------------------------------------------------------------------------------------ tfds

def test_tfds_source_from_local_array_record(tmp_path):
    texts = [f"tfds document {i}: 你好 😀" for i in range(12)]
    data_dir = str(tmp_path / "tfds")
    build_tiny_tfds(data_dir, texts)
    # Load by name from the prepared directory, as a dataset built elsewhere would be (class not registered).
    config = _config(**{"data.source": "tfds", "data.tfds_name": "maxlm_tiny_text", "data.tfds_data_dir": data_dir,
                        "data.eval_fraction": 0.25})
    train, evals = data.make_source(config, "train"), data.make_source(config, "eval")
    got = [train.get(i) for i in range(len(train))] + [evals.get(i) for i in range(len(evals))]
    assert sorted(got) == sorted(texts) and len(evals) > 0
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401  the whole path works without TensorFlow
    assert data.TfdsSource("maxlm_tiny_text", "train", data_dir, text_key="id").lookup(0) == (None, "not_string")


# ---------------------------------------------------------------------------------------------- stdlib

def test_stdlib_source():
    a, b = data.StdlibSource(), data.StdlibSource()
    assert len(a) > 100 and a.paths == b.paths == sorted(a.paths)
    parts = {p for path in a.paths for p in path.split(os.sep)[:-1]}
    assert not parts & {"test", "tests", "site-packages", "idlelib", "lib2to3"}
    assert "os.py" in a.paths
    text = a.get(a.paths.index("os.py"))
    assert "def makedirs" in text


def test_split_is_disjoint_and_deterministic():
    n = 1000
    train, evals = data.split_indices(n, 0.1, "train"), data.split_indices(n, 0.1, "eval")
    assert not set(train) & set(evals) and len(train) + len(evals) == n
    assert 50 < len(evals) < 150
    assert np.array_equal(evals, data.split_indices(n, 0.1, "eval"))
    assert len(data.split_indices(5, 0.01, "eval")) == 1  # a tiny corpus still holds one document out
    with pytest.raises(ValueError, match="holds out no document"):
        data.split_indices(n, 0.0, "eval")
    config = _config(**{"data.eval_fraction": 0.05})
    tr, ev = data.make_source(config, "train"), data.make_source(config, "eval")
    assert not {tr.get(i) for i in range(len(tr))} & {ev.get(i) for i in range(len(ev))}


# --------------------------------------------------------------------------------------------- packing

def _reference_rows(source, tok, seed, seq_len, num_rows, host_id=0, num_hosts=1):
    """Concatenate [bos] + doc + [eos] over shuffled epochs, then slice windows of T + 1 with stride T."""
    stream, doc_ids, doc_pos = [], [], []
    epoch = 0
    while len(stream) < num_rows * seq_len + 1:
        order = np.random.default_rng((seed, epoch)).permutation(len(source))[host_id::num_hosts]
        for i in order:
            text = source.docs[i]
            if text is None:
                continue
            ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
            stream += ids
            doc_ids += [(epoch, int(i))] * len(ids)
            doc_pos += list(range(len(ids)))
        epoch += 1
    rows = []
    for r in range(num_rows):
        window = slice(r * seq_len, r * seq_len + seq_len + 1)
        toks, ids, pos = stream[window], doc_ids[window], doc_pos[window]
        segs, piece_start = [1], [pos[0]]
        for t in range(1, len(ids)):
            segs.append(segs[-1] + (ids[t] != ids[t - 1]))
            piece_start.append(pos[t] if ids[t] != ids[t - 1] else piece_start[-1])
        rows.append({
            "inputs": toks[:-1], "targets": toks[1:], "segment_ids": segs[:-1],
            "positions": [p - s for p, s in zip(pos[:-1], piece_start[:-1])],
            "loss_weights": [float(ids[t] == ids[t + 1]) for t in range(seq_len)],
        })
    return {k: np.array([row[k] for row in rows]) for k in rows[0]}


def _reference_batches(source, tok, seed, seq_len, batch_size, num_batches, rows=None):
    """Row r of every batch is the r-th single-stream reference over the documents perm[r::B]."""
    rows = range(batch_size) if rows is None else rows
    per_row = [_reference_rows(source, tok, seed, seq_len, num_batches, host_id=r, num_hosts=batch_size)
               for r in rows]
    # interleave: batch k holds row k of every stream
    return {k: np.stack([p[k] for p in per_row], axis=1).reshape(-1, *per_row[0][k].shape[1:])
            for k in per_row[0]}


def _take(it, n):
    batches = [next(it) for _ in range(n)]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("seq_len", [16, 61])
def test_packing_matches_reference(tok, seq_len):
    docs = _docs(30)
    docs[3] = docs[17] = None
    source = ListSource(docs)
    it = data.PackedIterator(source, tok, seq_len=seq_len, batch_size=4, seed=7)
    total = sum(len(tok.encode(d)) + 2 for d in docs if d is not None)
    num_batches = 2 * total // (4 * seq_len) + 1  # more than two epochs
    got = _take(it, num_batches)
    want = _reference_batches(source, tok, seed=7, seq_len=seq_len, batch_size=4, num_batches=num_batches)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert {k: v.dtype for k, v in got.items()} == {
        "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
        "loss_weights": np.float32}
    assert it.epoch >= 1 and it.stats["skipped_empty"] >= 2


def test_loss_weights_never_cross_documents(tok):
    source = ListSource(_docs(20))
    batch = next(data.PackedIterator(source, tok, seq_len=32, batch_size=8, seed=0))
    w, seg, pos = batch["loss_weights"], batch["segment_ids"], batch["positions"]
    inside = seg[:, :-1] == seg[:, 1:]
    assert np.all(w[:, :-1] == inside)  # within the row: weight 1 iff the next token is the same piece
    assert np.all(pos[:, 1:][inside] == pos[:, :-1][inside] + 1)
    assert np.all(batch["targets"][w == 1] != tok.bos_id)  # a document start is never predicted
    assert np.all(batch["inputs"][w == 1] != tok.eos_id)  # and nothing is predicted from a document end
    starts = batch["inputs"] == tok.bos_id
    assert np.all(pos[starts] == 0) and np.all(seg > 0)


def test_state_restore_gives_identical_batches(tok):
    source = ListSource(_docs(25))
    kwargs = dict(seq_len=24, batch_size=2, seed=3)
    it = data.PackedIterator(source, tok, **kwargs)
    for n in (0, 1, 7, 40):  # 40 steps: past an epoch boundary
        while it.stats["tokens"] < n * 2 * 24:
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        assert all(isinstance(v, int) for k, v in state.items() if k != "streams")
        want = _take(it, 5)
        restored = data.PackedIterator(source, tok, **kwargs)
        restored.set_state(state)
        got = _take(restored, 5)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} after {n} steps")
        assert restored.get_state() == it.get_state()
    with pytest.raises(ValueError, match="seed"):
        data.PackedIterator(source, tok, seq_len=24, batch_size=2, seed=4).set_state(state)


@pytest.mark.parametrize("num_hosts", [2, 3])
def test_global_batch_does_not_depend_on_the_number_of_hosts(tok, num_hosts):
    docs = _docs(40)
    batch_size = 6
    whole = data.PackedIterator(ListSource(docs), tok, seq_len=32, batch_size=batch_size, seed=5)
    want = _take(whole, 3)
    seen, states = [], []
    for host in range(num_hosts):
        source = ListSource(docs)
        it = data.PackedIterator(source, tok, seq_len=32, batch_size=batch_size, seed=5, host_id=host,
                                 num_hosts=num_hosts)
        got = _take(it, 3)
        rows = batch_size // num_hosts
        mine = np.arange(3 * batch_size).reshape(3, batch_size)[:, host * rows:(host + 1) * rows].ravel()
        for key in want:  # this host's rows of the single-host global batches
            np.testing.assert_array_equal(got[key], want[key][mine], err_msg=key)
        states.append(it.get_state())
        seen.append(set(source.reads))
    assert not set.intersection(*seen)  # hosts read disjoint documents
    merged = data.merge_states(states)
    assert merged["streams"] == whole.get_state()["streams"] and merged["tokens"] == whole.stats["tokens"]
    resumed = data.PackedIterator(ListSource(docs), tok, seq_len=32, batch_size=batch_size, seed=5)
    resumed.set_state(merged)  # a global state restores on any number of hosts
    np.testing.assert_array_equal(next(resumed)["inputs"], next(whole)["inputs"])
    with pytest.raises(ValueError, match="divisible"):
        data.PackedIterator(ListSource(docs), tok, seq_len=8, batch_size=3, seed=0, num_hosts=2)
    tiny = next(data.PackedIterator(ListSource(docs[:3]), tok, seq_len=8, batch_size=6, seed=0))
    np.testing.assert_array_equal(tiny["inputs"][:3], tiny["inputs"][3:])  # fewer documents than rows


def test_throughput_feeds_a_tiny_model(tok):
    import time

    it = data.PackedIterator(ListSource(_docs(300)), tok, seq_len=256, batch_size=16, seed=0)
    start = time.perf_counter()
    for _ in range(20):
        next(it)
    assert (time.perf_counter() - start) / 20 < 0.1  # seconds per 16 x 256 batch
