"""Sequence packing: documents -> fixed-length rows with segment ids, the T5 / MaxText packed format.

Each document becomes [bos] + tokens + [eos]; documents are concatenated in a per-epoch shuffled order into
one stream that is cut into rows. A document that does not fit continues in the next row (as a new segment
whose positions restart at 0, as MaxText's packed rows do), so no token is thrown away and no padding is
needed. Attention must not cross segments; the model receives `segment_ids` for that.

Rows are read as windows of T + 1 tokens with stride T: inputs = window[:-1], targets = window[1:]. The
last token of a window is only peeked and starts the next row, so the target at a row's last position is
still trained when its document continues -- no target is lost at row boundaries and none crosses a
document: `loss_weights` is 1 exactly where input and target belong to the same document piece.

Each row of the global batch is its own document stream: row r reads the documents `perm[r::B]` of each
epoch's permutation. A host owns a contiguous block of rows and reads only their documents, so the global
batch is the same whatever the number of hosts (any divisor of B): one process on 8 devices and two
processes on 4 each train on identical data, and a run can resume on a different number of hosts.

Position in the data = per row (epoch, cursor into the row's document order, token offset in that
document): integers that `get_state` / `set_state` save and restore for exact resumption; `merge_states`
joins the hosts' states into the global one that a checkpoint stores.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from maxlm.data.sources import SKIP_REASONS, Source
from maxlm.data import records
from maxlm.errors import InputError

Batch = dict[str, np.ndarray]


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int
    add_bos: bool  # whether a document starts with bos (Qwen's tokenizers have none)

    def encode(self, text: str) -> list[int]: ...


class _Stream:
    """One row's document stream: the documents perm[row::stride] of every epoch, in order."""

    def __init__(self, source: Source, tokenizer: TokenizerLike, seed: int, row: int, stride: int,
                 stats: dict[str, int]):
        self.source, self.tokenizer, self.seed, self.row, self.stride = source, tokenizer, seed, row, stride
        self.stats = stats  # shared with the iterator
        self.epoch, self.cursor, self.offset = 0, 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)
        self._doc_key, self._doc = None, np.zeros(0, np.int32)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.source))
            self._order, self._order_epoch = perm[self.row::self.stride], self.epoch
        return self._order

    def current_doc(self) -> np.ndarray:
        """[bos] + tokens + [eos] of the document under the cursor ([bos] only when the tokenizer frames text
        with it), moving past unreadable documents."""
        skipped = 0
        while True:
            order = self._epoch_order()
            if self.cursor == len(order):
                self.epoch, self.cursor, self.offset = self.epoch + 1, 0, 0
                continue
            if self._doc_key == (self.epoch, self.cursor):
                return self._doc
            text, reason = self.source.lookup(int(order[self.cursor]))
            if text is None:
                self.stats[f"skipped_{reason}"] += 1
                self.cursor, self.offset = self.cursor + 1, 0
                skipped += 1
                if skipped > len(order):
                    reasons = records.reason_counts(self.stats, prefix="skipped_")
                    raise InputError(f"no readable document in the data: every one was skipped ({reasons})")
                continue
            bos = [self.tokenizer.bos_id] if self.tokenizer.add_bos else []
            tokens = bos + self.tokenizer.encode(text) + [self.tokenizer.eos_id]
            self._doc_key, self._doc = (self.epoch, self.cursor), np.asarray(tokens, np.int32)
            return self._doc

    def fill_row(self, tokens: np.ndarray, segments: np.ndarray, positions: np.ndarray) -> None:
        """Fill one window of T + 1 tokens and advance by T (the last token begins the next row)."""
        width, filled, segment = len(tokens), 0, 0
        while filled < width:
            doc = self.current_doc()
            take = min(width - filled, len(doc) - self.offset)
            tokens[filled:filled + take] = doc[self.offset:self.offset + take]
            segment += 1
            segments[filled:filled + take] = segment
            positions[filled:filled + take] = np.arange(take)
            filled += take
            self.offset += take
            if self.offset == len(doc) and filled < width:
                self.stats["docs"] += 1
                self.cursor, self.offset = self.cursor + 1, 0
        self.offset -= 1
        self.stats["tokens"] += width - 1


