"""Random-access document sources: jsonl files, TensorFlow Datasets, and the embedded stdlib corpus.

Every source is a list of documents: `len(source)` and `source.get(i) -> str | None`. Random access (rather
than a stream) is what makes the packer's per-epoch shuffle and its exact resume cheap: a position in the
data is just (epoch, index into a permutation, token offset), as in Grain / MaxText's array_record pipeline.

A document that cannot be read is not an error: `lookup(i)` returns `(None, reason)` and the caller counts
the reason (SKIP_REASONS) -- one corrupt line in a terabyte of crawl must not kill a run.
"""

from __future__ import annotations

import glob
import gzip
import json
import mmap
import os
import shutil
import sysconfig
import tempfile
import zlib
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from maxlm.data.hashing import splitmix64
from maxlm.errors import ConfigError, InputError

CURATED_SHARDS = "part-*.jsonl*"  # the shards of a curate output folder (beside report.json)
SKIP_REASONS = ("bad_json", "bad_utf8", "missing_text", "not_string", "empty")
Lookup = tuple[str | None, str | None]  # (text, None) or (None, skip reason)


def as_text(value: Any) -> Lookup:
    """Validate one raw document value (str or UTF-8 bytes) as trainable text."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_utf8"
    if not isinstance(value, str):
        return None, "not_string"
    try:  # JSON "\ud800" escapes give lone surrogates, which are not UTF-8 encodable
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None, "bad_utf8"
    if not value.strip():
        return None, "empty"
    return value, None


class Source:
    """A list of documents. Subclasses implement `__len__` and `lookup`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def lookup(self, i: int) -> Lookup:
        raise NotImplementedError

    def get(self, i: int) -> str | None:
        return self.lookup(i)[0]

    def _check_index(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")


def _line_spans(buf: Any, size: int, chunk: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) byte offsets of every line, excluding the newline; vectorised, chunk by chunk."""
    newlines = [np.flatnonzero(np.frombuffer(buf[o:o + chunk], np.uint8) == 10) + o
                for o in range(0, size, chunk)]
    ends = np.concatenate(newlines + [np.array([size])]).astype(np.int64)
    starts = np.concatenate([np.zeros(1, np.int64), ends[:-1] + 1])
    if starts[-1] == size:  # a final newline (or an empty file) does not open another line
        starts, ends = starts[:-1], ends[:-1]
    return starts, ends


class JsonlSource(Source):
    """Lines of one or more jsonl files (optionally .gz), `{text_key: "..."}` per line.

    A byte-offset index of line starts (8 bytes per document) makes every line randomly accessible via mmap.
    Gzip has no random access, so a .gz file is decompressed once into a private temporary file.
    """

    def __init__(self, pattern: str, text_key: str = "text"):
        if os.path.isdir(pattern):  # a `python -m maxlm.curate` output folder
            pattern = os.path.join(pattern, CURATED_SHARDS)
        self.paths = sorted(glob.glob(pattern))
        if not self.paths:
            raise FileNotFoundError(f"data.path={pattern!r} matches no file")
        self.text_key = text_key
        self._tmp = tempfile.TemporaryDirectory(prefix="maxlm-jsonl-") if any(
            p.endswith(".gz") for p in self.paths) else None
        self._maps, starts, ends = [], [], []
        for k, path in enumerate(self.paths):
            if path.endswith(".gz"):
                plain = os.path.join(self._tmp.name, f"{k}.jsonl")
                try:
                    with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 24)
                except (OSError, EOFError, zlib.error) as e:
                    raise InputError(f"{path}: corrupt gzip file ({e})") from e
                path = plain
            size = os.path.getsize(path)
            if size == 0:
                m = b""
            else:
                with open(path, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            s, e = _line_spans(m, size)
            self._maps.append(m)
            starts.append(s)
            ends.append(e)
        self._file_start = np.cumsum([0] + [len(s) for s in starts])
        self._starts, self._ends = starts, ends

    def __len__(self) -> int:
        return int(self._file_start[-1])

    def line_bytes(self) -> np.ndarray:
        """Byte length of every line (a document's size without reading it)."""
        return np.concatenate([e - s for s, e in zip(self._starts, self._ends)]) if self._starts else np.zeros(0, np.int64)

    def _raw(self, i: int) -> bytes:
        k = int(np.searchsorted(self._file_start, i, side="right")) - 1
        j = i - int(self._file_start[k])
        return self._maps[k][int(self._starts[k][j]):int(self._ends[k][j])]

    def field(self, i: int, key: str) -> Any:
        """Field `key` of record i, or None (absent, or the line is not a valid record)."""
        raw = self._raw(i)
        if f'"{key}"'.encode() not in raw:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record.get(key) if isinstance(record, dict) else None

    def lookup(self, i: int) -> Lookup:
        self._check_index(i)
        raw = self._raw(i)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_utf8"
        if not line.strip():
            return None, "empty"
        try:
            record = json.loads(line)
        except ValueError:
            return None, "bad_json"
        if not isinstance(record, dict) or self.text_key not in record:
            return None, "missing_text"
        return as_text(record[self.text_key])


class TfdsSource(Source):
    """A TensorFlow Datasets split read through `tfds.data_source` (array_record random access).

    This path needs only tensorflow-datasets + array_record, not TensorFlow itself. The dataset must already
    be prepared under `data_dir` in the array_record format (`tfds build --file_format=array_record`).
    """

    def __init__(self, name: str, split: str = "train", data_dir: str = "", text_key: str = "text"):
        import tensorflow_datasets as tfds

        self.text_key = text_key
        self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None)

    def __len__(self) -> int:
        return len(self._ds)

    def lookup(self, i: int) -> Lookup:
        self._check_index(i)
        record = self._ds[i]
        if not isinstance(record, dict) or self.text_key not in record:
            return None, "missing_text"
        return as_text(record[self.text_key])


STDLIB_EXCLUDE = frozenset({
    "site-packages", "dist-packages", "__pycache__",
    "test", "tests", "idltest", "turtledemo",  # test suites and demos, not library code
    "idlelib", "lib2to3", "ensurepip",  # an application, a deprecated tool, bundled wheels
    "encodings",  # mostly machine-generated charmap tables
})


class StdlibSource(Source):
    """The Python standard library's own .py files: real code, present wherever Python runs (offline default).

    Sorted relative paths make the document list identical on every machine with the same Python. Empty
    files (package `__init__.py`) are not documents and are left out rather than counted as skipped.
    """

    def __init__(self, root: str | None = None):
        self.root = root or sysconfig.get_paths()["stdlib"]
        paths = []
        for d, dirs, files in os.walk(self.root):
            dirs[:] = [x for x in dirs if x not in STDLIB_EXCLUDE and not x.startswith("config-")]
            paths += [os.path.relpath(os.path.join(d, f), self.root) for f in files
                      if f.endswith(".py") and os.path.getsize(os.path.join(d, f)) > 0]  # empty __init__.py
        self.paths = sorted(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def lookup(self, i: int) -> Lookup:
        self._check_index(i)
        with open(os.path.join(self.root, self.paths[i]), "rb") as f:
            return as_text(f.read())


class Subset(Source):
    """A view of `base` restricted to `indices` (e.g. the train or eval split)."""

    def __init__(self, base: Source, indices: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def lookup(self, i: int) -> Lookup:
        self._check_index(i)
        return self.base.lookup(int(self.indices[i]))


def unit_hash(n: int, salt: int = 0) -> np.ndarray:
    """splitmix64 of 0..n-1 mapped to [0, 1): a fixed coin per document index; a nonzero `salt` draws an
    independent set of coins (salt 0 is the train/eval split's, which must never change)."""
    index = np.arange(n, dtype=np.uint64)
    z = splitmix64(index ^ splitmix64(np.uint64(salt)) if salt else index)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_indices(n: int, eval_fraction: float, split: str) -> np.ndarray:
    """Document indices of `split`: a hash of the index decides, so train and eval never share a document.

    The split does not depend on the shuffle seed (changing the seed must not leak eval into training). With
    eval_fraction > 0 at least one document is held out, so a tiny corpus still has an eval set.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    u = unit_hash(n)
    held_out = u < eval_fraction
    if eval_fraction > 0 and n > 1 and not held_out.any():
        held_out[np.argmin(u)] = True
    if split == "eval" and not held_out.any():
        raise ConfigError("data.eval_fraction", f"{eval_fraction} holds out no document of the {n} in the corpus "
                          "(set it to 0, or train.eval_every=0, for no eval loss)")
    return np.flatnonzero(held_out if split == "eval" else ~held_out)


def make_base_source(config: ml_collections.ConfigDict) -> Source:
    """All documents of the configured source (`config.data.source`), before the train/eval split."""
    d = config.data
    if d.source == "stdlib":
        return StdlibSource()
    if d.source == "jsonl":
        return JsonlSource(d.path, d.text_key)
    if d.source == "tfds":
        return TfdsSource(d.tfds_name, d.tfds_split, d.tfds_data_dir, d.text_key)
    raise ValueError(f"data.source {d.source!r} has no single base source (stdlib | jsonl | tfds)")


def iter_texts(source: Source, seed: int = 0) -> Iterator[str]:
    """Readable documents in a fixed shuffled order, so a byte-capped prefix samples the whole corpus."""
    for i in np.random.default_rng(seed).permutation(len(source)):
        text = source.get(int(i))
        if text is not None:
            yield text
