"""Log-likelihood scoring with the decoder: `loglikelihoods(config, params, contexts,
continuations)` (batched, length-bucketed, jitted) and sliding-window perplexity."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxlm import tokenizer as tokenizer_lib
from maxlm.model import decoder as model
from maxlm.model import sampler as sample


SCORE_BATCH = 32


@functools.lru_cache(maxsize=8)
def _continuation_logprob_fn(config: ml_collections.FrozenConfigDict):
    @jax.jit
    def fn(params: dict, tokens: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens [B, L] right-padded, weights [B, L] 1 on continuation tokens -> (sum of their log-probs [B],
        whether each of them is the argmax [B])."""
        logits = model.apply(config, params, tokens[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        argmax = jnp.argmax(logits, axis=-1) == tokens[:, 1:]
        greedy = jnp.all(argmax | (weights[:, 1:] == 0), axis=-1)
        return jnp.sum(picked * weights[:, 1:], axis=-1), greedy

    return fn


def loglikelihoods(config: ml_collections.ConfigDict, params: dict, contexts: Sequence[Sequence[int]],
                   continuations: Sequence[Sequence[int]], *, batch_size: int = SCORE_BATCH,
                   with_greedy: bool = False) -> list[float] | list[tuple[float, bool]]:
    """sum_i log p(continuation_i | context, continuation_<i) for each (context, continuation) of token ids;
    with `with_greedy`, (that sum, whether every continuation token is the argmax) -- lm-evaluation-harness's
    `is_greedy`, which its exact-match log-likelihood tasks (LAMBADA) count.

    The quantity lm-evaluation-harness's `loglikelihood` requests compute. Rows are context + continuation,
    right-padded (causal attention: padding after a token never changes it) to a length bucket so only a few
    shapes compile, and sorted by length so a batch wastes little padding. A row longer than the model's
    context keeps its last `max_seq_len + 1` tokens (the continuation whole; the context cut from the left).
    Every context must hold at least one token (prepend bos for an unconditional score).
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    limit = config.model.max_seq_len + 1
    rows, scored = [], []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        if not ctx:
            raise ValueError(f"pair {i}: empty context (prepend bos for an unconditional score)")
        if not cont:
            raise ValueError(f"pair {i}: empty continuation")
        if len(cont) >= limit:
            raise ValueError(f"pair {i}: continuation of {len(cont)} tokens does not fit model.max_seq_len="
                             f"{config.model.max_seq_len} with a context token")
        row = (list(ctx) + list(cont))[-limit:]
        rows.append(row)
        scored.append(len(cont))
    fn = _continuation_logprob_fn(ml_collections.FrozenConfigDict(config))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        length = min(sample.bucket_length(max(len(rows[i]) for i in chunk)), limit)
        tokens = np.zeros((batch_size, length), np.int32)
        weights = np.zeros((batch_size, length), np.float32)
        for r, i in enumerate(chunk):
            tokens[r, :len(rows[i])] = rows[i]
            weights[r, len(rows[i]) - scored[i]:len(rows[i])] = 1.0
        sums, greedy = (np.asarray(x) for x in fn(params, tokens, weights))
        for r, i in enumerate(chunk):
            out[i] = (float(sums[r]), bool(greedy[r])) if with_greedy else float(sums[r])
    return out


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, score_from, end) windows over tokens 0..n-1 that score every token 1..n-1 exactly once: each
    window sees up to `window` tokens and scores those the previous window did not (Hugging Face's
    "perplexity of fixed-length models" recipe), so every scored token has at least window - stride tokens
    of context once the first window is passed."""
    if not 0 < stride <= window - 1:
        raise ValueError(f"stride must be in [1, window - 1] (window {window}), got {stride}")
    out, scored = [], 1
    for end in range(min(window, n), n + stride, stride):
        end = min(end, n)
        if end <= scored:
            break
        out.append((max(0, end - window), scored, end))
        scored = end
    return out


def perplexity(config: ml_collections.ConfigDict, params: dict, tok: tokenizer_lib.Tokenizer, texts: Sequence[str], *,
               window: int = 0, stride: int = 0) -> dict:
    """Token-level perplexity and bits per byte of `texts` (each text's tokens scored after
    `tokenizer.score_prefix_id`: bos, or eos for a tokenizer without one -- lm-evaluation-harness's
    `loglikelihood_rolling`; every token scored once, with sliding windows of `window` tokens moved by
    `stride` for texts longer than the model's context). Bits per byte = total negative log-likelihood / ln 2 / UTF-8 bytes: comparable across
    tokenizers, unlike token perplexity."""
    window = window or config.model.max_seq_len + 1
    stride = stride or window // 2
    contexts, continuations, per_text = [], [], []
    for text in texts:
        ids = [tokenizer_lib.score_prefix_id(tok)] + tok.encode(text)
        spans = sliding_windows(len(ids), window, stride)
        per_text.append(len(spans))
        for begin, scored, end in spans:
            contexts.append(ids[begin:scored])
            continuations.append(ids[scored:end])
    ll = loglikelihoods(config, params, contexts, continuations)
    rows, k = [], 0
    for text, m in zip(texts, per_text):
        total, tokens = sum(ll[k:k + m]), sum(len(c) for c in continuations[k:k + m])
        rows.append({"nll": -total, "tokens": tokens, "bytes": len(text.encode("utf-8"))})
        k += m
    nll, tokens, nbytes = (sum(r[key] for r in rows) for key in ("nll", "tokens", "bytes"))
    return {"task": "ppl", "ppl": float(np.exp(nll / max(tokens, 1))), "bits_per_byte": nll / np.log(2) / max(nbytes, 1),
            "tokens": tokens, "bytes": nbytes, "n": len(rows), "window": window, "stride": stride, "items": rows}
