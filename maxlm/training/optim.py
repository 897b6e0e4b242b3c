"""AdamW with the learning-rate schedules used for LLM pretraining.

- cosine: linear warmup then cosine decay to `end_lr_ratio * peak` (Chinchilla, LLaMA).
- linear: linear warmup then linear decay.
- constant: linear warmup then constant.
- wsd: warmup-stable-decay (MiniCPM, Hu et al. 2024): constant after warmup, then a linear decay over the
  last `wsd_decay_fraction` of the steps -- a run can be continued from any stable-phase checkpoint.

`optim.schedule_start` shifts the schedule to begin at that step (held at its first value before it): a
later stage of a staged run (`train.stages`) warms up and decays over its own steps while AdamW's moments
carry over.

Weight decay skips norm scales and biases (decaying them has no regularising meaning) and, unless
`optim.decay_embeddings`, the input embedding (the LLaMA / GPT-NeoX convention). The mask is built from
parameter *names*, because with scanned layers every tensor has a leading layer axis, so a rank test
("decay only matrices") would wrongly decay the [L, D] norm scales.

LoRA+ (Hayou et al. 2024, `lora.lr_ratio`): when the trained tree is a LoRA adapter tree, the updates of the
B factors are scaled by the ratio after AdamW, i.e. B trains at `lr_ratio` times the scheduled lr.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax
from jax.tree_util import DictKey, tree_map_with_path

from maxlm.config import lr_decay_steps


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    o = config.optim
    total = lr_decay_steps(config)
    warmup = min(o.warmup_steps, total)
    end = o.peak_lr * o.end_lr_ratio
    warm = optax.linear_schedule(0.0, o.peak_lr, max(warmup, 1))
    rest = max(total - warmup, 1)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.peak_lr, rest, alpha=o.end_lr_ratio)
    elif o.schedule == "linear":
        after = optax.linear_schedule(o.peak_lr, end, rest)
    elif o.schedule == "constant":
        after = optax.constant_schedule(o.peak_lr)
    elif o.schedule == "wsd":
        decay = max(int(round(rest * o.wsd_decay_fraction)), 1)
        after = optax.join_schedules([optax.constant_schedule(o.peak_lr), optax.linear_schedule(o.peak_lr, end, decay)],
                                     [rest - decay])
    else:
        raise ValueError(f"unknown schedule {o.schedule!r}")
    full = after if warmup == 0 else optax.join_schedules([warm, after], [warmup])
    start = o.schedule_start
    if start == 0:
        return full
    return lambda step: full(jnp.maximum(step - start, 0))  # a stage's own schedule (train.stages)


def _path_names(path) -> list[str]:
    return [p.key for p in path if isinstance(p, DictKey)]


def decay_mask(config: ml_collections.ConfigDict, params: dict) -> dict:
    """True for parameters that get weight decay (see module docstring)."""

    def decays(path, _) -> bool:
        names = _path_names(path)
        leaf = names[-1]
        if leaf == "scale" or leaf.endswith("bias") or leaf == "bqkv":
            return False
        if leaf == "embedding":
            return config.optim.decay_embeddings
        return True

    return tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict, params: dict) -> optax.GradientTransformation:
    """`params` may be abstract (ShapeDtypeStructs): only its structure and names are used."""
    o = config.optim
    parts = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(optax.adamw(schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask(config, params)))
    if config.lora.rank > 0 and config.lora.lr_ratio != 1.0:
        is_b = tree_map_with_path(lambda path, _: _path_names(path)[-1] == "b", params)
        parts.append(optax.masked(optax.scale(config.lora.lr_ratio), is_b))
    return optax.chain(*parts)
