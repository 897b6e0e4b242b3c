"""The parameter trees a stage trains or holds frozen, by name -- one registry for the trainer, the
checkpoints and every tool that reads a workdir.

A *layout* names a tree: "lm" (the decoder with its LM head), "value" (the decoder trunk with a scalar
head: reward model, critic), "lora" (low-rank adapters over an "lm" base), or a dict of layouts
({"actor": "lm", "critic": "value"}: PPO). A checkpoint records its layout, so a workdir can be restored
without knowing which stage wrote it. Adding a tree kind is one `register` call beside its code.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Union

import jax
import ml_collections

from maxlm.model import lora, decoder as model, quant, value_head

Layout = Union[str, dict]


class Tree(NamedTuple):
    abstract: Callable[[ml_collections.ConfigDict], Any]  # shapes and dtypes (jax.ShapeDtypeStruct leaves)
    logical_axes: Callable[[ml_collections.ConfigDict], Any]  # a PartitionSpec of logical names per leaf
    # (config, a tree of another layout it is made from) -> this layout's tree; None: given as it is
    prepare: Callable[[ml_collections.ConfigDict, Any], Any] | None = None


TREES: dict[str, Tree] = {}


def register(name: str, tree: Tree) -> None:
    TREES[name] = tree


register("lm", Tree(model.abstract_params, model.logical_axes))
register("value", Tree(value_head.abstract_params, value_head.logical_axes))
register("lora", Tree(lora.abstract, lora.logical_axes))


def _quantize_base(config: ml_collections.ConfigDict, params: Any) -> Any:
    """An "lm" tree quantised as `lora.base_quant` says (QLoRA's frozen base; a quantised tree is kept)."""
    lo = config.lora
    return quant.quantize(params, model.logical_axes(config), lo.base_quant, lo.base_quant_group_size,
                          key="lora.base_quant")


def _quantized_abstract(config: ml_collections.ConfigDict) -> Any:
    return jax.eval_shape(functools.partial(_quantize_base, config), model.abstract_params(config))


def _quantized_axes(config: ml_collections.ConfigDict) -> Any:
    return quant.quantized_axes(model.logical_axes(config), _quantized_abstract(config))


# "lm_quant": an "lm" tree with its weights quantised (`maxlm.model.quant`), QLoRA's frozen base.
register("lm_quant", Tree(_quantized_abstract, _quantized_axes, _quantize_base))


def lora_base(config: ml_collections.ConfigDict) -> str:
    """The layout of a LoRA run's frozen base: quantised with `lora.base_quant` (QLoRA), else "lm"."""
    return "lm_quant" if config.lora.base_quant else "lm"


def _get(name: str) -> Tree:
    if name not in TREES:
        raise ValueError(f"unknown parameter layout {name!r}; known: {sorted(TREES)}")
    return TREES[name]


def prepare(config: ml_collections.ConfigDict, layout: Layout, tree: Any) -> Any:
    """`tree` made into `layout` where the layout is derived from another (an "lm" tree -> "lm_quant")."""
    if isinstance(layout, dict):
        return {k: prepare(config, v, tree[k]) for k, v in layout.items()}
    fn = _get(layout).prepare
    return tree if fn is None else fn(config, tree)


def needs_prepare(layout: Layout) -> bool:
    if isinstance(layout, dict):
        return any(needs_prepare(v) for v in layout.values())
    return _get(layout).prepare is not None


def abstract(config: ml_collections.ConfigDict, layout: Layout) -> Any:
    if isinstance(layout, dict):
        return {k: abstract(config, v) for k, v in layout.items()}
    return _get(layout).abstract(config)


def logical_axes(config: ml_collections.ConfigDict, layout: Layout) -> Any:
    if isinstance(layout, dict):
        return {k: logical_axes(config, v) for k, v in layout.items()}
    return _get(layout).logical_axes(config)
