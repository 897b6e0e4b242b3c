"""Supervised fine-tuning data: chat jsonl -> tokenized conversations -> packed rows with a loss mask.

Records come in the two common shapes:
  {"messages": [{"role": "system"|"user"|"assistant"|..., "content": "..."}, ...]}
  {"prompt": "...", "response": "...", "history": [["q1", "a1"], ...], "system": "..."}   (history optional)
the second being the multi-turn Chinese dialogue shape (e.g. BELLE, Firefly). A conversation longer than
the row is truncated from the left, dropping its oldest rounds and keeping system messages and the
newest turns. A record that cannot be used is counted under a reason and skipped (`SFT_SKIP_REASONS`).

Packing: whole conversations, in a per-epoch shuffled order, go first-fit into a window of `PACK_OPEN_ROWS`
open rows of T tokens (a conversation that fits none opens a new row; the oldest row is emitted when the
window is full). Compared with closing a row at the first conversation that does not fit (which wastes
~20% of the tokens as padding with chat-length conversations in 128-token rows), this leaves a few percent,
while the order stays a shuffle (best-fit packing, Ding et al. 2024, "Fewer truncations improve language
modeling"). Padding has segment id 0 and loss weight 0. A conversation is never split -- a reply's loss
needs its prompt in the same row.
Each conversation is its own segment (attention never crosses it) with positions restarting at 0, so a
packed row computes exactly what separate rows would (tested). The batch keys are the pretraining ones
(inputs, targets, positions, segment_ids, loss_weights), so the pretraining step trains on them unchanged:
the loss is the sum of the per-token cross-entropies of the assistant tokens of the whole global batch
divided by their number -- every supervised token weighs the same, whichever row or conversation it is in.

State is (epoch, cursor), the cursor counting the epoch's packed rows (the plan is recomputed from the seed
and epoch on resume): every host builds the same global batch and keeps its own rows, so the data of a run does not depend on the number of hosts, and a resumed run continues exactly.
"""

from __future__ import annotations

import glob
import json
from typing import Any

import numpy as np

from maxlm.data import chat
from maxlm.data.packing import EpochIterator
from maxlm.errors import InputError

Batch = dict[str, np.ndarray]
PACK_OPEN_ROWS = 16
SFT_SKIP_REASONS = ("bad_utf8", "bad_json", "not_object", "unknown_shape", "no_messages", "bad_message", "unknown_role",
                    "unknown_name", "bad_tool_call", "no_assistant", "template_error", "too_long")


