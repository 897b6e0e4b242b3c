"""The parameter trees a stage trains or holds frozen, by name -- one registry for the trainer, the
checkpoints and every tool that reads a workdir.

A *layout* names a tree: "lm" (the decoder with its LM head), "value" (the decoder trunk with a scalar
head: reward model, critic), "lora" (low-rank adapters over an "lm" base), or a dict of layouts
({"actor": "lm", "critic": "value"}: PPO). A checkpoint records its layout, so a workdir can be restored
without knowing which stage wrote it. Adding a tree kind is one `register` call beside its code.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import ml_collections

from maxlm.model import lora, decoder as model, value_head

Layout = Union[str, dict]


class Tree(NamedTuple):
    abstract: Callable[[ml_collections.ConfigDict], Any]  # shapes and dtypes (jax.ShapeDtypeStruct leaves)
    logical_axes: Callable[[ml_collections.ConfigDict], Any]  # a PartitionSpec of logical names per leaf


TREES: dict[str, Tree] = {}


def register(name: str, tree: Tree) -> None:
    TREES[name] = tree


register("lm", Tree(model.abstract_params, model.logical_axes))
register("value", Tree(value_head.abstract_params, value_head.logical_axes))
register("lora", Tree(lora.abstract, lora.logical_axes))


def _get(name: str) -> Tree:
    if name not in TREES:
        raise ValueError(f"unknown parameter layout {name!r}; known: {sorted(TREES)}")
    return TREES[name]


def abstract(config: ml_collections.ConfigDict, layout: Layout) -> Any:
    if isinstance(layout, dict):
        return {k: abstract(config, v) for k, v in layout.items()}
    return _get(layout).abstract(config)


def logical_axes(config: ml_collections.ConfigDict, layout: Layout) -> Any:
    if isinstance(layout, dict):
        return {k: logical_axes(config, v) for k, v in layout.items()}
    return _get(layout).logical_axes(config)
