"""Reading a corpus as shards of JSON records, counting every line that is not one.

A shard is one input file (jsonl, optionally .gz or .zst) or a slice of a random-access source (the
embedded stdlib corpus, a TFDS dataset). `iter_records` yields each valid record with every field it has,
and, for each line that is not a valid record, the reason (MALFORMED): bad JSON, invalid UTF-8, no text
field, text that is not a non-empty string, a line over the byte limit (skipped in chunks, never held in
memory whole), or the unreadable tail of a truncated or corrupt archive. Nothing here raises on bad data.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from maxlm.data.sources import StdlibSource, as_text
from maxlm.errors import InputError  # noqa: F401  (raised here; importable from here as before)


MALFORMED = ("bad_json", "bad_utf8", "missing_text", "not_string", "empty", "too_long", "corrupt_file")
SOURCE_SHARD_DOCS = 1000  # documents per shard when the input is a Source (stdlib, TFDS), not files


def read_json_object(path: str, error: type[Exception] = InputError) -> dict:
    """A JSON file holding one object (a config.json, a tokenizer_config.json) -> the dict; anything else is
    `error` naming the file, in one line."""
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise error(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path} is not a JSON object")
    return value


def reason_counts(counts: Mapping[str, int], prefix: str = "") -> str:
    """"bad_json 3, too_long 1": the non-zero counts of skipped records by reason, most frequent first (keys
    lose `prefix`) -- the one wording every "nothing usable" error and summary uses."""
    items = [(k[len(prefix):] if prefix and k.startswith(prefix) else k, v) for k, v in counts.items()
             if v and k.startswith(prefix)]
    return ", ".join(f"{k} {v}" for k, v in sorted(items, key=lambda kv: (-kv[1], kv[0])))


@dataclasses.dataclass(frozen=True)
class Shard:
    """A unit of work: one input file, or documents [lo, hi) of a random-access source."""

    kind: str  # file | stdlib | tfds
    path: str  # the file, or the TFDS dataset name
    lo: int = 0
    hi: int = 0
    split: str = "train"
    data_dir: str = ""  # TFDS


def resolve_input(spec: str, tfds_data_dir: str = "") -> list[Shard]:
    """`--input`: a file glob, `stdlib` (the embedded default corpus) or `tfds:NAME[:SPLIT]`."""
    if spec == "stdlib":
        n = len(StdlibSource())
        return [Shard("stdlib", "", lo, min(lo + SOURCE_SHARD_DOCS, n)) for lo in range(0, n, SOURCE_SHARD_DOCS)]
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition(":")
        import tensorflow_datasets as tfds

        n = len(tfds.data_source(name, split=split or "train", data_dir=tfds_data_dir or None))
        return [Shard("tfds", name, lo, min(lo + SOURCE_SHARD_DOCS, n), split or "train", tfds_data_dir)
                for lo in range(0, n, SOURCE_SHARD_DOCS)]
    paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    if not paths:
        raise InputError(f"--input={spec!r} matches no file (a glob of .jsonl[.gz|.zst] files, stdlib, "
                          "or tfds:NAME[:SPLIT])")
    return [Shard("file", p) for p in paths]


def _open(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise InputError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from e
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _read_line(f: io.BufferedIOBase, limit: int) -> tuple[bytes | None, bool]:
    """(line without newline or None at the end, too_long): a line over `limit` bytes is skipped in
    chunks, never held in memory whole."""
    line = f.readline(limit + 1)
    if not line:
        return None, False
    if len(line) <= limit or line.endswith(b"\n"):
        return line.rstrip(b"\n"), len(line.rstrip(b"\n")) > limit
    while line and not line.endswith(b"\n"):
        line = f.readline(1 << 20)
    return b"", True


def iter_records(shard: Shard, text_key: str, max_line_bytes: int) -> Iterator[tuple[dict | None, str | None]]:
    """(record, None) for each valid record of a shard, (None, reason) for each line that is not one."""
    if shard.kind == "stdlib":
        source = StdlibSource()
        for i in range(shard.lo, shard.hi):
            text, reason = source.lookup(i)
            yield ({"id": source.paths[i], text_key: text}, None) if text is not None else (None, reason)
        return
    if shard.kind == "tfds":
        import tensorflow_datasets as tfds

        ds = tfds.data_source(shard.path, split=shard.split, data_dir=shard.data_dir or None)
        for i in range(shard.lo, shard.hi):
            record = ds[i]
            if not isinstance(record, dict) or text_key not in record:
                yield None, "missing_text"
                continue
            text, reason = as_text(record[text_key])
            if text is None:
                yield None, reason
                continue
            fields = {k: _jsonable(v) for k, v in record.items() if k != text_key}
            yield {"id": f"{shard.path}:{shard.split}:{i}", **fields, text_key: text}, None  # its own id wins
        return
    try:
        with _open(shard.path) as f:
            while True:
                raw, too_long = _read_line(f, max_line_bytes)
                if raw is None:
                    return
                if too_long:
                    yield None, "too_long"
                    continue
                if not raw.strip():
                    continue  # blank lines are layout, not records
                yield _parse(raw, text_key)
    except (OSError, EOFError, ValueError) as e:  # truncated gzip, corrupt zstd frame
        if isinstance(e, InputError):
            raise
        yield None, "corrupt_file"


def _jsonable(value: Any) -> Any:
    """A TFDS feature value as JSON: bytes decoded, numpy scalars and arrays as Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()] if value.ndim else _jsonable(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _parse(raw: bytes, text_key: str) -> tuple[dict | None, str | None]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "bad_utf8"
    try:
        record = json.loads(line)
    except ValueError:
        return None, "bad_json"
    if not isinstance(record, dict) or text_key not in record:
        return None, "missing_text"
    text, reason = as_text(record[text_key])
    if text is None:
        return None, reason
    record[text_key] = text
    return record, None
