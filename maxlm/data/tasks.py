"""Synthetic instruction tasks with programmatic checkers: an offline benchmark for SFT (and reward models).

Why: to show that supervised fine-tuning works we need tasks whose answers a base model does not produce
but a fine-tuned one does, and that a program can grade exactly -- no network, no downloaded data set, no
judge model. Four tasks of rising difficulty (`TASKS`):

* ``format``  -- wrap 3-6 spaced letters in a requested format: ``[b a v]``, ``"b a v"``,
  ``{"answer": "b a v"}``, ``Answer: b a v`` or ``b a v b a v`` (copying plus a wrapper: the easiest).
  Letters are spaced as in the other letter tasks, so the copy is token for token: a random unspaced
  string would be cut into different BPE pieces in the prompt and in the reply.
* ``reverse`` -- reverse 3-6 letters written with spaces (``p l a n e t`` -> ``t e n a l p``), so a BPE
  tokenizer sees one token per letter.
* ``sort``    -- sort 3-6 distinct spaced letters alphabetically. Distinct, because repeated letters are a
  different and much harder skill for a small model (measured on the 1M-parameter tiny model after full
  SFT: 43% of the items with a repeated letter wrong, 6% of the others).
* ``add``     -- add two integers in [10, 999].

Every item is phrased in English or Chinese (about half each) with one of a few phrasings. Train and eval
are disjoint by construction: an input's canonical ``key`` (independent of language and phrasing) belongs to
the eval split iff a stable CRC32 of (seed, key) falls in a fixed 10% bucket. Each split is drawn from its
own seeded RNG, so the eval set never depends on the train size (a smaller request is a prefix of a larger
one) and vice versa. `wrong_answer` makes plausible mistakes, for building preference pairs.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
import zlib

# The built-in tasks (`sft.tasks`, `reward.tasks`, `ppo.tasks`), in order of rising difficulty.
TASKS = ("format", "reverse", "sort", "add")
SFT_TASKS = TASKS
SPLITS = ("train", "eval")
EVAL_PERCENT = 10  # share of the key space reserved for the eval split

# variant -> (render, English instruction, Chinese instruction)
_FORMATS = {
    "bracket": (lambda w: f"[{w}]", "Wrap the word in square brackets", "用方括号把这个词括起来"),
    "quote": (lambda w: f'"{w}"', "Wrap the word in double quotes", "用英文双引号把这个词括起来"),
    "json": (lambda w: json.dumps({"answer": w}), 'Reply with JSON of the form {"answer": <word>}',
             '用JSON格式回答，形如 {"answer": <词>}'),
    "prefix": (lambda w: f"Answer: {w}", 'Reply with "Answer: " followed by the word',
               '以"Answer: "开头，后面接这个词'),
    "twice": (lambda w: f"{w} {w}", "Repeat the word twice, separated by a space",
              "把这个词重复两遍，中间用一个空格隔开"),
}

_PROMPTS = {
    "format": {
        "en": ["{desc}: {x}", "The word is {x}. {desc}.", "Word: {x}\n{desc}."],
        "zh": ["{desc}：{x}", "词语是 {x}。请{desc}。", "词语：{x}\n{desc}。"],
    },
    "reverse": {
        "en": ["Reverse the letters: {x}", "Write these letters in reverse order: {x}",
               "Letters: {x}\nWrite them backwards."],
        "zh": ["请把下列字母倒序排列：{x}", "将这些字母反过来写：{x}", "字母：{x}\n请按相反的顺序写出。"],
    },
    "sort": {
        "en": ["Sort the letters alphabetically: {x}", "Put these letters in alphabetical order: {x}",
               "Letters: {x}\nSort them from a to z."],
        "zh": ["请把下列字母按字母表顺序排列：{x}", "将这些字母从a到z排序：{x}", "字母：{x}\n请按字母顺序排好。"],
    },
    "add": {
        "en": ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}. Reply with the number only."],
        "zh": ["{a} + {b} 等于多少？", "请计算 {a} + {b}。", "把 {a} 和 {b} 相加，只回答数字。"],
    },
}


@dataclasses.dataclass(frozen=True)
class Item:
    task: str    # one of SFT_TASKS
    lang: str    # "en" | "zh"
    prompt: str  # the user message
    answer: str  # the exact expected assistant reply
    key: str     # canonical input, e.g. "reverse:planet", independent of language and phrasing


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _draw(task: str, rng: random.Random) -> tuple[str, str, dict]:
    """One random input: (key, answer, fields for the prompt template)."""
    if task == "format":
        variant, letters = rng.choice(sorted(_FORMATS)), _letters(rng, 3, 6)
        word = " ".join(letters)
        return f"format:{variant}:{letters}", _FORMATS[variant][0](word), {"x": word, "variant": variant}
    if task in ("reverse", "sort"):
        letters = _letters(rng, 3, 6) if task == "reverse" else "".join(rng.sample(string.ascii_lowercase,
                                                                                   rng.randint(3, 6)))
        out = letters[::-1] if task == "reverse" else "".join(sorted(letters))
        return f"{task}:{letters}", " ".join(out), {"x": " ".join(letters)}
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f"add:{a}+{b}", str(a + b), {"a": a, "b": b}


def split_of(key: str, seed: int = 0) -> str:
    """The split an input key belongs to: a stable hash, so it never depends on sizes or draw order."""
    return "eval" if zlib.crc32(f"{seed}|{key}".encode()) % 100 < EVAL_PERCENT else "train"


def make_items(task: str, split: str, n: int, seed: int = 0) -> list[Item]:
    """`n` distinct-key items of `task` from `split`, deterministic in (task, split, n, seed)."""
    if task not in SFT_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {SFT_TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"maxlm.tasks|{task}|{split}|{seed}")
    items: list[Item] = []
    seen: set[str] = set()
    for _ in range(1000 * n + 10_000):
        key, answer, fields = _draw(task, rng)
        if key in seen or split_of(key, seed) != split:
            continue
        seen.add(key)
        lang = "zh" if rng.random() < 0.5 else "en"
        if task == "format":
            fields["desc"] = _FORMATS[fields["variant"]][1 if lang == "en" else 2]
        prompt = rng.choice(_PROMPTS[task][lang]).format(**fields)
        items.append(Item(task=task, lang=lang, prompt=prompt, answer=answer, key=key))
        if len(items) == n:
            return items
    raise ValueError(f"could not draw {n} distinct {split} items for task {task!r}")


def check(item: Item, response: str) -> bool:
    """Exact match, ignoring leading/trailing whitespace of the response."""
    return response.strip() == item.answer


def wrong_answer(item: Item, rng: random.Random) -> str:
    """A plausible but incorrect reply: a near-miss sum, a misordered or shortened sequence, a wrong wrapper."""
    if item.task == "add":
        return str(int(item.answer) + rng.choice((-10, -2, -1, 1, 2, 10)))
    if item.task == "format":
        _, variant, letters = item.key.split(":")
        word = " ".join(letters)
        others = [_FORMATS[v][0](word) for v in sorted(_FORMATS) if v != variant]
        return rng.choice(others + [word])
    letters = item.answer.split(" ")
    swaps = [i for i in range(len(letters) - 1) if letters[i] != letters[i + 1]]
    if swaps and rng.random() < 0.5:
        i = rng.choice(swaps)
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
    else:
        del letters[rng.randrange(len(letters))]
    return " ".join(letters)


def messages(item: Item, system_prompt: str = "", with_answer: bool = True) -> list[dict]:
    """Chat messages: optional system prompt, the user prompt, and (optionally) the expected reply."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": item.prompt})
    if with_answer:
        msgs.append({"role": "assistant", "content": item.answer})
    return msgs


def write_jsonl(path: str, items: list[Item], system_prompt: str = "") -> None:
    """One {"messages", "task", "lang"} JSON object per line, UTF-8 with Chinese left unescaped."""
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            row = {"messages": messages(item, system_prompt), "task": item.task, "lang": item.lang}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
