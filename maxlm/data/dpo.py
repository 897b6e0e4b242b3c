"""Preference pairs packed into rows for DPO and its relatives (`maxlm.posttrain.dpo`).

A DPO loss needs, per pair, the summed log-probabilities of the chosen and of the rejected reply under the
policy (and the reference). Each side is a whole conversation ending at the assistant's end marker
(`preference.render_pair` with weights: 1 on the reply's tokens and the marker). Rows hold several pairs
back to back -- Hugging Face TRL's "padding-free" layout -- so a batch of short pairs wastes no compute on
padding: every sequence is its own segment (attention never crosses one, positions restart at 0), and
`slots` says which sequence each target token's log-prob belongs to: 2k for the chosen reply of the row's
k-th pair, 2k + 1 for its rejected reply, -1 for prompt tokens and padding. `pairs_per_row` = 1 gives the
unpacked layout (one pair per row, chosen then rejected).

Batch arrays are all [B, T] int32 / float32 (rows over the data axes, tokens over the sequence axis, like
every other batch): inputs, targets, positions, segment_ids, slots, and -- when the reference policy's
log-probs were computed once before training (`with_reference`) -- ref_logprobs, the reference's
log-prob of each target token (0 off the slots).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from maxlm.data import preference
from maxlm.data.packing import EpochIterator
from maxlm.errors import InputError

Batch = dict[str, np.ndarray]
# One side of a pair as stored: (ids [n], weights [n], reference log-probs of targets [n - 1] or None).
Side = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def pair_size(pair: tuple[Side, Side]) -> int:
    """Row positions a pair takes: n - 1 inputs per side."""
    return sum(len(side[0]) - 1 for side in pair)


def sides(pairs: preference.Pairs) -> list[tuple[Side, Side]]:
    """`Pairs` rendered `with_weights` -> the packer's items (no reference log-probs yet)."""
    if not pairs.with_weights:
        raise ValueError("DPO needs the pairs' reply weights: build them with preference.Pairs(with_weights=True)")
    return [((c, cw, None), (r, rw, None)) for (c, cw), (r, rw) in pairs.items]


def has_reference(pairs: list[tuple[Side, Side]]) -> bool:
    """Whether the pairs carry the reference's log-probs (`attach_reference`)."""
    return pairs[0][0][2] is not None


def pack(pairs: list[tuple[Side, Side]], seq_len: int, rows: int, pairs_per_row: int, pad_id: int = 0,
         with_reference: bool = False) -> tuple[Batch, list[tuple[int, int, int]]]:
    """Pairs, in order, into `rows` rows of `seq_len` positions (each pair must fit one row: `pair_size`).

    A row takes pairs while the next fits and it has fewer than `pairs_per_row`; a pair never splits. Returns
    (batch, placements): placement i = (row, offset of the chosen side, offset of the rejected side) of
    pairs[i], for as many pairs as fit; the caller continues with the rest.
    """
    b: Batch = {"inputs": np.full((rows, seq_len), pad_id, np.int32), "targets": np.full((rows, seq_len), pad_id,
                                                                                          np.int32),
                "positions": np.zeros((rows, seq_len), np.int32), "segment_ids": np.zeros((rows, seq_len), np.int32),
                "slots": np.full((rows, seq_len), -1, np.int32)}
    if with_reference:
        b["ref_logprobs"] = np.zeros((rows, seq_len), np.float32)
    placements = []
    row, used, in_row = 0, 0, 0
    for pair in pairs:
        size = pair_size(pair)
        if size > seq_len:
            raise ValueError(f"a pair takes {size} positions, more than seq_len={seq_len}")
        if used + size > seq_len or in_row == pairs_per_row:
            row, used, in_row = row + 1, 0, 0
        if row == rows:
            break
        offsets = []
        for side_index, (ids, weights, ref) in enumerate(pair):
            n = len(ids) - 1
            span = slice(used, used + n)
            b["inputs"][row, span] = ids[:-1]
            b["targets"][row, span] = ids[1:]
            b["positions"][row, span] = np.arange(n)
            b["segment_ids"][row, span] = 2 * in_row + side_index + 1
            b["slots"][row, span] = np.where(weights[1:] > 0, 2 * in_row + side_index, -1)
            if with_reference:
                b["ref_logprobs"][row, span] = np.where(weights[1:] > 0, ref, 0.0)
            offsets.append(used)
            used += n
        placements.append((row, offsets[0], offsets[1]))
        in_row += 1
    return b, placements


