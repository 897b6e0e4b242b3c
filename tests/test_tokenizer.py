"""Tokenizer: exact UTF-8 round trip, LLaMA / Baichuan piece choices, fixed ids, determinism, caching."""

import hashlib
import os

import pytest

from maxlm import tokenizer
from maxlm.config import default_config, override

CODE = '''import os


class Counter:
    """Count things."""

    def __init__(self, start=0):
        self.count = start

    def add(self, n=1):
        if n < 0:
            raise ValueError("negative: %d" % n)
        self.count += n
        return self.count
'''
PROSE = "The quick brown fox jumps over the lazy dog. Numbers like 1999, 2024 and 0123456789 appear.\n"
CORPUS = [CODE.replace("Counter", f"Counter{i}") + PROSE * (i % 3 + 1) for i in range(40)]
VOCAB = 400

TRICKY = [
    "",
    "hello world",
    "你好，世界！这是中文。",
    "emoji 😀🚀👩‍👩‍👧 and flags 🇨🇭",
    "def f(x):\n\tif x:\n\t\treturn 1\n        return 0\n",
    "  leading and trailing spaces   ",
    "\n\n\nmany newlines\r\nand CRLF\r\n",
    "literal \u2581 marker and \u2581\u2581 twice\u2581",
    "control \x00\x01\x7f chars",
    "combining e\u0301 vs \u00e9, ligature \ufb01, fullwidth \uff21",
    "<s> </s> <pad> <unk> look like specials but are text",
    "x = 3.14159e-10 + 0x1F",
]


def _config(**overrides):
    return override(default_config(), **{"model.vocab_size": VOCAB, **overrides})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "sp")
    return tokenizer.train(CORPUS, prefix, _config())


def test_ids_and_vocab(tok):
    assert tok.vocab_size == VOCAB
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.path.endswith("sp.model") and os.path.exists(tok.path)
    assert tokenizer.load(tok.path).encode("def add") == tok.encode("def add")


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # byte fallback: nothing is ever unknown
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_digits_split(tok):
    ids = tok.encode("year 2024 and 1234567890")
    digit_pieces = [tok.id_to_piece(i) for i in ids if any(ch.isdigit() for ch in tok.id_to_piece(i))]
    assert "".join(digit_pieces) == "20241234567890"
    assert all(len(p) == 1 for p in digit_pieces)


def test_user_defined_symbols(tok):
    for symbol in default_config().tokenizer.user_defined_symbols:
        ids = tok.encode(symbol)
        assert ids == [tok.piece_to_id(symbol)] and ids[0] != tok.unk_id
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.piece_to_id("<|im_start|>") and ids[-1] == tok.piece_to_id("<|im_end|>")


def test_whitespace_pieces_compress_indentation(tok):
    ids = tok.encode("        return self.count")
    assert tok.id_to_piece(ids[0]) == "\u2581" * 8  # one whitespace-only piece for the indentation


def test_training_is_deterministic(tmp_path):
    # The .model file also records its own output path, so compare the learned pieces and scores (.vocab).
    digests = []
    for k in range(2):
        tokenizer.train(iter(CORPUS), str(tmp_path / f"m{k}"), _config())
        digests.append(hashlib.sha256((tmp_path / f"m{k}.vocab").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_train_max_bytes_caps_input():
    lines = list(tokenizer._lines(["aaaa\nbbbb\n\ncccc", "dddd"], max_bytes=10))
    assert lines == ["aaaa", "bbbb"]


def test_load_or_train_caches_and_checks_vocab(tmp_path):
    config = _config(**{"tokenizer.train_max_bytes": 300_000})
    tok = tokenizer.load_or_train(config, str(tmp_path))
    path = tmp_path / "tokenizer.model"
    assert tok.path == str(path) and tok.vocab_size == VOCAB
    assert tok.decode(tok.encode("import sys\n")) == "import sys\n"
    stamp = path.stat().st_mtime_ns
    assert tokenizer.load_or_train(config, str(tmp_path)).encode("x = 1") == tok.encode("x = 1")
    assert path.stat().st_mtime_ns == stamp  # loaded from the cache, not retrained
    with pytest.raises(ValueError, match="model.vocab_size: 512"):
        tokenizer.load_or_train(_config(**{"model.vocab_size": 512}), str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer.path"):
        tokenizer.load_or_train(_config(**{"model.vocab_size": 512, "tokenizer.path": str(path)}), "/nonexistent")
    explicit = tokenizer.load_or_train(_config(**{"tokenizer.path": str(path)}), "/nonexistent")
    assert explicit.path == str(path)


def test_same_vocabulary_compares_pieces_not_sizes(tok, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    with open(tok.path, "rb") as f:
        proto.ParseFromString(f.read())
    same = tmp_path / "same.model"
    same.write_bytes(proto.SerializeToString())
    proto.pieces[-1].piece = proto.pieces[-1].piece + "\u2581renamed"  # one piece differs, same size
    other = tmp_path / "other.model"
    other.write_bytes(proto.SerializeToString())
    grown, _ = tokenizer.add_special_tokens(tok.path, ["<|x|>"], str(tmp_path / "grown.model"))
    assert tokenizer.same_vocabulary(tok, tokenizer.load(str(same)))
    assert tokenizer.load(str(other)).vocab_size == tok.vocab_size
    assert not tokenizer.same_vocabulary(tok, tokenizer.load(str(other)))
    assert not tokenizer.same_vocabulary(tok, grown)
