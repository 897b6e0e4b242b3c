"""Preference pairs for reward modelling: `{"prompt", "chosen", "rejected"[, "system"]}` jsonl, the built-in
pairs drawn from the task suite, and a batch iterator.

Each pair is rendered twice through the chat template -- the same (optional) system prompt and prompt, then
one reply each -- ending at the assistant's end marker (the template's separator after it is dropped, so a
reply sampled by PPO, which stops at the marker, is scored at the same token), where the reward model
reads its score (the last real token has attended to the whole exchange, as in InstructGPT's RM and
Hugging Face's `LlamaForSequenceClassification`).

The system prompt names the preference domain: COOL RLHF's *conditional reward prompts* (InternLM2, Cai et al.
2024, section 4.3.1) train one reward model on several, even conflicting, preferences (helpful vs. harmless
there; correct vs. brief here) and let the system prompt say which one applies.

Batches hold one pair per row, as [B, T] arrays only (so they take the same sharding as language-model
batches, rows over the data axes, tokens over the sequence axis): `chosen_inputs`, `chosen_segment_ids`
(1 on real tokens, 0 on padding), `chosen_last` (1.0 at the token whose hidden state gives the score), the
same three for `rejected`, and `positions`.
"""

from __future__ import annotations

import collections
import json
import random
import string
from typing import Any

import numpy as np

from maxlm.data import chat, tasks
from maxlm.data import sft as sft_data
from maxlm.data.packing import EpochIterator
from maxlm.data import records
from maxlm.errors import InputError

Batch = dict[str, np.ndarray]

PAIR_SKIP_REASONS = ("bad_utf8", "bad_json", "not_object", "bad_pair", "identical", "no_messages", "bad_message",
                     "unknown_role", "unknown_name", "bad_tool_call", "too_long")

# The built-in domains: name -> the system prompt that conditions the reward model on it.
DOMAINS = {
    "correct": "Prefer the reply that answers the request correctly.",
    "brief": "Prefer the shorter reply.",
}


def render_pair(template: chat.Template, tok: Any, prompt: str | list[dict], chosen: str, rejected: str,
                system: str = "", with_weights: bool = False) -> tuple:
    """Token ids of both conversations (system, prompt, reply), each ending with the assistant's end marker.

    `prompt` is a user message or a list of earlier messages (multi-turn). With `with_weights`, each side
    is (ids, weights): the template's training weights, 1 on the reply's tokens and its end marker (what DPO
    scores). Raises `chat.MessageError`.
    """
    history = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    head = ([{"role": "system", "content": system}] if system else []) + history
    stop = tok.encode(template.stop)
    out = []
    for reply in (chosen, rejected):
        messages = head + [{"role": "assistant", "content": reply}]
        chat.check_messages(template, messages)
        ids, weights = chat.render(template, tok, messages)
        ids = list(ids)
        n = len(ids)
        if len(stop) == 1 and stop[0] in ids:  # end at the marker, as a sampled reply does (no separator)
            n = len(ids) - ids[::-1].index(stop[0])
        ids = np.asarray(ids[:n], np.int32)
        out.append((ids, np.asarray(weights[:n], np.float32)) if with_weights else ids)
    return out[0], out[1]


