"""The generation engine: continuous batching over a slot KV cache, with chunked prefill.

Used by `python -m maxlm.sample`, the generation evaluations, RL rollouts and `python -m maxlm.serve`:

    engine = Engine(config, params, slots=32, eos_id=tok.eos_id)
    done = engine.generate([prompt_ids, ...], SamplingParams(max_tokens=64, temperature=0.7, seed=1))

Why it is built this way:

* **Continuous batching** (Yu et al. 2022, "Orca: A Distributed Serving System for Transformer-Based
  Generative Models"). A static batch decodes until its longest reply ends, so each finished row keeps
  using a batch row until then. Here the cache has a fixed number of *slots*. A slot frees as soon as its
  request stops, and the next step refills it from the queue. Decoding runs in blocks of up to `block`
  steps on the device, in one `lax.while_loop`. A block ends early when a request finishes while others
  wait, so no slot stays empty for long.

* **A slot cache, one length per row.** k/v [L, slots, S, K, H], as in `model.init_cache(per_row=True)`.
  Each slot holds one request's tokens at slots 0 .. n-1 with no padding, so a token's cache slot is its
  position. The cache index is a vector: every row writes its next token at its own length. The
  attention mask compares slots per row (kernels/reference.py), so a slot never sees another request's
  leftovers. They sit after its own length, or carry segment id 0 once it is reset.

* **Chunked prefill** (Agrawal et al. 2023, "SARATHI: Efficient LLM Inference by Piggybacking Decodes with
  Chunked Prefills"). A prompt enters its slot in chunks of at most `chunk` tokens. One step runs at most
  `prefill_rows` rows' chunks, then a decode block. A long prompt therefore never stalls the requests
  already decoding. Prompt tokens and memory per step are bounded whatever the prompt length. Chunk
  lengths are rounded up to powers of two, so a few compiled programs serve every prompt.

* **Per-request sampling.** Each slot has its own temperature (0: greedy), top-k, top-p, repetition
  penalty, stop token ids, token budget and random key. They are arrays over slots, with the same logits
  pipeline as `model.sampler.process_logits` (Hugging Face's order). Request r's i-th token is drawn with
  `fold_in(key_r, i)`, so a seeded request gives the same text whatever else shares the batch. Stop
  strings need text, so the host checks them after each block, through the `detokenize` it was given.

* **Pure jitted programs; the state is donated.** `_prefill` and `_decode` map (state, inputs) to
  (state, outputs) with the state buffers donated, so the cache is updated in place. The Python loop
  (`step`) only schedules: it moves requests between the queue, the slots and the finished list.

* **Log-probabilities** are the model's own, `log_softmax(logits)` before any sampling processor. That is
  what vLLM and the OpenAI API report, and what RL's importance ratios need. With
  `SamplingParams.logprobs = n`, the `n` most likely alternatives come too, up to `Engine.top_logprobs`.

* **Sharded.** With a `mesh`, weights are placed by the rules table (tensor-parallel heads and MLP). The
  cache is sharded like the decoder's activations: slots over the data axes, kv heads over `tensor`.
  The same programs run under `sharding.activation_rules`.

The decode step uses the plain-jnp attention (`attention_impl="xla"`). One query token per row against
its row's cache is a matrix-vector product that a flash kernel does not speed up. Per-row cache offsets
are also something only the reference mask takes. Prefill chunks use the configured implementation.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

from maxlm.model import decoder as model
from maxlm.model import quant
from maxlm.model.sampler import SampleError, bucket_length, process_logits
from maxlm.training import sharding

MAX_STOP_IDS = 8  # stop token ids per request, eos included


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings (the OpenAI API's, plus Hugging Face's top-k and repetition penalty).

    temperature 0 means greedy: argmax after the repetition penalty, like HF's `do_sample=False`.
    `stop_token_ids` add to the engine's eos unless `ignore_eos`. `stop` strings end the reply at their
    first occurrence, which is cut from the text. `logprobs`: None for none; 0 for the sampled token's;
    n > 0 for it and the n most likely tokens at each step.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclasses.dataclass
class Request:
    """A request's progress, filled in by the engine. `tokens` excludes the stop token that ended it;
    `finish_reason` is "stop" (a stop token or string), "length" (max_tokens) or "cancelled"."""

    id: int
    prompt: list[int]
    params: SamplingParams
    on_update: Callable[["Request"], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    submitted: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    prefilled: int = 0  # prompt tokens already in the slot
    slot: int | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _host(tree: Any) -> Any:
    """Device arrays as numpy on this process: gathered from every process where a mesh spans several (each
    process runs the same host loop, so each needs every slot's tokens)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def bucket_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _key_data(seed: int) -> np.ndarray:
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the compiled programs depend on besides their arguments (hashable: a jit static argument)."""

    cfg: ml_collections.FrozenConfigDict
    decode_cfg: ml_collections.FrozenConfigDict  # attention_impl "xla" (see the module docstring)
    slots: int
    cache_len: int
    block: int


# ----------------------------------------------------------------------------------------------------------
# The two compiled programs: module functions of a hashable `_Static`, so engines of one shape share them

def _sample(logits: jax.Array, seen: jax.Array, slot: dict, count: jax.Array, top_n: int):
    """Per-row sampling: logits [R,V] -> (token [R], its log-prob [R], top-n (ids, log-probs) [R,n]).
    top_n -1: no request wants log-probs, so none are computed (zeros come back)."""
    filtered = (slot["top_k"] > 0) | (slot["top_p"] < 1.0)

    def process(top_k, top_p):
        return process_logits(logits, seen, temperature=slot["temperature"], top_k=top_k, top_p=top_p,
                              repetition_penalty=slot["penalty"])

    # The filters sort the vocabulary: skip that when no row asks for one.
    processed = jax.lax.cond(jnp.any(filtered), lambda: process(slot["top_k"], slot["top_p"]),
                             lambda: process(0, 1.0))
    greedy = jnp.argmax(processed, axis=-1)

    def draw():
        # Inverse-CDF sampling: one uniform per row against the cumulated probabilities. The same
        # distribution as the Gumbel-max `jax.random.categorical`, which draws a random number per vocabulary
        # entry: per-row keys made that the costliest part of a decode step here (7.1 vs 6.3 ms at 64 rows).
        keys = jax.vmap(lambda k, c: jax.random.fold_in(jax.random.wrap_key_data(k), c))(slot["key"], count)
        cdf = jnp.cumsum(jax.nn.softmax(processed.astype(jnp.float32), axis=-1), axis=-1)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, 1e-7, 1.0))(keys) * cdf[:, -1]
        drawn = jnp.minimum(jnp.sum(cdf < u[:, None], axis=-1), processed.shape[-1] - 1)
        return jnp.where(slot["greedy"], greedy, drawn)

    # Skip the draw when every row takes the argmax.
    token = jax.lax.cond(jnp.all(slot["greedy"]), lambda: greedy, draw).astype(jnp.int32)
    r = token.shape[0]
    if top_n < 0:
        return token, jnp.zeros((r,), jnp.float32), (jnp.zeros((r, 0), jnp.int32), jnp.zeros((r, 0)))
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    if top_n:
        top_lp, top_ids = jax.lax.top_k(logprobs, top_n)
    else:
        top_lp, top_ids = jnp.zeros((r, 0)), jnp.zeros((r, 0), jnp.int32)
    return token, chosen, (top_ids, top_lp)


def _prefill_fn(static: _Static, state: dict, params: dict, release: jax.Array, rows: jax.Array, tokens: jax.Array,
                starts: jax.Array, lengths: jax.Array, final: jax.Array, request: dict, *, top_n: int,
                kv_len: int):
    """Run one prompt chunk for each of R rows; rows whose chunk ends their prompt sample their first token.

    release [slots]: slots the host freed since the last program (a stop string, a cancellation), to be
    made inactive first. rows [R] (== slots for padding rows: dropped), tokens [R,C], starts/lengths [R]
    (the chunk's first slot and real tokens), final [R]; `request` holds the final rows' sampling
    settings, arrays [R,...]. Only the first `kv_len` cache slots (a multiple of the chunk covering every
    row's chunk) are read and written: a first chunk attends to its own slots, not the whole cache.
    """
    cfg = static.cfg
    r, c = tokens.shape
    state = {**state, "active": state["active"] & ~release}
    cache = state["cache"]
    first = starts == 0
    seg_rows = jnp.where(first[:, None], 0,
                         cache["segment_ids"][:, :kv_len].at[rows].get(mode="fill", fill_value=0))
    row_cache = {"k": cache["k"][:, :, :kv_len].at[:, rows].get(mode="fill", fill_value=0),
                 "v": cache["v"][:, :, :kv_len].at[:, rows].get(mode="fill", fill_value=0),
                 "segment_ids": seg_rows, "index": starts}
    real = jnp.arange(c)[None, :] < lengths[:, None]
    positions = starts[:, None] + jnp.arange(c)[None, :]
    logits, row_cache = model.decode(cfg, params, tokens, row_cache, positions=positions,
                                     segment_ids=real.astype(jnp.int32))
    last = jnp.take_along_axis(logits, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    seen = jnp.where(first[:, None], False, state["seen"].at[rows].get(mode="fill", fill_value=False))
    seen = seen.at[jnp.arange(r)[:, None], tokens].max(real)
    token, logprob, top = _sample(last, seen, request, jnp.zeros((r,), jnp.int32), top_n)
    seen = seen.at[jnp.arange(r), token].max(final)

    stop = jnp.any(request["stop_ids"] == token[:, None], axis=-1)
    finished = final & (stop | (request["max_tokens"] <= 1))
    new_len = starts + lengths

    def put(name, value, where=final):
        old = state[name].at[rows].get(mode="fill", fill_value=0)
        value = jnp.where(where.reshape(where.shape + (1,) * (old.ndim - 1)), value, old)
        return state[name].at[rows].set(value, mode="drop")

    new = dict(state)
    new["cache"] = {"k": cache["k"].at[:, rows, :kv_len].set(row_cache["k"], mode="drop"),
                    "v": cache["v"].at[:, rows, :kv_len].set(row_cache["v"], mode="drop"),
                    "segment_ids": cache["segment_ids"].at[rows, :kv_len].set(row_cache["segment_ids"],
                                                                              mode="drop"),
                    "index": cache["index"].at[rows].set(new_len, mode="drop")}
    new["seen"] = state["seen"].at[rows].set(seen, mode="drop")
    new["token"] = put("token", token)
    new["count"] = put("count", jnp.ones((r,), jnp.int32))
    new["active"] = put("active", final & ~finished)
    for name in ("max_tokens", "stop_ids", "temperature", "greedy", "top_k", "top_p", "penalty", "key"):
        new[name] = put(name, request[name])
    return new, {"token": token, "logprob": logprob, "top_ids": top[0], "top_logprobs": top[1],
                 "finished": finished}

def _decode_fn(static: _Static, state: dict, params: dict, release: jax.Array, max_steps: jax.Array,
               refill: jax.Array, *, top_n: int, attend_len: int):
    """Up to `max_steps` (<= block) decode steps for every active slot, in one while loop. The loop ends
    early once `refill` slots have finished (0: never; the host asks for as many as it can refill). Returns the state and per-step
    outputs [slots, block] (-1 where a slot emitted nothing) with the number of steps run. Attention reads
    the first `attend_len` cache slots only: a multiple of the chunk that covers every active row for the
    whole block (the host computes it from the rows' lengths)."""
    cfg = static.decode_cfg
    b, block, last_slot = static.slots, static.block, static.cache_len - 1
    rows = jnp.arange(b)
    out = {"token": jnp.full((b, block), -1, jnp.int32), "logprob": jnp.zeros((b, block), jnp.float32),
           "top_ids": jnp.zeros((b, block, max(top_n, 0)), jnp.int32),
           "top_logprobs": jnp.zeros((b, block, max(top_n, 0)), jnp.float32)}
    slot_params = {k: state[k] for k in ("max_tokens", "stop_ids", "temperature", "greedy", "top_k", "top_p",
                                         "penalty", "key")}
    carry = dict(step=jnp.zeros((), jnp.int32), n_done=jnp.zeros((), jnp.int32), out=out,
                 active=state["active"] & ~release,
                 **{k: state[k] for k in ("cache", "token", "count", "seen")})

    def cond(s):
        return (s["step"] < max_steps) & jnp.any(s["active"]) & ((refill == 0) | (s["n_done"] < refill))

    def body(s):
        active, cache = s["active"], s["cache"]
        # Inactive rows (free, or mid-prefill) write a masked token into their last slot, which no request
        # reaches: prompts and replies end before it (submit checks prompt + max_tokens <= max_len).
        index = jnp.where(active, cache["index"], last_slot)
        logits, new_cache = model.decode(cfg, params, s["token"][:, None], {**cache, "index": index},
                                         positions=index[:, None], segment_ids=active[:, None].astype(jnp.int32),
                                         attend_len=attend_len)
        token, logprob, top = _sample(logits[:, -1], s["seen"], slot_params, s["count"], top_n)
        stop = jnp.any(slot_params["stop_ids"] == token[:, None], axis=-1)
        count = s["count"] + active
        done = active & (stop | (count >= slot_params["max_tokens"]))
        step = s["step"]
        o = s["out"]
        o = {"token": o["token"].at[:, step].set(jnp.where(active, token, -1)),
             "logprob": o["logprob"].at[:, step].set(logprob),
             "top_ids": o["top_ids"].at[:, step].set(top[0]),
             "top_logprobs": o["top_logprobs"].at[:, step].set(top[1])}
        new_cache["index"] = jnp.where(active, cache["index"] + 1, cache["index"])
        return dict(step=step + 1, n_done=s["n_done"] + jnp.sum(done), out=o, active=active & ~done,
                    cache=new_cache, token=jnp.where(active, token, s["token"]), count=count,
                    seen=s["seen"].at[rows, token].max(active))

    final = jax.lax.while_loop(cond, body, carry)
    new = dict(state)
    new.update({k: final[k] for k in ("cache", "token", "count", "seen", "active")})
    return new, final["out"], final["step"]


def _prompt_logprobs_fn(cfg: ml_collections.FrozenConfigDict, params: dict, tokens: jax.Array, *, top_n: int):
    """tokens [1, L] -> log p(token_i | tokens_<i) for i >= 1 [1, L-1], and the top-n (ids, log-probs) there."""
    logprobs = jax.nn.log_softmax(model.apply(cfg, params, tokens[:, :-1]).astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, max(top_n, 1))
    return picked, top_ids[..., :top_n], top_lp[..., :top_n]


_prompt_logprobs = jax.jit(_prompt_logprobs_fn, static_argnums=0, static_argnames="top_n")
_prefill = jax.jit(_prefill_fn, static_argnums=0, donate_argnums=1, static_argnames=("top_n", "kv_len"))
_decode = jax.jit(_decode_fn, static_argnums=0, donate_argnums=1, static_argnames=("top_n", "attend_len"))


class Engine:
    """Continuous-batching generation over `slots` sequences of at most `max_len` tokens each.

    config/params: a maxlm model, with params in any float dtype (they are cast to the compute dtype).
    `eos_id` ends every reply unless a request sets `ignore_eos`. `detokenize(ids) -> str` enables text
    and stop strings. `top_logprobs` is the most alternatives a request may ask for. Not thread-safe
    except `submit`, `cancel` and `serve_forever`/`shutdown`, which the server uses from other threads.
    """

    def __init__(self, config: ml_collections.ConfigDict, params: dict, *, slots: int = 32,
                 max_len: int | None = None, chunk: int = 256, block: int = 16, prefill_rows: int = 8,
                 refill_at: int = 1, prefill_block: int = 1,
                 eos_id: int | None = None, detokenize: Callable[[list[int]], str] | None = None,
                 top_logprobs: int = 5, mesh: Mesh | None = None):
        m = model.model_config(config)
        max_len = max_len or m.max_seq_len
        for name, value, low in (("slots", slots, 1), ("max_len", max_len, 2), ("chunk", chunk, 1),
                                 ("block", block, 1), ("prefill_rows", prefill_rows, 1), ("refill_at", refill_at, 1),
                                 ("prefill_block", prefill_block, 1),
                                 ("top_logprobs", top_logprobs, 0)):
            if value < low:
                raise SampleError(f"engine {name} must be >= {low}, got {value}")
        if max_len > m.max_seq_len:
            raise SampleError(f"engine max_len={max_len} exceeds model.max_seq_len={m.max_seq_len}")
        if eos_id is not None and not 0 <= eos_id < m.vocab_size:
            raise SampleError(f"eos_id must be None or in [0, {m.vocab_size}), got {eos_id}")
        self.config, self.mesh = config, mesh
        self.slots, self.max_len, self.block, self.eos_id = slots, max_len, block, eos_id
        self.chunk = min(bucket_length(chunk), bucket_length(max_len))
        self.prefill_rows = min(prefill_rows, slots)
        self.refill_at, self.prefill_block = min(refill_at, slots), min(prefill_block, block)
        self.detokenize, self.top_logprobs = detokenize, top_logprobs
        # Whole chunks start at multiples of `chunk`, so a cache rounded up to one never clips a chunk.
        self.cache_len = -(-max_len // self.chunk) * self.chunk
        self.vocab = m.vocab_size
        self._cfg = ml_collections.FrozenConfigDict(m)
        decode_m = ml_collections.ConfigDict(m.to_dict())
        decode_m.attention_impl = "xla"
        self._decode_cfg = ml_collections.FrozenConfigDict(decode_m)
        self.update_params(params)
        # Built on the host and placed shard by shard: a mesh may span processes.
        self.state = self._place(jax.tree.map(np.asarray, self._empty_state()), params=False)
        self._static = _Static(self._cfg, self._decode_cfg, slots, self.cache_len, block)
        self.waiting: list[Request] = []
        self.prefilling: list[Request] = []
        self.running: dict[int, Request] = {}  # slot -> request
        self.free = list(range(slots))
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(0)
        self._lock = threading.Condition()
        self._release = np.zeros((slots,), bool)
        self._stopping = False
        self.steps = {"prefill": 0, "decode_blocks": 0, "decode_steps": 0, "prefill_s": 0.0, "decode_s": 0.0}

    # ------------------------------------------------------------------------------------------------------
    # Device state

    def _empty_state(self) -> dict:
        b, v = self.slots, self.vocab
        return {
            "cache": model.init_cache(self._cfg, b, self.cache_len, per_row=True),
            "token": jnp.zeros((b,), jnp.int32),       # the last sampled token, fed at the next step
            "active": jnp.zeros((b,), bool),
            "count": jnp.zeros((b,), jnp.int32),       # tokens sampled so far
            "max_tokens": jnp.zeros((b,), jnp.int32),
            "stop_ids": jnp.full((b, MAX_STOP_IDS), -1, jnp.int32),
            "temperature": jnp.ones((b,), jnp.float32),
            "greedy": jnp.zeros((b,), bool),
            "top_k": jnp.zeros((b,), jnp.int32),
            "top_p": jnp.ones((b,), jnp.float32),
            "penalty": jnp.ones((b,), jnp.float32),
            "key": jnp.zeros((b, 2), jnp.uint32),
            "seen": jnp.zeros((b, v), bool),
        }

    def _place(self, tree: Any, *, params: bool) -> Any:
        if self.mesh is None:
            return tree
        if params:
            logical = quant.quantized_axes(model.logical_axes(self.config), tree)
            return jax.device_put(tree, sharding.param_shardings(self.config, self.mesh, logical=logical))

        def spec(path, leaf):
            if jax.tree_util.keystr(path) in ("['cache']['k']", "['cache']['v']"):
                logical = PartitionSpec(None, "activation_batch", None, "activation_kv_heads", None)
            else:
                logical = PartitionSpec("activation_batch", *(None,) * (leaf.ndim - 1))
            return sharding.logical_to_sharding(logical, self.mesh, self.config)

        return jax.device_put(tree, jax.tree_util.tree_map_with_path(spec, tree))

    def _run(self, fn: Callable, *args, **kwargs):
        if self.mesh is None:
            return fn(*args, **kwargs)
        with sharding.activation_rules(self.config, self.mesh):
            return fn(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # Requests

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Refuse a request the engine cannot serve (SampleError naming the field), before queueing it."""
        if len(prompt) == 0:
            raise SampleError("the prompt is empty (prepend at least a bos token)")
        bad = [int(t) for t in prompt if not 0 <= int(t) < self.vocab]
        if bad:
            raise SampleError(f"the prompt has token ids outside [0, {self.vocab}): {bad[:5]}")
        if params.max_tokens < 1:
            raise SampleError(f"max_tokens must be >= 1, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > self.max_len:
            raise SampleError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
                              f"{len(prompt) + params.max_tokens} exceeds the context length {self.max_len}")
        if params.temperature < 0:
            raise SampleError(f"temperature must be >= 0 (0 is greedy), got {params.temperature}")
        if params.top_k < 0:
            raise SampleError(f"top_k must be >= 0 (0 disables it), got {params.top_k}")
        if not 0.0 < params.top_p <= 1.0:
            raise SampleError(f"top_p must be in (0, 1] (1 disables it), got {params.top_p}")
        if not params.repetition_penalty > 0:
            raise SampleError(f"repetition_penalty must be > 0 (1 disables it), got {params.repetition_penalty}")
        stop_ids = self._stop_ids(params)
        if len(stop_ids) > MAX_STOP_IDS:
            raise SampleError(f"at most {MAX_STOP_IDS} stop token ids (eos included), got {len(stop_ids)}")
        if any(not 0 <= t < self.vocab for t in stop_ids):
            raise SampleError(f"stop token ids must be in [0, {self.vocab}), got {list(stop_ids)}")
        if params.stop and self.detokenize is None:
            raise SampleError("stop strings need an engine with a tokenizer (detokenize=)")
        if any(not s for s in params.stop):
            raise SampleError("stop strings must be non-empty")
        if params.logprobs is not None and not 0 <= params.logprobs <= self.top_logprobs:
            raise SampleError(f"logprobs must be in [0, {self.top_logprobs}], got {params.logprobs}")

    def update_params(self, params: dict) -> None:
        """Generate with new weights from now on (an RL actor after its updates); same shapes, so no recompile."""
        dtype = jnp.dtype(self._cfg.compute_dtype)

        def cast(p: Any) -> Any:  # a quantised weight (`maxlm.model.quant`) keeps its integers; scales cast
            return p.astype(dtype) if quant.is_quantized(p) else jnp.asarray(p, dtype)

        self.params = self._place(jax.tree.map(cast, params, is_leaf=quant.is_quantized), params=True)

    def prompt_logprobs(self, prompt: Sequence[int], top_n: int = 0) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Each prompt token's log-prob given the tokens before it (from the second token on) and the `top_n`
        most likely tokens there: the OpenAI API's `echo` with `logprobs`, which lm-evaluation-harness's
        log-likelihood requests read. One forward pass over the prompt padded to a bucket (causal attention:
        padding after a token never changes it); thread-safe, so a server calls it beside the engine thread."""
        n = len(prompt)
        if n < 2:
            return [], []
        tokens = np.zeros((1, min(bucket_length(n), self.max_len) + 1), np.int32)
        tokens[0, :n] = prompt
        picked, ids, lps = _host(self._run(_prompt_logprobs, self._cfg, self.params, tokens, top_n=top_n))
        tops = [[(int(i), float(v)) for i, v in zip(ids[0, t], lps[0, t])] for t in range(n - 1)]
        return [float(x) for x in picked[0, :n - 1]], tops

    def _stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        eos = () if params.ignore_eos or self.eos_id is None else (self.eos_id,)
        return tuple(dict.fromkeys(eos + tuple(int(t) for t in params.stop_token_ids)))

    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), *,
               on_update: Callable[[Request], None] | None = None) -> Request:
        """Queue a request (checked first); `on_update(request)` runs in the engine's thread after each step
        that added tokens to it, and once more when it finishes."""
        self.check(prompt, params)
        with self._lock:
            request = Request(id=next(self._ids), prompt=[int(t) for t in prompt], params=params,
                              on_update=on_update, submitted=time.perf_counter())
            if self._stopping:
                raise SampleError("the engine is shutting down")
            self.waiting.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client that went away): it finishes with reason "cancelled" at the next step."""
        request.cancelled = True

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.running)

    # ------------------------------------------------------------------------------------------------------
    # The loop

    def step(self) -> None:
        """One scheduling step: admit waiting requests to free slots, run one batch of prefill chunks, then
        one decode block."""
        with self._lock:
            for req in [r for r in self.waiting + self.prefilling if r.cancelled]:
                (self.waiting if req in self.waiting else self.prefilling).remove(req)
                if req.slot is not None:
                    self._release[req.slot] = True
                    self.free.append(req.slot)
                self._finish(req, "cancelled")
            while self.free and self.waiting:
                req = self.waiting.pop(0)
                req.slot = self.free.pop(0)
                self.prefilling.append(req)
        for req in [r for r in self.running.values() if r.cancelled]:
            self._retire(req, "cancelled")
        if self.prefilling:
            self._prefill_step()
        if self.running:
            self._decode_step()

    def _take_release(self) -> np.ndarray:
        release = self._release.copy()
        self._release[:] = False
        return release

    def _request_arrays(self, batch: list[Request | None]) -> dict:
        def param(fn, dtype):
            return np.asarray([fn(r) for r in batch], dtype)

        stop = np.full((len(batch), MAX_STOP_IDS), -1, np.int32)
        keys = np.zeros((len(batch), 2), np.uint32)
        for i, r in enumerate(batch):
            if r is None:
                continue
            ids = self._stop_ids(r.params)
            stop[i, :len(ids)] = ids
            seed = r.params.seed if r.params.seed is not None else int(self._seeds.integers(2 ** 31))
            keys[i] = _key_data(seed)
        p = lambda r: r.params if r is not None else SamplingParams()  # noqa: E731
        return {"max_tokens": param(lambda r: p(r).max_tokens, np.int32), "stop_ids": stop,
                "temperature": param(lambda r: p(r).temperature or 1.0, np.float32),
                "greedy": param(lambda r: p(r).temperature == 0, bool),
                "top_k": param(lambda r: p(r).top_k, np.int32), "top_p": param(lambda r: p(r).top_p, np.float32),
                "penalty": param(lambda r: p(r).repetition_penalty, np.float32), "key": keys}

    def _top_n(self, requests) -> int:
        """The programs' static log-prob width: -1 none, 0 the sampled token's, else the engine's top n."""
        asked = [r.params.logprobs for r in requests if r.params.logprobs is not None]
        return -1 if not asked else (self.top_logprobs if any(asked) else 0)

    def _prefill_step(self) -> None:
        batch = self.prefilling[:self.prefill_rows]
        pieces = [r.prompt[r.prefilled:r.prefilled + self.chunk] for r in batch]
        width = bucket_length(max(len(p) for p in pieces))
        width = min(width, self.chunk)
        rows_n = min(bucket_pow2(len(batch)), self.prefill_rows)  # 1, 2, 4, ...: few compiled programs
        tokens = np.zeros((rows_n, width), np.int32)
        rows = np.full((rows_n,), self.slots, np.int32)  # out of range: padding rows are dropped
        starts = np.zeros((rows_n,), np.int32)
        lengths = np.zeros((rows_n,), np.int32)
        final = np.zeros((rows_n,), bool)
        for i, (req, piece) in enumerate(zip(batch, pieces)):
            tokens[i, :len(piece)] = piece
            rows[i], starts[i], lengths[i] = req.slot, req.prefilled, len(piece)
            final[i] = req.prefilled + len(piece) == len(req.prompt)
        request = self._request_arrays([r if final[i] else None for i, r in enumerate(batch)]
                                       + [None] * (rows_n - len(batch)))
        top_n = self._top_n(batch)
        start = time.perf_counter()
        self.state, out = self._run(_prefill, self._static, self.state, self.params, self._take_release(), rows, tokens,
                                    starts, lengths, final, request, top_n=top_n,
                                    kv_len=-(-int((starts + width).max()) // self.chunk) * self.chunk)
        out = _host(out)
        self.steps["prefill"] += 1
        self.steps["prefill_s"] += time.perf_counter() - start
        now = time.perf_counter()
        for i, req in enumerate(batch):
            req.prefilled += int(lengths[i])
            if not final[i]:
                continue
            self.prefilling.remove(req)
            req.first_token = now
            self.running[req.slot] = req
            self._emit(req, [(int(out["token"][i]), float(out["logprob"][i]), out["top_ids"][i],
                              out["top_logprobs"][i])], finished=bool(out["finished"][i]))

    def _decode_step(self) -> None:
        # End the block once enough slots free for the waiting requests (up to `refill_at` of them, so that
        # their prefill runs as one batch); while prompts are mid-prefill, interleave short blocks with it.
        refill = max(1, min(len(self.waiting), self.refill_at) - len(self.free)) if self.waiting else 0
        max_steps = self.prefill_block if self.prefilling or (self.waiting and self.free) else self.block
        top_n = self._top_n(self.running.values())
        # Covers every active row's next max_steps tokens. Inactive rows' queries have segment id 0 and see
        # nothing, so their masked writes to the last slot need not be inside it.
        longest = max(len(r.prompt) + len(r.tokens) for r in self.running.values()) + max_steps
        attend_len = min(-(-longest // self.chunk) * self.chunk, self.cache_len)
        start = time.perf_counter()
        self.state, out, steps = self._run(_decode, self._static, self.state, self.params, self._take_release(),
                                           np.int32(max_steps), np.int32(refill), top_n=top_n,
                                           attend_len=attend_len)
        out, steps = _host((out, steps))
        self.steps["decode_s"] += time.perf_counter() - start
        self.steps["decode_blocks"] += 1
        self.steps["decode_steps"] += int(steps)
        for slot, req in list(self.running.items()):
            emitted = [(int(t), float(out["logprob"][slot, j]), out["top_ids"][slot, j], out["top_logprobs"][slot, j])
                       for j, t in enumerate(out["token"][slot, :steps]) if t >= 0]
            # Every token the request sampled before this block is in req.tokens (a stop token retires it).
            self._emit(req, emitted, finished=len(req.tokens) + len(emitted) >= req.params.max_tokens)

    def _emit(self, req: Request, emitted: list, *, finished: bool) -> None:
        """Append sampled tokens to a request; finish it at a stop id, its budget, or a stop string."""
        stop_ids = self._stop_ids(req.params)
        reason, stop_reason = None, None
        for token, logprob, top_ids, top_lps in emitted:
            if token in stop_ids:
                reason, stop_reason = "stop", token
                break
            req.tokens.append(token)
            if req.params.logprobs is not None:
                req.logprobs.append(logprob)
                n = req.params.logprobs
                req.top_logprobs.append([(int(i), float(lp)) for i, lp in zip(top_ids[:n], top_lps[:n])])
        if reason is None and finished:
            reason = "length"
        if self.detokenize is not None:
            req.text = self._text(req)
            for s in req.params.stop:
                at = req.text.find(s)
                if at >= 0:
                    req.text, reason, stop_reason = req.text[:at], "stop", s
                    break
        if reason is not None:
            self._retire(req, reason, stop_reason)
        elif req.on_update is not None and emitted:
            req.on_update(req)

    def _text(self, req: Request) -> str:
        """The reply's text: decoded after a few prompt tokens and cut after them, so that word-boundary
        spaces come out as they would in the whole text (SentencePiece drops a leading one)."""
        prefix = req.prompt[-4:]
        head = self.detokenize(prefix)
        whole = self.detokenize(prefix + req.tokens)
        return whole[len(head):] if whole.startswith(head) else self.detokenize(req.tokens)

    def _retire(self, req: Request, reason: str, stop_reason: Any = None) -> None:
        if req.slot in self.running and self.running[req.slot] is req:
            del self.running[req.slot]
            self._release[req.slot] = True  # a slot the device still thinks active (a stop string, a cancel)
            self.free.append(req.slot)
        self._finish(req, reason, stop_reason)

    def _finish(self, req: Request, reason: str, stop_reason: Any = None) -> None:
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.finished = time.perf_counter()
        if req.on_update is not None:
            req.on_update(req)

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while not self.idle:
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 = SamplingParams()) -> list[Request]:
        """Submit prompts (one SamplingParams for all, or one each), run to completion; the requests in order."""
        each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(each) != len(prompts):
            raise SampleError(f"{len(prompts)} prompts but {len(each)} SamplingParams")
        for prompt, p in zip(prompts, each):
            self.check(prompt, p)
        requests = [self.submit(prompt, p) for prompt, p in zip(prompts, each)]
        self.run()
        return requests

    def serve_forever(self) -> None:
        """Step whenever there is work, sleep otherwise, until `shutdown` (the server's engine thread)."""
        while True:
            with self._lock:
                while self.idle and not self._stopping:
                    self._lock.wait()
                if self._stopping and self.idle:
                    return
            self.step()

    def abort(self, reason: str = "error") -> None:
        """Finish every queued and running request with `reason` (the engine thread failed: nobody waits forever)."""
        with self._lock:
            pending = self.waiting + self.prefilling + list(self.running.values())
            self.waiting, self.prefilling, self.running = [], [], {}
            self._stopping = True
        for req in pending:
            if not req.done:
                self._finish(req, reason)

    def shutdown(self) -> None:
        """Refuse new requests, let the queued ones finish, then end `serve_forever`."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()


def generate(config: ml_collections.ConfigDict, params: dict, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, eos_id: int | None = None, seed: int = 0, slots: int = 32
             ) -> list[list[int]]:
    """`model.sampler.generate`'s contract through the engine: each prompt's new tokens (at most
    `max_new_tokens`, cut before `eos_id`), greedy or sampled (prompt i with seed + i). The cache holds
    the longest prompt plus `max_new_tokens`, rounded to a length bucket, not the model's whole context."""
    if not prompts:
        raise SampleError("no prompts given")
    m = model.model_config(config)
    longest = max(len(p) for p in prompts)
    max_len = min(max(bucket_length(longest + max_new_tokens), 2), m.max_seq_len)
    engine = Engine(config, params, slots=min(slots, bucket_length(len(prompts))), max_len=max_len, eos_id=eos_id)
    settings = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature, top_k=top_k,
                               top_p=top_p, repetition_penalty=repetition_penalty, seed=seed + i)
                for i in range(len(prompts))]
    return [r.tokens for r in engine.generate(prompts, settings)]
