"""Autoregressive sampling from a maxlm decoder: batched, KV-cached, one compiled program per shape bucket.

    python -m maxlm.sample --workdir=runs/tiny --prompt="Once upon a time" --prompt="The capital of"

Design choices, and why:

* **The KV cache is an explicit pytree** (`model.init_cache`: k/v [L,B,S,K,H], per-slot segment ids [B,S],
  the next slot index). It is threaded through `model.decode` as an ordinary value, so prefill and the whole
  decode loop are pure functions of (params, tokens, rng) that `jax.jit` compiles into one XLA program; the
  loop is a `lax.while_loop` that writes one token per step into the cache and stops as soon as every row
  has produced `eos_id` (or after `max_new_tokens`). No mutable Flax collections, no Python loop per token.

* **Left padding + segment ids.** Prompts of different lengths are left-padded to a common length P, so the
  last prompt token of every row sits in slot P-1 and every row's i-th new token goes to the same slot P+i:
  one cache index for the whole batch, no gathers. Pad slots carry segment id 0, which the attention mask
  (kernels/reference.py) never attends to; real tokens carry segment id 1. Positions count real tokens only
  (0 .. len-1 for the prompt, then len, len+1, ...), so RoPE sees exactly what an unpadded run of that prompt
  would see and each row's output is independent of its neighbours (tested).

* **Shape buckets.** P is rounded up to a bucket (powers of two from 16 to 256, then multiples of 256) so
  that prompts of slightly different lengths reuse one compiled program. The cache holds
  P + max_new_tokens slots; the real context (longest prompt + max_new_tokens) must fit
  `config.model.max_seq_len`, else a ValueError says so (P is clamped so bucketing never causes that error).
  Sampling hyper-parameters are traced scalars, so changing their values does not recompile either.

* **Logits processors in Hugging Face's order** (`process_logits`, a pure function tested on its own):
  repetition penalty (Keskar et al. 2019, CTRL: a logit of a token already present in prompt + generated
  text is divided by the penalty if positive, multiplied by it if negative), temperature, top-k (ties with
  the k-th value are kept, as in HF), top-p / nucleus (Holtzman et al. 2020: keep the smallest set of most
  likely tokens whose probability reaches p; the most likely token is always kept), then a categorical
  draw. Greedy decoding is argmax after the repetition penalty only, as HF's `do_sample=False`.
  Two deliberate differences from HF: the penalty ignores pad slots (HF penalises the pad id as if it
  were text in left-padded batches), and top-p keeps every token tied with the cut-off logit.

* **EOS.** Generation of a row stops at `eos_id`; the returned tokens *exclude* it (HF includes it). A row
  shorter than `max_new_tokens` therefore means "stopped at eos".
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxlm.errors import UserError
from maxlm.model import decoder as model


class SampleError(UserError):
    """A user mistake in a generation request (empty prompt, context too long, bad hyper-parameter)."""


# ----------------------------------------------------------------------------------------------------------
# Logits processing


def process_logits(logits: jax.Array, seen: jax.Array | None = None, *, temperature: Any = 1.0, top_k: Any = 0,
                   top_p: Any = 1.0, repetition_penalty: Any = 1.0) -> jax.Array:
    """Hugging Face's sampling pipeline on logits [B,V] -> float32 logits [B,V], removed tokens at -inf.

    seen: bool [B,V], True for tokens already in the row's prompt or output (for the repetition penalty).
    Order: repetition penalty, temperature, top-k, top-p. The hyper-parameters may be Python numbers,
    traced scalars, or one value per row [B] (a continuous batch mixes requests with their own settings);
    `top_k <= 0` and `top_p >= 1` disable their filter, penalty 1 and temperature 1 are exact identities.
    Drawing from `jax.random.categorical` on the result samples the filtered distribution.
    """
    logits = logits.astype(jnp.float32)
    per_row = lambda x: x[..., None] if isinstance(x, jax.Array) and x.ndim == 1 else x  # noqa: E731
    temperature, top_k, top_p, repetition_penalty = map(per_row, (temperature, top_k, top_p, repetition_penalty))
    if seen is not None and not (isinstance(repetition_penalty, (int, float)) and repetition_penalty == 1.0):
        penalty = jnp.asarray(repetition_penalty, jnp.float32)
        penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
        logits = jnp.where(seen, penalised, logits)
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):
        logits = logits / jnp.asarray(temperature, jnp.float32)

    use_top_k = not (isinstance(top_k, int) and top_k <= 0)
    use_top_p = not (isinstance(top_p, (int, float)) and top_p >= 1.0)
    if not (use_top_k or use_top_p):
        return logits
    vocab = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # [B,V], largest first
    if use_top_k:
        k = jnp.asarray(top_k, jnp.int32)
        index = jnp.broadcast_to(jnp.clip(k, 1, vocab) - 1, (*desc.shape[:-1], 1))
        kth = jnp.take_along_axis(desc, index, axis=-1)  # the k-th largest value
        keep = (k <= 0) | (logits >= kth)
        logits = jnp.where(keep, logits, -jnp.inf)
        desc = jnp.where((k <= 0) | (desc >= kth), desc, -jnp.inf)  # still sorted: top-k keeps a prefix
    if use_top_p:
        p = jnp.asarray(top_p, jnp.float32)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each sorted token
        # A sorted token survives iff the tokens above it have not yet reached p; the first always does.
        survive = (before < p) | (jnp.arange(vocab) == 0)
        cutoff = jnp.min(jnp.where(survive, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where((p >= 1.0) | (logits >= cutoff), logits, -jnp.inf)
    return logits


def _choose(rng: jax.Array, logits: jax.Array, seen: jax.Array, hp: dict, *, greedy: bool) -> jax.Array:
    processed = process_logits(logits, seen, **hp)
    if greedy:
        return jnp.argmax(processed, axis=-1)
    return jax.random.categorical(rng, processed, axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Padding and buckets


def bucket_length(n: int) -> int:
    """Round a prompt length up: 16, 32, ..., 256, then multiples of 256."""
    if n <= 256:
        return max(16, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // 256) * 256


def padded_length(longest: int, max_new_tokens: int, max_seq_len: int) -> int:
    """The prompt length P to pad to: the bucket of the longest prompt, clamped so P + max_new_tokens fits.

    Raises SampleError when even the unpadded context (longest + max_new_tokens) exceeds max_seq_len.
    """
    if longest + max_new_tokens > max_seq_len:
        raise SampleError(f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                          f"{longest + max_new_tokens} exceeds model.max_seq_len={max_seq_len}")
    return max(longest, min(bucket_length(longest), max_seq_len - max_new_tokens))


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts to `length` -> (tokens, positions, segment_ids), each int32 [B, length].

    Pad slots hold `pad_id`, position 0 and segment id 0; real tokens have positions 0..len-1, segment id 1.
    """
    b = len(prompts)
    tokens = np.full((b, length), pad_id, np.int32)
    positions = np.zeros((b, length), np.int32)
    segment_ids = np.zeros((b, length), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        if n > length:
            raise ValueError(f"prompt {i} has {n} tokens, more than the padded length {length}")
        if n:
            tokens[i, length - n:] = p
            positions[i, length - n:] = np.arange(n)
            segment_ids[i, length - n:] = 1
    return tokens, positions, segment_ids


# ----------------------------------------------------------------------------------------------------------
# The compiled program: prefill + decode loop


def _generate_padded(cfg: ml_collections.FrozenConfigDict, params: dict, tokens: jax.Array, positions: jax.Array,
                     segment_ids: jax.Array, rng: jax.Array, hp: dict, eos_id: jax.Array, pad_id: jax.Array, *,
                     max_new_tokens: int, greedy: bool) -> tuple[jax.Array, jax.Array]:
    """Left-padded prompts [B,P] -> (new tokens [B, max_new_tokens] (pad_id after eos), steps run).

    eos_id (-1: none) and pad_id are traced int32 scalars, like the sampling hyper-parameters in `hp`.
    """
    b, p = tokens.shape
    vocab = cfg.vocab_size
    rows = jnp.arange(b)
    cache = model.init_cache(cfg, b, p + max_new_tokens)
    logits, cache = model.decode(cfg, params, tokens, cache, positions=positions, segment_ids=segment_ids)
    seen = jnp.zeros((b, vocab), bool).at[rows[:, None], tokens].max(segment_ids > 0)
    state = dict(step=jnp.zeros((), jnp.int32), cache=cache, logits=logits[:, -1], seen=seen,
                 position=positions[:, -1] + 1, done=jnp.zeros((b,), bool),
                 out=jnp.full((b, max_new_tokens), pad_id, jnp.int32))

    def cond(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):
        step = s["step"]
        sampled = _choose(jax.random.fold_in(rng, step), s["logits"], s["seen"], hp, greedy=greedy).astype(jnp.int32)
        token = jnp.where(s["done"], pad_id, sampled)
        out = jax.lax.dynamic_update_slice(s["out"], token[:, None], (0, step))
        seen = s["seen"].at[rows, sampled].max(~s["done"])
        done = s["done"] | ((eos_id >= 0) & (sampled == eos_id))
        # Finished rows keep feeding their (valid) sampled token; their outputs are already pad_id.
        logits, cache = model.decode(cfg, params, sampled[:, None], s["cache"], positions=s["position"][:, None],
                                     segment_ids=jnp.ones((b, 1), jnp.int32))
        return dict(step=step + 1, cache=cache, logits=logits[:, -1], seen=seen, position=s["position"] + 1,
                    done=done, out=out)

    final = jax.lax.while_loop(cond, body, state)
    return final["out"], final["step"]


_generate_jit = jax.jit(_generate_padded, static_argnums=(0,), static_argnames=("max_new_tokens", "greedy"))


def check_request(config: ml_collections.ConfigDict, prompts: list[list[int]], *, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                  greedy: bool = False, eos_id: int | None = None) -> int:
    """Refuse a generation request `generate` cannot serve (SampleError naming what is wrong), before any
    work; returns the padded prompt length. Callers that print or load first call it up front."""
    cfg = ml_collections.FrozenConfigDict(model.model_config(config))
    if max_new_tokens < 1:
        raise SampleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise SampleError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise SampleError(f"prompt {i} is empty (prepend at least a bos token)")
        bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise SampleError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    if not greedy:
        if not temperature > 0:
            raise SampleError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
        if top_k < 0:
            raise SampleError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise SampleError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if not repetition_penalty > 0:
        raise SampleError(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise SampleError(f"eos_id must be None or in [0, {cfg.vocab_size}), got {eos_id}")
    return padded_length(max(len(p) for p in prompts), max_new_tokens, cfg.max_seq_len)


def generate(config: ml_collections.ConfigDict, params: dict, prompts: list[list[int]], *, max_new_tokens: int,
             rng: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, greedy: bool = False, eos_id: int | None = None,
             pad_id: int = 0) -> list[list[int]]:
    """Continue each prompt (a list of token ids, bos included if the model expects one); returns new tokens.

    Each returned list holds at most `max_new_tokens` ids and stops before `eos_id` (excluded). `rng` (a
    `jax.random.key`) drives sampling; None means `jax.random.key(0)`. It is ignored when `greedy`.
    `pad_id` fills the padding slots (never attended to) and is not part of any output. Raises ValueError for
    empty prompts, out-of-vocabulary ids, bad hyper-parameters, or a context longer than model.max_seq_len.
    """
    cfg = ml_collections.FrozenConfigDict(model.model_config(config))
    padded = check_request(config, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, repetition_penalty=repetition_penalty, greedy=greedy, eos_id=eos_id)

    # Pad slots are never attended to, but their embeddings must be finite: use a valid id for them.
    input_pad = pad_id if 0 <= pad_id < cfg.vocab_size else 0
    tokens, positions, segment_ids = left_pad(prompts, padded, input_pad)
    if rng is None:
        rng = jax.random.key(0)
    # Traced scalars: new values reuse the compiled program. A disabled filter is left out of the dict (a
    # different pytree, so its own program) and then costs nothing: no sort of the vocabulary per step.
    hp = dict(repetition_penalty=jnp.float32(repetition_penalty))
    if not greedy:  # greedy: only the penalty can change the argmax
        hp.update(temperature=jnp.float32(temperature))
        if top_k > 0:
            hp.update(top_k=jnp.int32(top_k))
        if top_p < 1.0:
            hp.update(top_p=jnp.float32(top_p))
    out, steps = _generate_jit(cfg, params, tokens, positions, segment_ids, rng, hp,
                               jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
                               max_new_tokens=max_new_tokens, greedy=bool(greedy))
    out = np.asarray(out)[:, :int(steps)]
    results = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        results.append(row)
    return results


def sample_padded(config: ml_collections.ConfigDict, params: dict, tokens: jax.Array, positions: jax.Array,
                  segment_ids: jax.Array, *, rng: jax.Array, max_new_tokens: int, temperature: float = 1.0,
                  eos_id: int | None = None, pad_id: int = 0) -> jax.Array:
    """Already left-padded prompts [B,P] (see `left_pad`) -> sampled tokens [B, max_new_tokens], each row's
    `eos_id` kept and `pad_id` after it: the fixed-shape form RL rollouts need (one compiled program per
    (B, P, max_new_tokens); nothing leaves the device). Plain sampling at `temperature`, no filters."""
    cfg = ml_collections.FrozenConfigDict(model.model_config(config))
    hp = dict(repetition_penalty=jnp.float32(1.0), temperature=jnp.float32(temperature))
    out, _ = _generate_jit(cfg, params, tokens, positions, segment_ids, rng, hp,
                           jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
                           max_new_tokens=max_new_tokens, greedy=False)
    return out


# ----------------------------------------------------------------------------------------------------------
# Command line