def to_messages(record: Any, system_prompt: str = "") -> list[dict]:
    """Either record shape -> a message list (MessageError for anything else); `system_prompt` is
    prepended when the record has no system message of its own."""
    if not isinstance(record, dict):
        raise chat.MessageError("not_object", f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        history = record.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
            raise chat.MessageError("bad_message", "history must be a list of [question, answer] pairs")
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        for q, a in [*history, (record["prompt"], record["response"])]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    else:
        raise chat.MessageError("unknown_shape", "expected a `messages` list or `prompt` and `response`")
    if system_prompt and isinstance(messages, list) and not any(
            isinstance(m, dict) and m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


class Conversations:
    """Tokenized, truncated conversations (ids, weights) plus the per-reason count of skipped records."""

    def __init__(self, template: chat.Template, tok: chat.TokenizerLike, max_tokens: int, system_prompt: str = ""):
        self.template, self.tok, self.max_tokens, self.system_prompt = template, tok, max_tokens, system_prompt
        self.items: list[tuple[np.ndarray, np.ndarray]] = []
        self.skipped = dict.fromkeys(SFT_SKIP_REASONS, 0)
        self.truncated = 0

    def add(self, record: Any) -> bool:
        """Add one parsed record; False (and the reason counted) when it is skipped."""
        try:
            messages = to_messages(record, self.system_prompt)
            chat.check_messages(self.template, messages)
            ids, weights, dropped = chat.truncate_left(self.template, self.tok, messages, self.max_tokens)
        except chat.MessageError as e:
            self.skipped[e.reason] += 1
            return False
        self.truncated += int(dropped > 0)
        self.items.append((ids, weights))
        return True

    def add_line(self, line: str) -> bool:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            self.skipped["bad_json"] += 1
            return False
        return self.add(record)

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        skipped = {k: v for k, v in self.skipped.items() if v}
        return (f"{len(self)} conversations ({sum(len(i) for i, _ in self.items)} tokens, "
                f"{int(sum(w.sum() for _, w in self.items))} trained), {self.truncated} truncated from the "
                f"left, skipped {sum(skipped.values())}" + (f" {skipped}" if skipped else ""))


def load_jsonl(pattern: str, conversations: Any, what: str = "sft.data_path") -> Any:
    """Read every line of the files matching `pattern` (sorted; blank lines ignored) into `conversations`
    (or any collection with a `skipped` counter and `add_line(str)`, e.g. preference pairs); `what` names
    the setting in the error when nothing matches."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no files match {what}={pattern!r}")
    for path in files:
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    conversations.skipped["bad_utf8"] += 1
                    continue
                conversations.add_line(line)
    return conversations


def pack_first_fit(lengths: np.ndarray, capacity: int, open_rows: int = PACK_OPEN_ROWS) -> list[list[int]]:
    """Rows of indices into `lengths` (each row's lengths sum to <= capacity), first-fit into a window of
    `open_rows` open rows, rows emitted oldest first (see the module docstring)."""
    window: list[list] = []  # [space left, indices]
    rows: list[list[int]] = []
    for i, n in enumerate(lengths.tolist()):
        for row in window:
            if row[0] >= n:
                row[0] -= n
                row[1].append(i)
                break
        else:
            window.append([capacity - n, [i]])
            if len(window) > open_rows:
                rows.append(window.pop(0)[1])
    return rows + [row[1] for row in window]


class SFTIterator(EpochIterator):
    """Infinite iterator of packed per-host batches (see the module docstring) over `conversations`."""

    STATS = ("conversations", "tokens", "trained_tokens", "padding")

    def __init__(self, conversations: Conversations, *, seq_len: int, batch_size: int, seed: int, pad_id: int = 0,
                 host_id: int = 0, num_hosts: int = 1):
        if len(conversations) == 0:
            raise InputError(f"no usable conversations ({conversations.summary()})")
        too_long = [len(ids) for ids, _ in conversations.items if len(ids) - 1 > seq_len]
        if too_long:
            raise ValueError(f"{len(too_long)} conversations exceed seq_len={seq_len} + 1 tokens")
        super().__init__(conversations.items, seq_len=seq_len, batch_size=batch_size, seed=seed, pad_id=pad_id,
                         host_id=host_id, num_hosts=num_hosts)
        self._lengths = np.asarray([len(ids) - 1 for ids, _ in self.items])
        self._plan_epoch, self._rows_plan = -1, []

    def _plan(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.items))
        return [[int(order[i]) for i in row] for row in pack_first_fit(self._lengths[order], self.seq_len)]

    def _next_row(self) -> list[int]:
        if self._plan_epoch != self.epoch:
            self._rows_plan, self._plan_epoch = self._plan(self.epoch), self.epoch
        if self.cursor == len(self._rows_plan):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._rows_plan, self._plan_epoch = self._plan(self.epoch), self.epoch
        self.cursor += 1
        return self._rows_plan[self.cursor - 1]

    def __next__(self) -> Batch:
        b, t = self.batch_size, self.seq_len
        out = {k: np.zeros((b, t), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
        out["inputs"][:] = self.pad_id
        out["targets"][:] = self.pad_id
        out["loss_weights"] = np.zeros((b, t), np.float32)
        for row in range(b):
            filled = 0
            for segment, index in enumerate(self._next_row(), start=1):
                ids, weights = self.items[index]
                n = len(ids) - 1  # (input, target) pairs
                span = slice(filled, filled + n)
                out["inputs"][row, span], out["targets"][row, span] = ids[:-1], ids[1:]
                out["loss_weights"][row, span] = weights[1:]
                out["positions"][row, span] = np.arange(n)
                out["segment_ids"][row, span] = segment
                filled += n
                self._stats["conversations"] += 1
                self._stats["trained_tokens"] += int(weights[1:].sum())
            self._stats["tokens"] += filled
            self._stats["padding"] += t - filled
        return self._mine(out)
