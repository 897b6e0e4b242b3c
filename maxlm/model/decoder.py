"""A LLaMA / InternLM2 / Gemma 3-family decoder in Flax Linen, used functionally.

Legend (gemma's): B batch, T query length, S key length, N query heads, K kv heads, G = N // K,
H head dim, D model dim, F MLP dim, V vocab, L layers.

Architecture (Touvron et al. 2023, LLaMA; Cai et al. 2024, InternLM2): token embedding -> L x [pre-RMSNorm
-> rotary GQA attention -> residual -> pre-RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> vocab projection.

Gemma 3 (Gemma Team 2025, "Gemma 3 Technical Report") is the same skeleton with model config switches, each
off by default so that the other models keep their parameter tree and logits: embeddings times sqrt(D)
(`scale_embeddings`), RMSNorms that multiply by (1 + scale) with zero-centred scales (`norm_zero_centered`),
a second RMSNorm on the attention and MLP outputs before each residual add (`post_norms`), QK-norm, a GeGLU
MLP (`mlp_activation="gelu_tanh"`), logits scaled by query_pre_attn_scalar^-0.5, and local sliding-window
layers interleaved with global ones (`sliding_window`, `global_every`), each kind with its own RoPE base
(`local_rope_theta` for the local ones). Whether a layer is local is a per-layer boolean scanned alongside
the stacked parameters (`local_layers`), so the scan and the parameter tree stay as they are. Gemma 2's
attention and final logit soft-capping are switches too.

Why Linen: `init` returns a plain nested dict of arrays, which is exactly what Orbax saves, what the
Hugging Face converter maps name by name, what LoRA wraps and what the sharding rules annotate -- one tree
everywhere. Every parameter is declared with `nn.with_logical_partitioning`, so its logical axis names
('embed', 'heads', ...) travel with it; `config.mesh.rules` maps them to mesh axes. No mesh axis is named here.

Layers are always an `nn.scan` over a stacked parameter tree with a leading 'layers' axis. `scan_layers=False`
fully unrolls that scan, so the compiled program is straight-line code while the parameter tree -- and so
the checkpoint layout -- stays identical whichever of scan / unroll / remat is chosen.

Two ways of running the same stack come from the full experiment config (`apply`, `apply_with_aux`, `hidden`
read them; a bare model section has neither): a pipeline (`mesh.pipeline` > 1, `maxlm.model.pipeline`) runs the
stacked layers stage by stage, and ring attention (`mesh.sequence_strategy=ring`,
`maxlm.model.ring_attention`) puts the tokens in its zigzag order before the layers and back after them.
Initialisation and cached decoding always take the plain scan.

The KV cache is an explicit pytree (`init_cache`), threaded in and out of `__call__`. Every layer, a local one
too, caches all of its slots; a local layer's window is a mask over them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from maxlm.model import attention, moe
from maxlm.model import pipeline as pipeline_lib
from maxlm.model import quant, ring_attention
from maxlm.model.attention import head_dim

Cache = dict[str, jax.Array]

_init = nn.initializers.normal


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Accept either the full experiment config or its `model` section."""
    return config.model if "model" in config else config


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 as Hugging Face Llama does.

    `zero_centered` (Gemma): the output is norm(x) * (1 + scale), scales initialised to 0 -- the parameter
    Gemma checkpoints store, kept as is so that conversion copies it bit for bit -- and the product is taken
    in float32 before the cast back, as Hugging Face's Gemma3RMSNorm does (Llama casts first)."""

    eps: float
    param_dtype: Any
    zero_centered: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_centered else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.zero_centered:
            return (x32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return (scale.astype(jnp.float32) * x32.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def _norm(cfg: ml_collections.ConfigDict, name: str) -> RMSNorm:
    return RMSNorm(cfg.norm_eps, _dtype(cfg.param_dtype), cfg.norm_zero_centered, name=name)


def local_layers(m: ml_collections.ConfigDict) -> tuple[bool, ...]:
    """Per layer, whether it attends within `model.sliding_window` (a local layer): none without a window;
    with one, every layer but each `global_every`-th (layer i global when (i + 1) % global_every == 0, Gemma
    3's 5 local : 1 global; Hugging Face's `layer_types` from `sliding_window_pattern`)."""
    every = m.global_every
    return tuple(bool(m.sliding_window) and not (every and (i + 1) % every == 0) for i in range(m.num_layers))


def _mixed_layers(m: ml_collections.ConfigDict) -> bool:
    """Whether local and global layers alternate, so that each layer's kind is a traced scan input."""
    return len(set(local_layers(m))) > 1


def write_slots(buffer: jax.Array, new: jax.Array, index: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    """Write `new` [B,T,...] into `buffer` [B,S,...] at slots index .. index + T - 1 along axis 1; with
    `layer`, into layer `layer` of a stacked buffer [L,B,S,...].

    A scalar index is one slot for every row (a left-padded batch: `maxlm.model.sampler`); an index [B]
    gives each row its own (a slot cache, where each row is a different request at its own length:
    `maxlm.inference.engine`). The caller guarantees index + T <= S: slots past the end are dropped. Writing into the whole stacked cache (rather than into a
    layer's slice that the layer scan then re-stacks) is what lets XLA update the cache in place: a decode
    step then touches the new token's slots only, not a copy of the cache."""
    if layer is None:
        return write_slots(buffer[None], new, index, jnp.zeros((), jnp.int32))[0]
    b, t = new.shape[:2]
    # A scatter for the shared index too: XLA:CPU copied the whole cache around a dynamic_update_slice here.
    slots = jnp.broadcast_to(index, (b,))[:, None] + jnp.arange(t)[None, :]
    return buffer.at[layer, jnp.arange(b)[:, None], slots].set(new.astype(buffer.dtype), mode="drop")


class Attention(nn.Module):
    cfg: ml_collections.ConfigDict
    attend_len: int = 0  # > 0: read only the cache's first attend_len slots (see `decode`)
    ring: ring_attention.Ring | None = None  # ring attention over the sequence axis (`maxlm.model.ring_attention`)

    @nn.compact
    def __call__(self, x: jax.Array, aux: dict, cache: Cache | None, layer: jax.Array, local: jax.Array | None):
        """`cache`: the whole stacked k/v cache [L,B,S,K,H] (or None), of which this is layer `layer` (traced).
        `local`: this layer's kind as a traced boolean when local and global layers mix (`_mixed_layers`),
        else None (every layer is the same kind, known statically)."""
        cfg = self.cfg
        n, k_heads, h, d = cfg.num_heads, cfg.num_kv_heads, head_dim(cfg), cfg.d_model
        g = n // k_heads
        dt, pdt = _dtype(cfg.compute_dtype), _dtype(cfg.param_dtype)
        winit = _init(cfg.init_std)
        b, t, _ = x.shape
        if cfg.fused_qkv:
            # InternLM2's wqkv: per kv head, its G query heads then one key and one value head.
            w = self.param("wqkv", nn.with_logical_partitioning(winit, ("embed", "kv_heads", "qkv_group", "head_dim")),
                           (d, k_heads, g + 2, h), pdt)
            qkv = jnp.einsum("BTD,DKGH->BTKGH", x, quant.dequantize(w, dt))
            if cfg.qkv_bias:
                bias = self.param("bqkv", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                       ("kv_heads", "qkv_group", "head_dim")),
                                  (k_heads, g + 2, h), pdt)
                qkv = qkv + bias.astype(dt)
            q = qkv[:, :, :, :g].reshape(b, t, n, h)
            k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        else:
            def proj(name, heads, axis):
                w = self.param(name, nn.with_logical_partitioning(winit, ("embed", axis, "head_dim")), (d, heads, h), pdt)
                y = jnp.einsum("BTD,DNH->BTNH", x, quant.dequantize(w, dt))
                if cfg.qkv_bias:
                    bias = self.param(name + "_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                                   (axis, "head_dim")), (heads, h), pdt)
                    y = y + bias.astype(dt)
                return y

            q, k, v = proj("q", n, "heads"), proj("k", k_heads, "kv_heads"), proj("v", k_heads, "kv_heads")
        if cfg.qk_norm:  # Qwen3 / Gemma 3: each head's query and key RMS-normalised over H, before RoPE
            q = _norm(cfg, "q_norm")(q)
            k = _norm(cfg, "k_norm")(k)
        q = _constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = _constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = _constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", None))
        # Every model.rope_* key, so a variant's own keys reach it; local layers may have a base of their own.
        static_local = local_layers(cfg)[0] if local is None else False
        rope = attention.rope_config(cfg, local=static_local)
        local_rope = attention.rope_config(cfg, local=True)

        def rotate(x: jax.Array) -> jax.Array:
            rotated = attention.rope(x, aux["positions"], **rope)
            if local is None or local_rope == rope:
                return rotated
            return jnp.where(local, attention.rope(x, aux["positions"], **local_rope), rotated)

        q, k = rotate(q), rotate(k)

        new_cache = None
        q_offset = 0
        if cache is not None:
            idx = aux["cache_index"]
            new_cache = {name: write_slots(cache[name], new.astype(cache[name].dtype), idx, layer)
                         for name, new in (("k", k), ("v", v))}
            q_offset = idx
            k, v = (jax.lax.dynamic_index_in_dim(new_cache[name], layer, keepdims=False).astype(dt)
                    for name in ("k", "v"))
            if self.attend_len:
                k, v = k[:, :self.attend_len], v[:, :self.attend_len]
        window = cfg.sliding_window if local is not None or static_local else 0
        kv_segment_ids = aux["kv_segment_ids"][:, :k.shape[1]]
        out = attention.attend(q, k, v, q_segment_ids=aux["segment_ids"], kv_segment_ids=kv_segment_ids,
                               q_offset=q_offset, impl=cfg.attention_impl, window=window, local=local,
                               scale=cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None,
                               softcap=cfg.attn_logit_softcap, ring=self.ring)
        out = checkpoint_name(out, "attention_out")
        wo = self.param("o", nn.with_logical_partitioning(winit, ("heads", "head_dim", "embed")), (n, h, d), pdt)
        return jnp.einsum("BTNH,NHD->BTD", out, quant.dequantize(wo, dt)), new_cache


# model.mlp_activation -> the gate's nonlinearity: SwiGLU's silu, or GeGLU's tanh-approximated GELU (Gemma;
# Hugging Face's "gelu_pytorch_tanh").
MLP_ACTIVATIONS: dict[str, Any] = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nn.Module):
    """A gated MLP (Shazeer 2020, "GLU Variants Improve Transformer"): down(act(x gate) * (x up)), SwiGLU with
    act = silu, GeGLU with act = gelu (`model.mlp_activation`)."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, pdt = _dtype(cfg.compute_dtype), _dtype(cfg.param_dtype)
        winit = _init(cfg.init_std)
        shape_in = (cfg.d_model, cfg.mlp_dim)
        gate = self.param("gate", nn.with_logical_partitioning(winit, ("embed", "mlp")), shape_in, pdt)
        up = self.param("up", nn.with_logical_partitioning(winit, ("embed", "mlp")), shape_in, pdt)
        down = self.param("down", nn.with_logical_partitioning(winit, ("mlp", "embed")), shape_in[::-1], pdt)
        act = MLP_ACTIVATIONS[cfg.mlp_activation]
        hidden = (act(jnp.einsum("BTD,DF->BTF", x, quant.dequantize(gate, dt)))
                  * jnp.einsum("BTD,DF->BTF", x, quant.dequantize(up, dt)))
        hidden = _constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return jnp.einsum("BTF,FD->BTD", hidden, quant.dequantize(down, dt))


class Block(nn.Module):
    """One pre-norm decoder layer (with `post_norms`, Gemma's sandwich: a norm on each branch's output too).
    Signature fits `nn.scan`: (carry = (activations, the whole k/v cache or None), broadcast aux, per-layer
    inputs {"index": this layer's number, "local": its kind when kinds mix}) -> (carry, the mixture of
    experts' router stats, or None for a dense MLP)."""

    cfg: ml_collections.ConfigDict
    attend_len: int = 0
    ring: ring_attention.Ring | None = None

    @nn.compact
    def __call__(self, carry: tuple, aux: dict, layer: dict):
        cfg = self.cfg
        x, cache = carry
        attn_out, new_cache = Attention(cfg, self.attend_len, self.ring, name="attn")(_norm(cfg, "attn_norm")(x), aux, cache, layer["index"],
                                                         layer.get("local"))
        if cfg.post_norms:
            attn_out = _norm(cfg, "attn_post_norm")(attn_out)
        x = x + attn_out
        h = _norm(cfg, "mlp_norm")(x)
        stats = None
        if cfg.num_experts:
            mlp_out, stats = moe.MoE(cfg, MLP_ACTIVATIONS[cfg.mlp_activation], name="moe")(h, aux["segment_ids"] > 0)
        else:
            mlp_out = MLP(cfg, name="mlp")(h)
        if cfg.post_norms:
            mlp_out = _norm(cfg, "mlp_post_norm")(mlp_out)
        x = x + mlp_out
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        return (x, new_cache), stats


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def _layer_stack(cfg: ml_collections.ConfigDict, length: int) -> type[nn.Module]:
    """`length` Blocks as one `nn.scan` over parameters stacked on a leading 'layers' axis (remat per layer)."""
    block = Block
    if cfg.remat_policy != "none":
        block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(nn.broadcast, 0),
                   length=length, unroll=1 if cfg.scan_layers else length,
                   metadata_params={nn.PARTITION_NAME: "layers"})


def _run_chunk(cfg: ml_collections.ConfigDict, ring: ring_attention.Ring | None, params: dict, x: jax.Array,
               aux: dict, per_layer: dict):
    """A pipeline stage's work: consecutive layers (params stacked [Lc, ...]) on x [b,T,D] ->
    (x, their router stats or None)."""
    length = per_layer["index"].shape[0]
    (x, _), stats = _layer_stack(cfg, length)(cfg, 0, ring).apply({"params": params}, (x, None), aux, per_layer)
    return x, stats


class Decoder(nn.Module):
    cfg: ml_collections.ConfigDict
    attend_len: int = 0  # > 0: attention reads only the cache's first attend_len slots (see `decode`)
    pipeline: pipeline_lib.Pipeline | None = None  # run the layers as a pipeline (`maxlm.model.pipeline`)
    ring: ring_attention.Ring | None = None  # ring attention when the sequence is sharded

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: Cache | None = None, hidden_only: bool = False):
        """tokens [B,T] -> (float32 logits [B,T,V], updated cache or None).

        `hidden_only`: return the final-norm hidden states [B,T,D] instead of logits, without touching (or
        needing) the LM head -- the trunk that reward and value heads read.

        positions default to 0..T-1 (RoPE); segment_ids default to all ones (one document per row; 0 marks
        padding). With a cache, the T new tokens are written at slots cache["index"] .. + T - 1 (the index is
        a scalar for the whole batch, or one per row [B]: see `write_slots`).
        """
        cfg = self.cfg
        dt, pdt = _dtype(cfg.compute_dtype), _dtype(cfg.param_dtype)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        shards = attention.sequence_shards()
        ring = self.ring if cache is None and shards > 1 else None
        order = None
        if ring is not None and ring.zigzag:  # the balanced token order of `ring_attention`, undone below
            order = ring_attention.zigzag_permutation(t, shards)
            tokens, positions, segment_ids = (a[:, order] for a in (tokens, positions, segment_ids))
        embedding = self.param("embedding", nn.with_logical_partitioning(_init(cfg.init_std), ("vocab", "embed")),
                               (cfg.vocab_size, cfg.d_model), pdt)
        x = quant.take(embedding, tokens, dt)
        if cfg.scale_embeddings:  # Gemma: the scale is rounded to the compute dtype first, as Hugging Face does
            x = x * jnp.asarray(cfg.d_model ** 0.5, dt)
        x = _constrain(x, ("activation_batch", "activation_length", "activation_embed"))

        aux = {"positions": positions, "segment_ids": segment_ids, "kv_segment_ids": segment_ids}
        kv = None
        if cache is not None:
            kv_segment_ids = write_slots(cache["segment_ids"], segment_ids, cache["index"])
            aux.update(kv_segment_ids=kv_segment_ids, cache_index=cache["index"])
            kv = {"k": cache["k"], "v": cache["v"]}

        per_layer = {"index": jnp.arange(cfg.num_layers, dtype=jnp.int32)}
        if _mixed_layers(cfg):
            per_layer["local"] = jnp.asarray(local_layers(cfg))
        if self.pipeline is not None and cache is None and not self.is_initializing():
            # The same stacked parameters, run stage by stage (`maxlm.model.pipeline`); init and decoding
            # always take the plain scan, so the parameter tree is one whatever the schedule.
            run_chunk = functools.partial(_run_chunk, cfg, ring)
            x, router_stats = pipeline_lib.run(self.pipeline, run_chunk, self.variables["params"]["layers"], x,
                                               aux, per_layer, unroll=not cfg.scan_layers)
        else:
            layers = _layer_stack(cfg, cfg.num_layers)(cfg, self.attend_len, ring, name="layers")
            (x, kv), router_stats = layers((x, kv), aux, per_layer)
        if router_stats is not None:  # read by `apply_with_aux`; a no-op unless "intermediates" is mutable
            self.sow("intermediates", "moe", moe.mean_over_layers(router_stats))
        if order is not None:
            x = _constrain(x[:, np.argsort(order)], ("activation_batch", "activation_length", "activation_embed"))

        x = _norm(cfg, "final_norm")(x)
        if hidden_only:
            return x, None
        if cfg.tie_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", x, quant.dequantize(embedding, dt),
                                preferred_element_type=jnp.float32)
        else:
            head = self.param("lm_head", nn.with_logical_partitioning(_init(cfg.init_std), ("embed", "vocab")),
                              (cfg.d_model, cfg.vocab_size), pdt)
            logits = jnp.einsum("BTD,DV->BTV", x, quant.dequantize(head, dt), preferred_element_type=jnp.float32)
        if cfg.final_logit_softcap:  # Gemma 2: c * tanh(logits / c), in float32
            logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
        logits = _constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

        new_cache = None
        if cache is not None:
            new_cache = {**kv, "segment_ids": aux["kv_segment_ids"], "index": cache["index"] + t}
        return logits.astype(jnp.float32), new_cache


# ----------------------------------------------------------------------------------------------------------
# Functional API: parameters are a plain nested dict; these are the functions the rest of maxlm calls.


def _boxed_init(config: ml_collections.ConfigDict, rng: jax.Array):
    cfg = model_config(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(cfg).init(rng, tokens)["params"]


def init(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Random parameters as a plain pytree (HF-style init: normal(init_std) matrices, unit norms)."""
    return nn.unbox(_boxed_init(config, rng))


def abstract_params(config: ml_collections.ConfigDict) -> dict:
    """ShapeDtypeStructs of the parameter tree, without allocating anything."""
    return nn.unbox(jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0))))


def logical_axes(config: ml_collections.ConfigDict) -> dict:
    """The parameter tree with a `PartitionSpec` of logical axis names at each leaf."""
    boxed = jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0)))
    return nn.get_partition_spec(boxed)


def apply(config: ml_collections.ConfigDict, params: dict, tokens: jax.Array, *,
          positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens [B,T] int -> float32 logits [B,T,V]. Stable public API."""
    logits, _ = Decoder(model_config(config), pipeline=pipeline_lib.from_config(config),
                    ring=ring_attention.from_config(config)).apply(
        {"params": params}, tokens, positions, segment_ids)
    return logits


def apply_with_aux(config: ml_collections.ConfigDict, params: dict, tokens: jax.Array, *,
                   positions: jax.Array | None = None, segment_ids: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`apply`, and the mixture of experts' router stats averaged over layers (`maxlm.model.moe`:
    load_balance, z_loss, dropped; {} for a dense model), which the training losses add."""
    (logits, _), state = Decoder(model_config(config), pipeline=pipeline_lib.from_config(config),
                    ring=ring_attention.from_config(config)).apply(
        {"params": params}, tokens, positions, segment_ids, mutable=["intermediates"])
    found = state.get("intermediates", {}).get("moe")
    return logits, (found[0] if found else {})


def hidden(config: ml_collections.ConfigDict, params: dict, tokens: jax.Array, *,
           positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens [B,T] -> final-norm hidden states [B,T,D] in the compute dtype (`params` may lack `lm_head`)."""
    x, _ = Decoder(model_config(config), pipeline=pipeline_lib.from_config(config),
                    ring=ring_attention.from_config(config)).apply(
        {"params": params}, tokens, positions, segment_ids, None, True)
    return x


def init_cache(config: ml_collections.ConfigDict, batch: int, max_len: int, dtype: Any = None, *,
               per_row: bool = False) -> Cache:
    """An empty KV cache: k/v [L,B,S,K,H], the segment id of every slot [B,S] (0 = empty), the next slot
    index: a scalar shared by all rows, or with `per_row` one per row [B] (a slot cache for continuous
    batching, where rows hold unrelated requests of different lengths)."""
    cfg = model_config(config)
    dtype = dtype or _dtype(cfg.compute_dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, head_dim(cfg))
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((batch,) if per_row else (), jnp.int32)}


def decode(config: ml_collections.ConfigDict, params: dict, tokens: jax.Array, cache: Cache, *,
           positions: jax.Array, segment_ids: jax.Array, attend_len: int = 0) -> tuple[jax.Array, Cache]:
    """Run T new tokens through the model against a cache (prefill when T > 1, one decode step when T = 1).

    Precondition: cache["index"] + T <= the cache length. Inside jit the index is a traced value, so this
    cannot be checked here; `maxlm.sample` sizes its cache to prompt + new tokens and checks that up front.
    `attend_len` > 0 (static) makes attention read only the first attend_len slots of the cache, which must
    hold every key the new tokens see (their own slots included): a decode step of short sequences in a long
    cache then costs their length, not the cache's (`maxlm.inference.engine` buckets it).
    """
    return Decoder(model_config(config), attend_len).apply({"params": params}, tokens, positions, segment_ids,
                                                           cache)
