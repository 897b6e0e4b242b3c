"""The device mesh and the one mapping from logical axis names to mesh axes.

Model code names logical axes only ('embed', 'heads', 'activation_batch', ...); `config.mesh.rules` (see
maxlm/config.py) is the single table that maps them to the mesh axes `pipeline`, `data`, `fsdp`, `expert`,
`tensor`, `sequence`.
Parameter shardings, optimizer-state shardings and activation constraints are all derived from it, so
changing the parallelism is a config change, never a model change (the MaxText / t5x design).

The mesh uses `AxisType.Auto` axes on purpose: the compiler (GSPMD / Shardy) propagates shardings from the
parameter and batch annotations plus the logical constraints in the model, which is what lets one model
definition run under every mesh. (Recent `jax.make_mesh` defaults to Explicit axes, which would require
sharding-aware code at every op.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from maxlm import config as config_lib
from maxlm.config import MESH_AXES, ConfigError
from maxlm.model import decoder as model, quant


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Resolve the `-1` axis (at most one) to the devices left over; check the product."""
    sizes = [config.mesh[a] for a in MESH_AXES]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError("mesh", f"{num_devices} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ConfigError("mesh", f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                                  f"{num_devices} are available")
    return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in config.mesh.rules)


def logical_to_sharding(spec: PartitionSpec, mesh: Mesh, config: ml_collections.ConfigDict) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules(config)))


def _without(spec: PartitionSpec, axes: tuple[str, ...]) -> PartitionSpec:
    """The spec with the given mesh axes removed (those dims become replicated over them)."""
    def keep(entry):
        if entry is None:
            return None
        names = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a not in axes)
        return None if not names else names[0] if len(names) == 1 else names

    return PartitionSpec(*(keep(e) for e in spec))


def param_shardings(config: ml_collections.ConfigDict, mesh: Mesh, replicate_over: tuple[str, ...] = (),
                    logical: Any = None) -> dict:
    """NamedSharding for every parameter, from its logical axes and the rules table; `replicate_over`
    drops mesh axes (ZeRO-1/2 keep whole parameters on each fsdp rank). `logical` is a tree of logical
    PartitionSpecs (default: the model's; LoRA passes its adapters')."""
    def to_sharding(spec):
        mesh_spec = nn.logical_to_mesh_axes(spec, rules(config))
        return NamedSharding(mesh, _without(mesh_spec, replicate_over))

    logical = model.logical_axes(config) if logical is None else logical
    return jax.tree.map(to_sharding, logical, is_leaf=lambda x: isinstance(x, PartitionSpec))


def zero_shardings(config: ml_collections.ConfigDict, mesh: Mesh, logical: Any = None) -> tuple[dict, dict]:
    """(parameter shardings, gradient shardings) for `config.mesh.zero_stage`. The optimizer state is
    always laid out like the fully sharded parameters (`param_shardings(config, mesh)`)."""
    full = param_shardings(config, mesh, logical=logical)
    stage = config.mesh.zero_stage
    whole = full if stage == 3 else param_shardings(config, mesh, replicate_over=("fsdp",), logical=logical)
    return whole, (full if stage >= 2 else whole)


def estimate_16b_per_param(config: ml_collections.ConfigDict, degree: float) -> float:
    """The practitioners' per-device estimate of training state: 16 bytes per parameter (weights, gradients and
    AdamW's two moments, the ZeRO paper's mixed-precision count) over the parameter-sharding degree
    fsdp x tensor x pipeline. No activations."""
    return 16 * config_lib.num_params(config) / degree


HOST_MEMORY = "pinned_host"


def in_host_memory(shardings: Any, mesh: Mesh) -> Any:
    """The same shardings in host memory (`HOST_MEMORY`); ConfigError (optim.offload) when the mesh's
    devices have no such memory kind."""
    kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
    if HOST_MEMORY not in kinds:
        raise ConfigError("optim.offload", f"the {mesh.devices.flat[0].platform} backend has no {HOST_MEMORY!r} "
                          f"memory kind (it has {sorted(kinds)}): optimizer offload needs GPU or TPU host memory")
    return jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY), shardings)


def bytes_per_device(tree: Any, host: bool = False) -> int:
    """Bytes one device holds for a tree of arrays or ShapeDtypeStructs carrying shardings (the largest
    shard of each leaf: a replicated leaf counts whole): in its own memory, or with `host` the bytes it keeps
    in host memory (`in_host_memory`)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if (getattr(leaf.sharding, "memory_kind", None) == HOST_MEMORY) != host:
            continue
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += quant.leaf_bytes(jax.ShapeDtypeStruct(shape, leaf.dtype))  # int4 packs two to a byte
    return total


def batch_sharding(config: ml_collections.ConfigDict, mesh: Mesh) -> NamedSharding:
    """[B, T] batch arrays: rows over the data-parallel axes, tokens over the sequence axis."""
    return logical_to_sharding(PartitionSpec("activation_batch", "activation_length"), mesh, config)


def batch_axes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The mesh axes that split the batch's rows: those 'activation_batch' maps to."""
    target = dict(rules(config)).get("activation_batch")
    return tuple(a for a in (target if isinstance(target, tuple) else (target,)) if a is not None)


def batch_degree(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
    """How many ways the mesh splits the batch's rows."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(config)]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activation_rules(config: ml_collections.ConfigDict, mesh: Mesh) -> Iterator[None]:
    """Context under which the model's `with_logical_constraint` calls become real sharding constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules(config)):
        yield


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble this host's rows into global arrays (each host feeds only its slice of the data)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
