"""The decoder with a scalar head: a reward model, or PPO's critic.

The trunk is the language model's decoder without its LM head; the head is a vector [D]. Read at a
conversation's last real token it is InstructGPT's reward (as Hugging Face's
`LlamaForSequenceClassification` reads it); read at every token it is PPO's per-token value. One tree
shape serves both, so a critic can start from the reward model (InternLM2, section 4.3.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

from maxlm.model import decoder as model


def _trunk(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != "lm_head"}


def from_lm(lm_params: dict) -> dict:
    """Value-head parameters from a language model's: its trunk, and a zero head (every value starts at 0)."""
    emb = lm_params["embedding"]
    return {"decoder": _trunk(lm_params), "head": jnp.zeros(emb.shape[-1:], emb.dtype)}


def abstract_params(config: ml_collections.ConfigDict) -> dict:
    lm = model.abstract_params(config)
    emb = lm["embedding"]
    return {"decoder": _trunk(lm), "head": jax.ShapeDtypeStruct(emb.shape[-1:], emb.dtype)}


def logical_axes(config: ml_collections.ConfigDict) -> dict:
    return {"decoder": _trunk(model.logical_axes(config)), "head": PartitionSpec("embed")}


def init(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    return from_lm(model.init(config, rng))


def token_values(config: ml_collections.ConfigDict, params: dict, tokens: jax.Array, *,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens [B,T] -> float32 [B,T]: the head read at every position (PPO's critic uses all of them)."""
    x = model.hidden(config, params["decoder"], tokens, positions=positions, segment_ids=segment_ids)
    return jnp.einsum("BTD,D->BT", x.astype(jnp.float32), params["head"].astype(jnp.float32))


def scores(config: ml_collections.ConfigDict, params: dict, tokens: jax.Array, positions: jax.Array,
           segment_ids: jax.Array, last: jax.Array) -> jax.Array:
    """Rewards [B]: the head at the position where `last` [B,T] is 1 (the last real token of each row)."""
    values = token_values(config, params, tokens, positions=positions, segment_ids=segment_ids)
    return jnp.sum(values * last, axis=-1)