class Pairs:
    """Rendered preference pairs plus the per-reason count of the records that were skipped.

    `max_tokens` bounds what one batch row holds: the longer side (the reward model reads each side in its own
    row) or, `with_weights` (DPO's view: both sides in one row, n - 1 input positions each), both together.
    """

    def __init__(self, template: chat.Template, tok: Any, max_tokens: int, with_weights: bool = False):
        self.template, self.tok, self.max_tokens = template, tok, max_tokens
        self.with_weights = with_weights  # items are ((ids, weights), (ids, weights)): DPO's view
        self.items: list[tuple] = []
        self.domains: list[str] = []
        self.skipped: collections.Counter = collections.Counter()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, record: Any, domain: str = "") -> bool:
        """Render one record; on a malformed one count the reason and return False."""
        if not isinstance(record, dict):
            self.skipped["not_object"] += 1
            return False
        prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
        system = record.get("system", "")
        prompt_ok = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt))
        if not (prompt_ok and isinstance(chosen, str) and isinstance(rejected, str) and isinstance(system, str)):
            self.skipped["bad_pair"] += 1
            return False
        if chosen == rejected:
            self.skipped["identical"] += 1
            return False
        try:
            pair = render_pair(self.template, self.tok, prompt, chosen, rejected, system, self.with_weights)
        except chat.MessageError as e:
            self.skipped[e.reason if e.reason in PAIR_SKIP_REASONS else "bad_message"] += 1
            return False
        size = sum(len(ids) - 1 for ids, _ in pair) if self.with_weights else max(len(pair[0]), len(pair[1]))
        if size > self.max_tokens:
            self.skipped["too_long"] += 1
            return False
        self.items.append(pair)
        self.domains.append(domain or record.get("domain", "") or system)
        return True

    def add_line(self, line: str) -> bool:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            self.skipped["bad_json"] += 1
            return False
        return self.add(record)

    def summary(self) -> str:
        skipped = records.reason_counts(self.skipped) or "none"
        return f"{len(self.items)} pairs; skipped: {skipped}"


def load_jsonl(pattern: str, pairs: Pairs, what: str = "reward.data_path") -> Pairs:
    """Add every line of the files matching `pattern` (sorted, so the order is deterministic); `what` names
    the setting in the error when nothing matches."""
    return sft_data.load_jsonl(pattern, pairs, what=what)


def shorter_reply(item: tasks.Item, rng: random.Random) -> str:
    """The correct reply with one letter (digit) dropped, or a format reply without its wrapper: shorter,
    hence wrong -- the very kind of mistake the ``correct`` domain rejects, so the two domains disagree on
    the same pairs and only the system prompt can tell which preference applies."""
    if item.task == "format":
        return " ".join(item.key.split(":")[2])
    if item.task == "add":
        i = rng.randrange(len(item.answer))
        return item.answer[:i] + item.answer[i + 1:]
    letters = item.answer.split(" ")
    del letters[rng.randrange(len(letters))]
    return " ".join(letters)


def plausible_mistake(item: tasks.Item, rng: random.Random) -> str:
    """A wrong reply for the `correct` domain: `tasks.wrong_answer` (a near-miss sum, swapped or dropped
    letters, a wrong wrapper) or, for the letter tasks, an inserted, replaced or doubled letter -- for sort,
    half of those re-sorted, so that order alone does not give them away. The wider the range of mistakes the
    reward model has seen, the fewer a policy can find that it scores as right: with only swaps and drops,
    PPO learned to add letters within ten iterations; without the re-sorted ones, a PPO policy's in-order
    replies with a wrong letter were scored above the right answer 14% of the time."""
    if item.task == "add" or rng.random() < 0.4:
        return tasks.wrong_answer(item, rng)
    letters = item.answer.split(" ")
    if item.task == "format":
        return tasks.wrong_answer(item, rng)
    i = rng.randrange(len(letters))
    kind = rng.choice(("insert", "replace", "double"))
    other = rng.choice([c for c in string.ascii_lowercase if c != letters[i]])
    if kind == "insert":
        letters.insert(rng.randrange(len(letters) + 1), other)
    elif kind == "replace":
        letters[i] = other
    else:
        letters.insert(i, letters[i])
    if item.task == "sort" and rng.random() < 0.5:
        letters.sort()  # still in order: only checking the letters against the prompt's catches it
    return " ".join(letters)