def attach_reference(pairs: list[tuple[Side, Side]], logprob_fn: Callable[[Batch], np.ndarray], *, seq_len: int,
                     rows: int, pairs_per_row: int, pad_id: int = 0) -> list[tuple[Side, Side]]:
    """The pairs with each side's reference log-probs filled in: `logprob_fn(batch)` -> [rows, seq_len] log-prob
    of every target token under the reference, run once over all pairs packed in order (DPO's cached
    reference: the frozen policy is then needed neither in memory nor in the step)."""
    out: list[tuple[Side, Side]] = []
    while len(out) < len(pairs):
        batch, placements = pack(pairs[len(out):], seq_len, rows, pairs_per_row, pad_id)
        logprobs = np.asarray(logprob_fn(batch), np.float32)
        for (row, c_at, r_at), pair in zip(placements, pairs[len(out):len(out) + len(placements)]):
            out.append(tuple((ids, w, logprobs[row, at:at + len(ids) - 1].copy())
                             for (ids, w, _), at in zip(pair, (c_at, r_at))))
    return out


class PackedPairIterator(EpochIterator):
    """Infinite iterator of per-host packed pair batches, reshuffled every epoch; exact-resume state (the
    epoch and the next pair: a pair that did not fit the last batch opens the next one)."""

    STATS = ("pairs",)

    def __init__(self, pairs: list[tuple[Side, Side]], *, seq_len: int, batch_size: int, pairs_per_row: int,
                 seed: int, pad_id: int = 0, host_id: int = 0, num_hosts: int = 1):
        if not pairs:
            raise InputError("no usable preference pairs")
        longest = max(pair_size(p) for p in pairs)
        if longest > seq_len:
            raise ValueError(f"a pair takes {longest} positions, more than seq_len={seq_len}")
        super().__init__(pairs, seq_len=seq_len, batch_size=batch_size, seed=seed, pad_id=pad_id,
                         host_id=host_id, num_hosts=num_hosts)
        self.pairs_per_row = pairs_per_row
        self.with_reference = has_reference(pairs)
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's shuffle of the pairs (kept for the current and the next epoch only)."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(len(self.items))
        return self._orders[epoch]

    def _upcoming(self) -> list[tuple[Side, Side]]:
        """Enough pairs from the cursor on to fill a batch (crossing into the next epoch's order if need be)."""
        out, epoch, cursor = [], self.epoch, self.cursor
        while len(out) < self.batch_size * self.pairs_per_row:
            if cursor == len(self.items):
                epoch, cursor = epoch + 1, 0
            order = self._order(epoch)
            take = order[cursor:cursor + self.batch_size * self.pairs_per_row - len(out)]
            out += [self.items[i] for i in take]
            cursor += len(take)
        return out

    def __next__(self) -> Batch:
        batch, placements = pack(self._upcoming(), self.seq_len, self.batch_size, self.pairs_per_row, self.pad_id,
                                 self.with_reference)
        for _ in placements:
            if self.cursor == len(self.items):
                self.epoch, self.cursor = self.epoch + 1, 0
            self.cursor += 1
        self._stats["pairs"] += len(placements)
        return self._mine(batch)


def eval_batches(pairs: list[tuple[Side, Side]], *, seq_len: int, batch_size: int, pairs_per_row: int,
                 pad_id: int = 0) -> list[Batch]:
    """Every pair once, in order, as full global batches (the last one padded: rows without slots weigh 0)."""
    out, done = [], 0
    while done < len(pairs):
        batch, placements = pack(pairs[done:], seq_len, batch_size, pairs_per_row, pad_id, has_reference(pairs))
        out.append(batch)
        done += len(placements)
    return out
