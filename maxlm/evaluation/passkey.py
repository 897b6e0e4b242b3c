"""Passkey retrieval ("needle in a haystack"): can the model find a number hidden in long filler text?

The test of Mohtashami & Jaggi (2023, landmark attention), used by the position-interpolation and YaRN
papers and by InternLM2's long-context evaluation: a random 5-digit pass key is stated once, at a chosen
relative depth of a prompt of a chosen length in tokens, inside repetitive filler; the prompt ends by asking
for it. The model continues greedily (KV-cache sampler) and is right when the first number of its answer is
the key. Accuracy over `trials` keys per (length, depth) cell makes a grid, drawn as a heat map.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from maxlm import tokenizer as tokenizer_lib

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is an important piece of information hidden in a lot of irrelevant text. Find it and memorize it.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def build(tok: Any, length: int, depth: float, key: int) -> list[int]:
    """[bos] + INTRO + filler with the needle at `depth` (0: first, 1: last) + QUESTION, `length` tokens or
    a few fewer (whole filler sentences only)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = tokenizer_lib.text_prefix(tok) + tok.encode(INTRO)
    needle, question, unit = tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION), tok.encode(FILLER)
    room = length - len(head) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"length {length} is too short for the needle and question ({length - room} tokens)")
    units = room // len(unit)
    before = int(round(units * depth))
    return head + unit * before + needle + unit * (units - before) + question


def first_number(text: str) -> str:
    digits, started = [], False
    for ch in text:
        if ch.isdigit():
            digits.append(ch)
            started = True
        elif started:
            break
    return "".join(digits)


def grid(generate: Callable[[list[list[int]]], list[str]], tok: Any, lengths: Sequence[int], depths: Sequence[float],
         trials: int = 5, seed: int = 0) -> dict:
    """Accuracy [len(lengths), len(depths)] and every trial; `generate(prompts) -> continuations`."""
    rng = random.Random(seed)
    acc = np.zeros((len(lengths), len(depths)))
    rows = []
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            keys = [rng.randint(10000, 99999) for _ in range(trials)]
            outs = generate([build(tok, length, depth, k) for k in keys])
            hits = [first_number(o) == str(k) for o, k in zip(outs, keys)]
            acc[i, j] = float(np.mean(hits))
            rows += [{"length": length, "depth": depth, "key": k, "answer": o, "correct": h}
                     for k, o, h in zip(keys, outs, hits)]
    return {"task": "passkey", "lengths": list(lengths), "depths": list(depths), "accuracy": acc.tolist(),
            "mean": float(acc.mean()), "items": rows}


def heat_map(result: dict, path: str, title: str = "passkey retrieval") -> None:
    """Accuracy by context length (rows) and needle depth (columns) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.array(result["accuracy"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * acc.shape[1], 1.0 + 0.5 * acc.shape[0]))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(acc.shape[1]), [f"{d:.0%}" for d in result["depths"]])
    ax.set_yticks(range(acc.shape[0]), [str(n) for n in result["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    for (i, j), v in np.ndenumerate(acc):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