def task_pairs(task_names: tuple[str, ...], split: str, n: int, seed: int = 0,
               domains: tuple[str, ...] = ("correct",), conditional: bool = True) -> list[dict]:
    """Pair records from the `n` items per task of the built-in tasks (the hidden rule labels them).

    Every item gets a shorter wrong reply (`shorter_reply`) with probability 1/2, else another mistake
    (`plausible_mistake`), drawn from the item alone so both domains see the same pairs:

    * ``correct`` (one pair per item): the right answer beats the mistake.
    * ``brief`` (one pair per item with a shorter mistake): the shorter, wrong reply beats the right one --
      the exact opposite of ``correct`` on the same pairs, as many of them as ``correct`` has, so without
      the system prompt they are a coin toss and only a conditional reward model can learn both.

    With `conditional`, each record carries its domain's system prompt (`DOMAINS`); without, none do (the
    baseline a conditional reward model is compared against). Every record has its "domain" and "task".
    """
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown preference domain {unknown[0]!r}; expected one of {sorted(DOMAINS)}")
    records = []
    for task in task_names:
        for item in tasks.make_items(task, split, n, seed=seed):
            rng = random.Random(f"maxlm.preference|{seed}|{item.key}")
            shorter = rng.random() < 0.5
            mistake = shorter_reply(item, rng) if shorter else plausible_mistake(item, rng)
            if mistake == item.answer:
                continue
            pairs = {"correct": (item.answer, mistake)}
            if shorter:
                pairs["brief"] = (mistake, item.answer)
            for domain in domains:
                if domain in pairs:
                    chosen, rejected = pairs[domain]
                    records.append({"prompt": item.prompt, "chosen": chosen, "rejected": rejected,
                                    "system": DOMAINS[domain] if conditional else "", "domain": domain,
                                    "task": task})
    return records


class PairIterator(EpochIterator):
    """Infinite iterator of per-host batches of pairs, reshuffled every epoch; exact-resume state."""

    STATS = ("pairs",)

    def __init__(self, pairs: Pairs, *, seq_len: int, batch_size: int, seed: int, pad_id: int = 0,
                 host_id: int = 0, num_hosts: int = 1):
        if len(pairs) == 0:
            raise InputError(f"no usable preference pairs ({pairs.summary()})")
        longest = max(max(len(c), len(r)) for c, r in pairs.items)
        if longest > seq_len:
            raise ValueError(f"a pair has {longest} tokens, more than seq_len={seq_len}")
        super().__init__(pairs.items, seq_len=seq_len, batch_size=batch_size, seed=seed, pad_id=pad_id,
                         host_id=host_id, num_hosts=num_hosts)
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)

    def _next_pair(self) -> tuple[np.ndarray, np.ndarray]:
        if self.cursor == len(self.items):
            self.epoch, self.cursor = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.items))
            self._order_epoch = self.epoch
        pair = self.items[self._order[self.cursor]]
        self.cursor += 1
        self._stats["pairs"] += 1
        return pair

    def __next__(self) -> Batch:
        return self._mine(pair_batch([self._next_pair() for _ in range(self.batch_size)], self.seq_len,
                                     self.pad_id))


def pair_batch(pairs: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int = 0,
               rows: int | None = None) -> Batch:
    """Right-padded [rows, seq_len] arrays for `pairs` (rows beyond len(pairs) are all padding: weight 0)."""
    rows = len(pairs) if rows is None else rows
    out: Batch = {"positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()}
    for side in ("chosen", "rejected"):
        out[f"{side}_inputs"] = np.full((rows, seq_len), pad_id, np.int32)
        out[f"{side}_segment_ids"] = np.zeros((rows, seq_len), np.int32)
        out[f"{side}_last"] = np.zeros((rows, seq_len), np.float32)
    for row, pair in enumerate(pairs):
        for side, ids in zip(("chosen", "rejected"), pair):
            out[f"{side}_inputs"][row, :len(ids)] = ids
            out[f"{side}_segment_ids"][row, :len(ids)] = 1
            out[f"{side}_last"][row, len(ids) - 1] = 1.0
    return out
