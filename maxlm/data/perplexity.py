"""Model-based quality: each document's perplexity under a small reference language model.

CCNet (Wenzek et al. 2020) scores web text with a language model trained on Wikipedia and keeps the
low-perplexity part; InternLM2 and Baichuan-7B filter by model scores the same way. Here the scorer is
any maxlm checkpoint, run through the jitted model in fixed-shape batches (one compilation): the first
`max_tokens` tokens of each document, [bos] + text, mean negative log-likelihood of every next token.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxlm import model


def _nll_fn(config: ml_collections.ConfigDict):
    @jax.jit
    def nll(params: dict, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens [B,T], mask [B,T] (1 where tokens[:, t] is real) -> mean next-token NLL per row [B]."""
        logits = model.apply(config, params, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        weight = mask[:, 1:].astype(jnp.float32)
        return -(target * weight).sum(-1) / jnp.maximum(weight.sum(-1), 1.0)

    return nll


def perplexities(config: ml_collections.ConfigDict, params: dict, tok, texts: Sequence[str], *, max_tokens: int,
                 batch_size: int) -> np.ndarray:
    """exp(mean next-token NLL) of each text's first `max_tokens` tokens ([bos] included). float64 [n]."""
    length = min(max_tokens, config.model.max_seq_len + 1)
    nll = _nll_fn(config)
    out = np.zeros(len(texts), np.float64)
    for lo in range(0, len(texts), batch_size):
        rows = [[tok.bos_id] + tok.encode(t)[:length - 1] for t in texts[lo:lo + batch_size]]
        tokens = np.full((batch_size, length), tok.pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for r, ids in enumerate(rows):
            tokens[r, :len(ids)], mask[r, :len(ids)] = ids, 1
        out[lo:lo + len(rows)] = np.exp(np.asarray(nll(params, tokens, mask))[:len(rows)])
    return out