class PackedIterator:
    """Infinite iterator of packed per-host batches: dict of [B/num_hosts, T] arrays.

    Keys: inputs, targets, segment_ids (1, 2, ... per document piece in the row; 0 would be padding),
    positions (0 at each piece start), all int32, and loss_weights (float32). Each epoch draws the
    permutation `default_rng((seed, epoch))` of all documents; global row r reads its entries r, r + B,
    r + 2B, ...; host h owns rows [h B/H, (h+1) B/H), so hosts read disjoint documents. (A source of
    n < B documents has n streams: row r reads stream r mod n.)
    """

    def __init__(self, source: Source, tokenizer: TokenizerLike, *, seq_len: int, batch_size: int, seed: int,
                 host_id: int = 0, num_hosts: int = 1):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if num_hosts < 1 or not 0 <= host_id < num_hosts:
            raise ValueError(f"host_id={host_id} must be in [0, num_hosts={num_hosts})")
        if batch_size % num_hosts:
            raise ValueError(f"batch_size={batch_size} is not divisible by num_hosts={num_hosts}")
        if len(source) == 0:
            raise InputError("the data source has no documents (an empty file or split?)")
        self.seq_len, self.rows, self.seed, self.batch_size = seq_len, batch_size // num_hosts, seed, batch_size
        self.first_row = host_id * self.rows
        self._stats = dict.fromkeys(("docs", "tokens") + tuple(f"skipped_{r}" for r in SKIP_REASONS), 0)
        # With fewer documents than rows (a tiny eval split), rows r and r + n share a document order.
        stride = min(batch_size, len(source))
        self._streams = [_Stream(source, tokenizer, seed, (self.first_row + r) % stride, stride, self._stats)
                         for r in range(self.rows)]

    def __iter__(self) -> PackedIterator:
        return self

    @property
    def stats(self) -> dict[str, int]:
        """Documents finished, tokens emitted (T per row) and skipped documents by reason, this host."""
        return dict(self._stats)

    @property
    def epoch(self) -> int:
        """The epoch every row of this host has reached (rows advance at their own pace)."""
        return min(s.epoch for s in self._streams)

    def get_state(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "first_row": self.first_row,
                "streams": [[s.epoch, s.cursor, s.offset] for s in self._streams], **self._stats}

    def set_state(self, state: dict) -> None:
        """Restore from this host's state or from a merged (global) one covering this host's rows."""
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"data state was saved with {key}={state[key]}, this iterator has {mine}")
        lo = self.first_row - int(state["first_row"])
        rows = state["streams"][lo:lo + self.rows] if lo >= 0 else []
        if len(rows) != self.rows:
            raise ValueError(f"data state covers rows {state['first_row']}..+{len(state['streams'])}, this host "
                             f"reads rows {self.first_row}..+{self.rows}")
        for stream, (epoch, cursor, offset) in zip(self._streams, rows):
            stream.epoch, stream.cursor, stream.offset = int(epoch), int(cursor), int(offset)
        self._stats.update({k: int(state.get(k, 0)) for k in self._stats})

    def __next__(self) -> Batch:
        shape = (self.rows, self.seq_len + 1)  # [B, T + 1] windows
        tokens, segments, positions = (np.zeros(shape, np.int32) for _ in range(3))
        for r, stream in enumerate(self._streams):
            stream.fill_row(tokens[r], segments[r], positions[r])
        same_piece = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments[:, :-1],
                 "positions": positions[:, :-1], "loss_weights": same_piece.astype(np.float32)}
        return {k: np.ascontiguousarray(v) for k, v in batch.items()}


def merge_states(states: list[dict]) -> dict:
    """Join per-host iterator states into the global state (all rows; statistics summed)."""
    states = sorted(states, key=lambda st: int(st["first_row"]))
    merged = {k: v for k, v in states[0].items() if k not in ("streams", "first_row")}
    merged.update(first_row=0, streams=[row for st in states for row in st["streams"]])
    for key in merged:
        if key not in ("seed", "batch_size", "first_row", "streams"):
            merged[key] = sum(int(st.get(key, 0)) for st in states)
    return merged


def gather_state(iterator: PackedIterator) -> dict:
    """The global data state, assembled on every process from each host's iterator (a collective: all
    processes must call it). One process, or an iterator whose state is the same on every host
    (`replicated_state`, e.g. the SFT iterator), returns its own state unchanged."""
    import json

    import jax
    from jax.experimental import multihost_utils

    local = iterator.get_state()
    if jax.process_count() == 1 or getattr(iterator, "replicated_state", False):
        return local
    # Counters can pass 2^31 (tokens), and JAX arrays are 32-bit here: ship the JSON text as bytes.
    blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return merge_states([json.loads(bytes(row[:n]).decode()) for row, n in zip(every, sizes)])


class EpochIterator:
    """The part the SFT and preference iterators share: every host builds the same global batch from the
    same per-epoch order and keeps its own rows, so the state -- (epoch, cursor, counters) -- is global
    (`replicated_state`), and a resumed run, on any number of hosts, continues exactly."""

    replicated_state = True
    STATS: tuple[str, ...] = ()  # counters kept in the state

    def __init__(self, items: list, *, seq_len: int, batch_size: int, seed: int, pad_id: int = 0,
                 host_id: int = 0, num_hosts: int = 1):
        if batch_size % num_hosts:
            raise ValueError(f"batch_size={batch_size} is not divisible by num_hosts={num_hosts}")
        self.items = items
        self.seq_len, self.batch_size, self.seed, self.pad_id = seq_len, batch_size, seed, pad_id
        self.rows = batch_size // num_hosts
        self.first_row = host_id * self.rows
        self.epoch, self.cursor = 0, 0
        self._stats = {k: 0 for k in self.STATS}

    def __iter__(self) -> "EpochIterator":
        return self

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def get_state(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "epoch": self.epoch, "cursor": self.cursor,
                **self._stats}

    def set_state(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size)):
            if int(state.get(key, mine)) != mine:
                raise ValueError(f"data state was saved with {key}={state[key]}, this iterator has {mine}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._stats.update({k: int(state.get(k, 0)) for k in self._stats})

    def _mine(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This host's rows of a global batch."""
        return {k: np.ascontiguousarray(v[self.first_row:self.first_row + self.rows]) for k, v in batch.items()}
