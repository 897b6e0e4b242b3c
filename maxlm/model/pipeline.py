"""Pipeline parallelism inside one jitted program: the decoder's layers split into stages over a mesh axis.

Legend as in `decoder.py`, plus P stages (`mesh.pipeline`), M micro-batches (`train.microbatches`), R repeats
(the circular schedule's chunks per stage), Lc = L / (P R) layers per chunk, b = B / M rows per micro-batch.

The schedule is a loop of R M + P - 1 iterations in which every stage applies its chunk of layers to the
activation it holds (one `vmap` over the stage axis, which the mesh shards: each device computes its own
stage), after which the activations move one stage on (`jnp.roll` over the sharded axis: a collective
permute). Stage 0 takes micro-batch i at iteration i; the last stage's outputs land in a buffer of M slots.
This is the GSPMD formulation of GPipe (Huang et al. 2019) that praxis and MaxText use, so it composes with
every other mesh axis (the stage function is the ordinary layer scan, with its own sharding constraints),
with remat, and with autodiff: the backward pass is the same loop reversed, all forwards before all
backwards -- GPipe's schedule.

Two schedules (`mesh.pipeline_schedule`):
- `gpipe`: stage s holds layers s L/P .. (s+1) L/P - 1. Bubble (P-1)/(M+P-1): each stage idles P-1 of the
  M+P-1 iterations. That block is exactly what sharding the stored [L, ...] parameters over the pipeline axis
  gives, so the parameters never move.
- `circular` (interleaved; Narayanan et al. 2021, Megatron-LM's virtual stages): the layers are cut into
  P R chunks and stage s holds chunks s, s + P, s + 2P, ...; a micro-batch goes round the ring R times, the
  last stage handing it back to the first through the output buffer. Bubble (P-1)/(R M + P-1): R times
  smaller, for R times the stage-to-stage traffic, and it needs M >= P (a micro-batch is back at stage 0
  before the next round needs it). The stored layer order is kept, so the layer stack is re-laid out over
  the pipeline axis inside the step (one all-to-all of the layer parameters per step, like an FSDP gather).
Why not 1F1B: its gain over GPipe is memory -- at most P micro-batches' activations alive instead of M -- and
it needs a hand-written backward (each stage interleaving one forward with one backward), which autodiff of
a loop cannot express. Remat (`model.remat_policy`) bounds GPipe's activation memory instead, and the
circular schedule attacks the bubble, the cost 1F1B does not change.

Checkpoints are layout-independent: the parameter tree stays [L, ...] whatever the schedule, so a pipelined
run restores into an unpipelined one and back. Micro-batch i is rows i, i + M, i + 2M, ... of the batch, so a
micro-batch keeps the batch's data-parallel sharding. Bubble iterations compute on stale activations and
are discarded; the mixture of experts' router statistics are sums (`moe.stat_sums`) gathered only from the
real iterations, so the losses equal the unpipelined ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec

SCHEDULES = ("gpipe", "circular")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """P stages, M micro-batches, R repeats (1: GPipe; > 1: the circular schedule)."""

    stages: int
    microbatches: int
    repeats: int = 1

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    def bubble(self) -> float:
        """The fraction of stage-iterations spent idle: (P-1) / (R M + P-1)."""
        return (self.stages - 1) / self.iterations

    def describe(self) -> str:
        """The start-up line: stages, micro-batches, schedule, and the bubble beside its formula."""
        name = "gpipe" if self.repeats == 1 else f"circular, {self.repeats} repeats"
        formula = "(P-1)/(M+P-1)" if self.repeats == 1 else "(P-1)/(R M+P-1)"
        return (f"pipeline: {self.stages} stages x {self.microbatches} micro-batches ({name}), "
                f"{self.iterations} iterations: bubble {formula} = {100 * self.bubble():.1f}%")

    def for_batch(self, batch: int) -> "Pipeline":
        """The spec for a batch of `batch` rows: micro-batches reduced to a divisor of it (an evaluation batch
        need not divide like the training batch; the circular schedule falls back to GPipe below P
        micro-batches)."""
        m = math.gcd(batch, self.microbatches)
        return dataclasses.replace(self, microbatches=m, repeats=self.repeats if m >= self.stages else 1)


def from_config(config: ml_collections.ConfigDict) -> Pipeline | None:
    """The pipeline of a full experiment config (`mesh.pipeline` > 1), or None (no pipeline; or a bare model
    section, which carries no mesh)."""
    if "mesh" not in config or config.mesh.get("pipeline", 1) <= 1:
        return None
    p = config.mesh.pipeline
    circular = config.mesh.pipeline_schedule == "circular"
    return Pipeline(p, config.train.microbatches or p, config.mesh.pipeline_repeats if circular else 1)


def stage_axis() -> str | None:
    """The mesh axis the rules map 'activation_stage' to, when a mesh with that axis is active; else None."""
    try:
        spec = nn.logical_to_mesh_axes(("activation_stage",))
    except (ValueError, TypeError):
        return None
    axis = spec[0] if len(spec) else None
    mesh = jax.sharding.get_abstract_mesh()
    if not isinstance(axis, str) or mesh.empty or axis not in mesh.axis_names:
        return None
    return axis


def _on_stages(tree: Any, axis: str | None, dim: int) -> Any:
    """Pin dimension `dim` of every leaf to the stage axis, leaving the other dimensions to the compiler."""
    if axis is None:
        return tree

    def pin(a):
        spec = [PartitionSpec.UNCONSTRAINED] * a.ndim
        spec[dim] = axis
        return jax.lax.with_sharding_constraint(a, PartitionSpec(*spec))

    return jax.tree.map(pin, tree)


def _micro(a: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...], micro-batch i = rows i, i + M, ... (keeps the rows' data-parallel split)."""
    return a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1)


