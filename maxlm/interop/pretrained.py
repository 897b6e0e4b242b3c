"""Where weights come from: a maxlm workdir or a Hugging Face folder, for fine-tuning and for inference.

`load_base(path)` reads the model a fine-tuning run starts from; `load_workdir(workdir)` reads any run's
newest checkpoint for inference (sampling, evaluation, export), merging a LoRA run's adapters into the
base they were trained on (`config.sft.base`, stored as an absolute path in the run's config).

Adding tokens (chat markers) to a model grows its vocabulary: `resize_vocab` appends rows to the input
embedding and output head. New rows are drawn from a Gaussian fitted to the existing rows (their mean and
per-dimension standard deviation): starting at the mean keeps the new tokens' logits close to the average
token's, so the model's distribution barely moves (Hewitt 2021, "Initializing new word embeddings"; the
default of Hugging Face's `resize_token_embeddings`), and the spread keeps several new markers
distinguishable from one another even where the embedding stays frozen (LoRA).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from maxlm import config as config_lib
from maxlm import tokenizer
from maxlm.errors import UserError
from maxlm.interop import hf as convert
from maxlm.model import decoder, lora, quant, trees
from maxlm.training import checkpoint

# Model keys fixed by the weights: every key of the `model` section but config.MODEL_RUN_KEYS (dtype of
# compute, attention kernel, remat, scan: how to run them, which comes from the fine-tuning config).
SHAPE_KEYS = config_lib.shape_keys()


class BaseModelError(UserError):
    """A base model that cannot be used (unsupported architecture, damaged files): one line for the user."""


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_base(path: str, step: int = -1, key: str = "sft.base") -> tuple[ml_collections.ConfigDict, dict, str]:
    """(config, host params, tokenizer path or "") of a maxlm workdir (its newest or given checkpoint; a
    LoRA run comes back merged) or a Hugging Face folder (its tokenizer.json, else its `tokenizer.model`, when it has one)."""
    if not path:
        raise FileNotFoundError(f"no base model: set --config.{key} to a maxlm workdir or a Hugging Face folder")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{key}={path} is not a directory")
    if is_hf_folder(path):
        try:
            config, params = convert.from_hf(path)
        except ValueError as e:
            raise BaseModelError(f"cannot import the Hugging Face model at {path}: {e}") from e
        return config, params, tokenizer.resolve(path)
    config, params, _ = load_workdir(path, None if step < 0 else step)
    return config, params, tokenizer.run_tokenizer_path(config, path)


def load_workdir(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, host params, step) of the policy in a run's checkpoint, whichever stage wrote it: the
    model itself, a LoRA run's adapters merged into their base, PPO's actor (the checkpoint records where
    the policy sits). A reward model is not a policy: BaseModelError."""

    def is_policy(meta: dict) -> None:
        if meta["policy"] is None:
            raise BaseModelError(f"{workdir} holds a {meta['stage'] or 'non-policy'} model ({meta['layout']} "
                                 "parameters), not a language model to sample from, evaluate or export")

    config, params, step, meta = checkpoint.load_latest(workdir, step, with_meta=True, check=is_policy)
    params = jax.device_get(params)
    layout, policy = meta["layout"], meta["policy"]
    if policy:
        params, layout = params[policy], layout[policy]
    if layout == "lora":
        _, base, _ = load_base(config.sft.base, config.sft.base_step)
        base = resize_vocab(base, config.model.vocab_size, seed=config.train.seed)
        if config.lora.base_quant:  # QLoRA: the adapters were trained on the quantised base; merged into it
            base = jax.jit(lambda b: trees.prepare(config, "lm_quant", b))(base)
        params = jax.device_get(jax.jit(lambda b, a: quant.dense(lora.merge(config, b, a), config.model.param_dtype))(
            base, params))
    elif layout != "lm":
        raise BaseModelError(f"{workdir}: the policy's parameters are {layout!r}, not a language model")
    return config, params, step


def define_quant_flags() -> None:
    """--quant and --quant_group_size, shared by the inference entry points (sample, evaluate, serve)."""
    from absl import flags

    flags.DEFINE_enum("quant", "", ["", *quant.MODES], "Quantise the weights at load (maxlm/model/quant.py): int8 "
                      "per output channel, int4 group-wise; empty keeps them as trained.")
    flags.DEFINE_integer("quant_group_size", quant.DEFAULT_GROUP_SIZE, "int4: input elements per scale.")


def quantize(config: ml_collections.ConfigDict, params: dict, mode: str, group_size: int = quant.DEFAULT_GROUP_SIZE,
             key: str = "--quant") -> dict:
    """Host params with the model's weights quantised (`maxlm.model.quant`); `mode` "" returns them as they are.
    Says the weight bytes before and after on stderr (stdout may be a command's result)."""
    if not mode:
        return params
    before = quant.weight_bytes(params)
    params = jax.device_get(jax.jit(lambda p: quant.quantize(p, decoder.logical_axes(config), mode, group_size, key))(
        params))
    after = quant.weight_bytes(params)
    print(f"weights quantised to {mode}" + (f" (groups of {group_size})" if quant.MODES[mode].grouped else "")
          + f": {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({after / before:.3f}x)", file=sys.stderr,
          flush=True)
    return params


def with_base_model(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict, vocab_size: int
                    ) -> ml_collections.ConfigDict:
    """`config` with the base's shape keys (and `vocab_size`), so the run's model is the base model."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key in SHAPE_KEYS:
            config.model[key] = base.model[key]
        config.model.vocab_size = vocab_size
    config.lock()
    return config


def same_shapes(a: Any, b: Any) -> bool:
    """Whether two parameter trees have the same structure and leaf shapes (one architecture)."""
    return jax.tree.map(np.shape, a) == jax.tree.map(np.shape, b)


def resize_vocab(params: dict, vocab_size: int, seed: int = 0) -> dict:
    """Grow the embedding [V,D] (and an untied head [D,V]) to `vocab_size` rows (see module docstring)."""
    emb = np.asarray(params["embedding"])
    old = emb.shape[0]
    if vocab_size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
    if vocab_size == old:
        return params
    rng = np.random.default_rng(seed)

    def grow(rows: np.ndarray) -> np.ndarray:  # rows [V, D] -> [vocab_size, D]
        mean, std = rows.mean(0), rows.std(0)
        new = mean + std * rng.standard_normal((vocab_size - old, rows.shape[1]))
        return np.concatenate([rows, new.astype(rows.dtype)])

    out: dict[str, Any] = dict(params)
    out["embedding"] = grow(emb)
    if "lm_head" in params:
        out["lm_head"] = grow(np.asarray(params["lm_head"]).T).T
    return out
