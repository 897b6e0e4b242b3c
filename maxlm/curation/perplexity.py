"""Model-based quality: each document's perplexity under a small reference language model.

CCNet (Wenzek et al. 2020) scores web text with a language model trained on Wikipedia and keeps the
low-perplexity part; InternLM2 and Baichuan-7B filter by model scores the same way. Here the scorer is
any maxlm checkpoint, through `maxlm.evaluate.loglikelihoods` (batched, length-bucketed, jitted): the first
`max_tokens` tokens of each document, [bos] + text, mean negative log-likelihood of every next token.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from maxlm import tokenizer as tokenizer_lib
from maxlm.model import scoring


def perplexities(config: ml_collections.ConfigDict, params: dict, tok, texts: Sequence[str], *, max_tokens: int,
                 batch_size: int) -> np.ndarray:
    """exp(mean next-token NLL) of each text's first `max_tokens` tokens ([bos] included). float64 [n]; a
    text with no tokens scores 1."""
    length = min(max_tokens, config.model.max_seq_len + 1)
    bodies = [tok.encode(t)[:length - 1] for t in texts]
    scored = [i for i, b in enumerate(bodies) if b]
    start = [tokenizer_lib.score_prefix_id(tok)]
    ll = scoring.loglikelihoods(config, params, [start] * len(scored), [bodies[i] for i in scored],
                                 batch_size=batch_size)
    out = np.ones(len(texts), np.float64)
    for i, value in zip(scored, ll):
        out[i] = np.exp(-value / len(bodies[i]))
    return out