def _unmicro(a: jax.Array) -> jax.Array:
    return a.swapaxes(0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


StageFn = Callable[[Any, jax.Array, dict, dict], tuple[jax.Array, Any]]


def run(spec: Pipeline, stage_fn: StageFn, params: Any, x: jax.Array, aux: dict[str, jax.Array],
        per_layer: dict[str, jax.Array], unroll: bool = False) -> tuple[jax.Array, Any]:
    """The layer stack as a pipeline: x [B,T,D] -> (x [B,T,D], per-layer stats [L, ...] summed over
    micro-batches, or None).

    `params`: the stacked layer parameters ([L, ...] leaves). `aux`: per-row inputs every layer reads
    ([B, T] leaves: positions, segment ids). `per_layer`: per-layer scan inputs ([L] leaves: index, kind).
    `stage_fn(params [Lc, ...], x [b,T,D], aux [b,T], per_layer [Lc]) -> (x, stats [Lc, ...] or None)` applies one
    chunk of consecutive layers: the ordinary layer scan. `unroll`: the iterations as straight-line code
    (`model.scan_layers=False`; XLA's cost analysis then counts every iteration).
    """
    spec = spec.for_batch(x.shape[0])
    p, m, r = spec.stages, spec.microbatches, spec.repeats
    num_layers = jax.tree.leaves(per_layer)[0].shape[0]
    if num_layers % (p * r):
        raise ValueError(f"{num_layers} layers do not split into {p} stages x {r} repeats")
    chunk = num_layers // (p * r)
    axis = stage_axis()

    def chunks(a):  # [L, ...] -> [R, P, Lc, ...]: chunk (round j, stage s) is layers (j P + s) Lc ..
        return a.reshape(r, p, chunk, *a.shape[1:])

    stage_params = _on_stages(jax.tree.map(chunks, params), axis, 1)
    stage_layers = jax.tree.map(chunks, per_layer)
    xs = _micro(x, m)
    aux_m = jax.tree.map(lambda a: _micro(a, m), aux)
    stage_ids = jnp.arange(p)

    def stage(params_s, x_s, aux_s, layers_s, round_s):
        pick = lambda a: jax.lax.dynamic_index_in_dim(a, round_s, keepdims=False)
        return stage_fn(jax.tree.map(pick, params_s), x_s, aux_s, jax.tree.map(pick, layers_s))

    stages = jax.vmap(stage, in_axes=(1, 0, 0, 1, 0), spmd_axis_name=axis)
    state0 = _on_stages(jnp.zeros((p, *xs.shape[1:]), x.dtype), axis, 0)
    first_aux = jax.tree.map(lambda a: a[jnp.zeros((p,), jnp.int32)], aux_m)
    shapes = jax.eval_shape(stages, stage_params, state0, first_aux, stage_layers, stage_ids)[1]
    stats0 = None if shapes is None else jax.tree.map(lambda s: jnp.zeros((r, *s.shape), s.dtype), shapes)

    def body(carry, t):
        state, out, stats = carry
        item = t - stage_ids  # the work item each stage holds: micro-batch item % M, round item // M
        valid = (item >= 0) & (item < r * m)
        item = jnp.clip(item, 0, r * m - 1)
        micro, round_ = item % m, item // m
        first = jnp.where(t < m, xs[t % m], out[t % m])  # round 0 from the batch, later rounds from the last stage
        state = state.at[0].set(first.astype(state.dtype))
        aux_t = jax.tree.map(lambda a: a[micro], aux_m)
        new, found = stages(stage_params, state, aux_t, stage_layers, round_)
        new = _on_stages(new, axis, 0)
        done = jnp.clip(t - (p - 1), 0, r * m - 1) % m
        last = jnp.where(valid[p - 1], new[p - 1], out[done])
        out = jax.lax.dynamic_update_index_in_dim(out, last.astype(out.dtype), done, 0)
        if found is not None:
            keep = lambda a: jnp.where(valid.reshape(p, *(1,) * (a.ndim - 1)), a, 0)
            add = jax.tree.map(keep, found)
            stats = jax.tree.map(lambda acc, a: acc.at[round_, stage_ids].add(a), stats, add)
        return (jnp.roll(new, 1, axis=0), out, stats), None

    (_, out, stats), _ = jax.lax.scan(body, (state0, jnp.zeros_like(xs), stats0), jnp.arange(spec.iterations),
                                         unroll=spec.iterations if unroll else 1)
    if stats is not None:
        stats = jax.tree.map(lambda a: a.reshape(num_layers, *a.shape[3:]), stats)
    return _unmicro(out), stats
