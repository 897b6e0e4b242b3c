"""Sequence packing: documents -> fixed-length rows with segment ids, the T5 / MaxText packed format.

Each document becomes [bos] + tokens + [eos]; documents are concatenated in a per-epoch shuffled order into
one stream that is cut into rows. A document that does not fit continues in the next row (as a new segment
whose positions restart at 0, as MaxText's packed rows do), so no token is thrown away and no padding is
needed. Attention must not cross segments; the model receives `segment_ids` for that.

Rows are read as windows of T + 1 tokens with stride T: inputs = window[:-1], targets = window[1:]. The
last token of a window is only peeked and starts the next row, so the target at a row's last position is
still trained when its document continues -- no target is lost at row boundaries and none crosses a
document: `loss_weights` is 1 exactly where input and target belong to the same document piece.

Position in the data = (epoch, cursor into this host's document order, token offset in that document):
three integers that `get_state` / `set_state` save and restore for exact resumption.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from maxlm.data.sources import SKIP_REASONS, Source

Batch = dict[str, np.ndarray]


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


class PackedIterator:
    """Infinite iterator of packed per-host batches: dict of [B/num_hosts, T] arrays.

    Keys: inputs, targets, segment_ids (1, 2, ... per document piece in the row; 0 would be padding),
    positions (0 at each piece start), all int32, and loss_weights (float32). Each epoch draws the
    permutation `default_rng((seed, epoch))` of all documents; host h reads every num_hosts-th entry of it
    starting at h, so within an epoch hosts read disjoint documents that together cover the source.
    """

    def __init__(self, source: Source, tokenizer: TokenizerLike, *, seq_len: int, batch_size: int, seed: int,
                 host_id: int = 0, num_hosts: int = 1):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if num_hosts < 1 or not 0 <= host_id < num_hosts:
            raise ValueError(f"host_id={host_id} must be in [0, num_hosts={num_hosts})")
        if batch_size % num_hosts:
            raise ValueError(f"batch_size={batch_size} is not divisible by num_hosts={num_hosts}")
        if len(source) <= host_id:
            raise ValueError(f"host {host_id} of {num_hosts} gets no documents: the source has {len(source)}")
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.rows, self.seed = seq_len, batch_size // num_hosts, seed
        self.host_id, self.num_hosts = host_id, num_hosts
        self._epoch, self._cursor, self._offset = 0, 0, 0
        self._stats = dict.fromkeys(("docs", "tokens") + tuple(f"skipped_{r}" for r in SKIP_REASONS), 0)
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)
        self._doc_key, self._doc = None, np.zeros(0, np.int32)

    def __iter__(self) -> PackedIterator:
        return self

    @property
    def stats(self) -> dict[str, int]:
        """Documents finished, tokens emitted (T per row) and skipped documents by reason, this host."""
        return dict(self._stats)

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "cursor": self._cursor, "offset": self._offset, "seed": self.seed,
                "num_hosts": self.num_hosts, **self._stats}

    def set_state(self, state: dict[str, int]) -> None:
        for key, mine in (("seed", self.seed), ("num_hosts", self.num_hosts)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"data state was saved with {key}={state[key]}, this iterator has {mine}")
        self._epoch, self._cursor, self._offset = (int(state[k]) for k in ("epoch", "cursor", "offset"))
        self._stats = {k: int(state.get(k, 0)) for k in self._stats}

    def _host_order(self) -> np.ndarray:
        if self._order_epoch != self._epoch:
            perm = np.random.default_rng((self.seed, self._epoch)).permutation(len(self.source))
            self._order, self._order_epoch = perm[self.host_id::self.num_hosts], self._epoch
        return self._order

    def _current_doc(self) -> np.ndarray:
        """[bos] + tokens + [eos] of the document under the cursor, moving past unreadable documents."""
        skipped = 0
        while True:
            order = self._host_order()
            if self._cursor == len(order):
                self._epoch, self._cursor, self._offset = self._epoch + 1, 0, 0
                continue
            if self._doc_key == (self._epoch, self._cursor):
                return self._doc
            text, reason = self.source.lookup(int(order[self._cursor]))
            if text is None:
                self._stats[f"skipped_{reason}"] += 1
                self._cursor, self._offset = self._cursor + 1, 0
                skipped += 1
                if skipped > len(order):
                    raise RuntimeError(f"host {self.host_id}: no readable document in a whole epoch "
                                       f"(skipped: {self.stats})")
                continue
            tokens = [self.tokenizer.bos_id] + self.tokenizer.encode(text) + [self.tokenizer.eos_id]
            self._doc_key, self._doc = (self._epoch, self._cursor), np.asarray(tokens, np.int32)
            return self._doc

    def _fill_row(self, tokens: np.ndarray, segments: np.ndarray, positions: np.ndarray) -> None:
        """Fill one window of T + 1 tokens and advance by T (the last token begins the next row)."""
        width, filled, segment = len(tokens), 0, 0
        while filled < width:
            doc = self._current_doc()
            take = min(width - filled, len(doc) - self._offset)
            tokens[filled:filled + take] = doc[self._offset:self._offset + take]
            segment += 1
            segments[filled:filled + take] = segment
            positions[filled:filled + take] = np.arange(take)
            filled += take
            self._offset += take
            if self._offset == len(doc) and filled < width:
                self._stats["docs"] += 1
                self._cursor, self._offset = self._cursor + 1, 0
        self._offset -= 1
        self._stats["tokens"] += width - 1

    def __next__(self) -> Batch:
        shape = (self.rows, self.seq_len + 1)  # [B, T + 1] windows
        tokens, segments, positions = (np.zeros(shape, np.int32) for _ in range(3))
        for r in range(self.rows):
            self._fill_row(tokens[r], segments[r], positions[r])
        same_piece = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments[:, :-1],
                 "positions": positions[:, :-1], "loss_weights": same_piece.astype(np.float32)}
        return {k: np.ascontiguousarray(v) for k, v in batch.items()}
