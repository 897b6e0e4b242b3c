"""Will it fit, and how fast could it be? Ahead-of-time compilation for a TPU slice, on this CPU.

    pip install -e '.[tpu]'   # libtpu: the real TPU compiler, no TPU needed
    python -m maxlm.aot --config=configs/llama2_7b.py --topology=v5p-8 --per_chip_batch=2
    python -m maxlm.aot --config=configs/llama2_7b.py --topology=v6e-8 --step=decode

`jax.experimental.topologies` describes a TPU slice that this host does not have; the real jitted train step
(`maxlm.trainer.Trainer`'s, state donated, the config's mesh and ZeRO stage) or a KV-cached decode step is
lowered for those devices and compiled by libtpu -- Mosaic kernels included (`kernels.compile_target`). XLA's
own analyses of the compiled program then give what the program needs per chip, so a job that would die
with an out-of-memory error is refused here, before it waits in a queue (MaxText's `train_compile.py` is
the same idea). What is printed, and where each figure comes from:

* memory per chip: `compiled.memory_analysis()` -- arguments + outputs - donated aliases + temporaries +
  code -- against the chip's HBM (`CHIPS`), beside the practitioners' 16 bytes per parameter / (fsdp x
  tensor) estimate (ZeRO, Rajbhandari et al. 2020: weights, gradients and Adam's two moments, no
  activations).
* FLOPs, HBM bytes and collectives per step: XLA counts a `while` body once, however often it runs, and
  layers are an `nn.scan`; so these come from two small compiles of the same step with 1 and 2 layers
  unrolled, extrapolated linearly to L layers and multiplied by the gradient-accumulation steps. Collectives
  are read off the compiled HLO: each all-gather / reduce-scatter / all-reduce / all-to-all /
  collective-permute with its array bytes and the bytes one chip sends over ICI in a ring
  ((n-1)/n of the array; twice that for an all-reduce).
* a roofline: the step cannot be faster than max(FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI
  bandwidth) (Williams et al. 2009, applied per chip); MFU (PaLM, Chowdhery et al. 2022) at that time is an
  upper bound, not a forecast.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

import kernels
from maxlm import cli
from maxlm import config as config_lib
from maxlm.errors import UserError
from maxlm.model import decoder as model
from maxlm.model import pipeline
from maxlm.training import pretrain, sharding

GiB = 1024 ** 3


class TopologyError(UserError):
    """A topology name this tool cannot build (unknown generation, shape, or no libtpu)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's per-chip figures, from Google Cloud's published tables (`source`).

    `cores_in_name`: how many devices one chip counts for in an accelerator name (v4-8 and v5p-8 are four
    chips of two TensorCores; v5e-8 and v6e-8 are eight single-core chips). `dims`: 3 for a 3D torus, 2 for
    a 2D one.
    """
    generation: str
    hbm_bytes: float
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s a chip sends and receives over all its ICI links together
    cores_in_name: int
    dims: int
    source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 6 * 50e9, 2, 3,
               "cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s); ICI: 6 links x 50 GB/s, "
               "Jouppi et al. 2023 (TPU v4, ISCA)"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 1600e9 / 8, 1, 2,
                "cloud.google.com/tpu/docs/v5e and /v6e (197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s, ICI 1600 Gbps)"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 4800e9 / 8, 2, 3,
                "cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s, ICI 4800 Gbps)"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 3584e9 / 8, 1, 2,
                "cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB HBM, 1640 GB/s, ICI 3584 Gbps)"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e", "v5": "v5p"}
# Slice shapes by chip count, as Google Cloud lays them out (3D torus: v4, v5p; 2D: v5e, v6e).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as asked for
    chip: Chip
    shape: str  # e.g. "2x2x1"
    devices: tuple
    chips: int

    @property
    def devices_per_chip(self) -> int:
        return max(1, len(self.devices) // self.chips)

    @property
    def hbm_per_device(self) -> float:
        return self.chip.hbm_bytes / self.devices_per_chip


def parse_topology(name: str) -> tuple[Chip, str, int]:
    """'v5p-8' | 'v5e-256' | 'v5p:2x2x1' -> (chip, shape, number of chips). Accelerator names count what
    Google Cloud counts: TensorCores for v4 / v5p, chips for v5e / v6e."""
    text = name.strip().lower()
    match = re.fullmatch(r"([a-z0-9]+?)(?:pod)?[-:](.+)", text)
    if not match:
        raise TopologyError(f"--topology={name!r}: expected a name like v5p-8, v5e-256, v6e-8, v4-8 or v5p:2x2x1")
    gen = _ALIASES.get(match.group(1), match.group(1))
    if gen not in CHIPS:
        raise TopologyError(f"--topology={name!r}: unknown TPU generation {match.group(1)!r} "
                            f"(known: {', '.join(CHIPS)})")
    chip, rest = CHIPS[gen], match.group(2)
    shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    if re.fullmatch(r"\d+", rest):
        count = int(rest)
        if count % chip.cores_in_name or count // chip.cores_in_name not in shapes:
            sizes = ", ".join(f"{gen}-{c * chip.cores_in_name}" for c in shapes)
            raise TopologyError(f"--topology={name!r}: no standard {gen} slice of that size (known: {sizes}; "
                                f"or give the shape, e.g. {gen}:{next(iter(shapes.values()))})")
        chips = count // chip.cores_in_name
        return chip, shapes[chips], chips
    if not re.fullmatch(r"\d+(x\d+){1,2}", rest) or len(rest.split("x")) != chip.dims:
        raise TopologyError(f"--topology={name!r}: a {gen} shape has {chip.dims} dimensions, like "
                            f"{gen}:{next(iter(shapes.values()))}")
    return chip, rest, math.prod(int(d) for d in rest.split("x"))


def get_topology(name: str) -> Topology:
    """The devices of a TPU slice, from libtpu's topology description (no TPU needed)."""
    chip, shape, chips = parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
    # libtpu takes a lockfile so that one process owns a host's TPU chips; compiling for a described slice owns
    # none, and several such processes (parallel tests, a table of runs) must not block each other.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dims = [int(d) for d in shape.split("x")] + [1] * (3 - chip.dims)
    kwargs = {}
    if chips < 4:  # sub-host slices: libtpu's default host bounds are 2x2x1
        kwargs["chips_per_host_bounds"] = tuple(dims)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{chip.generation}:{shape}", **kwargs)
    except Exception as e:  # noqa: BLE001  (libtpu missing, or a shape it rejects)
        text = " ".join(str(e).split())
        raise TopologyError(f"--topology={name!r}: libtpu refused {chip.generation}:{shape}: {text[:200]}") from None
    return Topology(name, chip, shape, tuple(desc.devices), chips)


# ----------------------------------------------------------------------------------------------------------
# What a compiled program needs


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _shape_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _SHAPE.findall(text):
        size = _DTYPE_BYTES.get(dtype, 1)
        out.append(size * math.prod(int(d) for d in dims.split(",") if d))
    return out


def _group_size(line: str, num_devices: int) -> int:
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if listed and listed.group(1):
        return len(listed.group(1).split(","))
    pairs = re.search(r"source_target_pairs=\{([^}]*)\}", line)
    if pairs:
        return 2
    return num_devices


def collectives(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
    """{op: {"count", "bytes" (array bytes), "ici_bytes" (sent per chip in a ring)}} over a compiled HLO text.

    The array of an all-gather is its (gathered) result, of the others their operand; a ring moves (n-1)/n
    of it per chip for an n-chip group, an all-reduce twice that (reduce-scatter + all-gather)."""
    found: dict[str, dict[str, float]] = {}
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if not match or " = " not in line[: match.start()]:
            continue
        op = match.group(1)
        result = _shape_bytes(line[line.index(" = ") + 3: match.start()])
        operands = _shape_bytes(line[match.end(): line.find("), ", match.end()) + 1 or None])
        array = max(result) if op == "all-gather" and result else max(operands or result or [0])
        n = _group_size(line, num_devices)
        if n <= 1:
            continue
        share = 1.0 if op == "collective-permute" else (n - 1) / n * (2 if op == "all-reduce" else 1)
        entry = found.setdefault(op, {"count": 0, "bytes": 0.0, "ici_bytes": 0.0})
        entry["count"] += 1
        entry["bytes"] += array
        entry["ici_bytes"] += share * array
    return found


@dataclasses.dataclass
class Analysis:
    """One compiled program's memory (per device) and its per-call costs (per device)."""
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, dict[str, float]]
    oom: str = ""  # libtpu's own refusal, when the program does not fit at all
    host_arguments: int = 0  # arguments in host memory (optim.offload), not in the totals: they are not HBM

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def analyse(compiled: Any, num_devices: int) -> Analysis:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return Analysis(arguments=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
                    aliased=int(mem.alias_size_in_bytes), temporaries=int(mem.temp_size_in_bytes),
                    code=int(mem.generated_code_size_in_bytes), flops=float(cost.get("flops", 0.0)),
                    bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                    collectives=collectives(compiled.as_text(), num_devices),
                    host_arguments=int(mem.host_argument_size_in_bytes))


# ----------------------------------------------------------------------------------------------------------
# The programs


def mesh_sizes(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """{mesh axis: size} of the config's mesh on `num_devices` devices."""
    return dict(zip(config_lib.MESH_AXES, sharding.mesh_shape(config, num_devices)))


def batch_degree(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """How many ways the batch is split: the product of the mesh axes 'activation_batch' maps to."""
    sizes = mesh_sizes(config, num_devices)
    return math.prod(sizes[a] for a in sharding.batch_axes(config))


def train_program(config: ml_collections.ConfigDict, devices: tuple) -> tuple[Callable, tuple]:
    """The trainer's own jitted step and abstract (sharded) arguments: the state and one global batch."""
    trainer = pretrain.Trainer(config, mesh=sharding.make_mesh(config, list(devices)))
    shape = (config.data.batch_size, config.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32,
                                     sharding=trainer.batch_sharding)
             for k in ("inputs", "targets", "positions", "segment_ids", "loss_weights")}

    return trainer.lower, (trainer.abstract_state, batch)


def decode_program(config: ml_collections.ConfigDict, devices: tuple) -> tuple[Callable, tuple]:
    """One KV-cached decode step -- a token per sequence against a cache of `model.max_seq_len` slots --
    with weights in the compute dtype, sharded by the rules table, and the cache donated."""
    mesh = sharding.make_mesh(config, list(devices))
    dtype = jnp.dtype(config.model.compute_dtype)
    b, s = config.data.batch_size, config.model.max_seq_len
    params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, dtype, sharding=sh),
                          model.abstract_params(config), sharding.param_shardings(config, mesh))
    cache_sh = sharding.logical_to_sharding(
        PartitionSpec(None, "activation_batch", None, "activation_kv_heads", None), mesh, config)
    rows = sharding.logical_to_sharding(PartitionSpec("activation_batch", None), mesh, config)
    cache = jax.eval_shape(lambda: model.init_cache(config, b, s))
    cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cache_sh if v.ndim == 5 else
                                     rows if v.ndim == 2 else NamedSharding(mesh, PartitionSpec()))
             for k, v in cache.items()}
    tokens = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=rows)

    def step(params, cache, tokens, positions):
        logits, cache = model.decode(config, params, tokens, cache, positions=positions,
                                     segment_ids=jnp.ones_like(tokens))
        return logits[:, -1], cache

    jitted = jax.jit(step, donate_argnums=1)

    def lower(*args):
        with sharding.activation_rules(config, mesh):
            return jitted.lower(*args)

    return lower, (params, cache, tokens, tokens)


PROGRAMS = {"train": train_program, "decode": decode_program}


_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)")


def compile_program(step: str, config: ml_collections.ConfigDict, topology: Topology) -> Analysis:
    """Lower and compile `step` ("train" or "decode") for the topology's devices; its analysis.

    libtpu refuses to compile a program whose temporaries exceed the chip's HBM; that refusal is a result
    here (the temporaries it reports, the arguments from their shardings), not an error."""
    lower, args = PROGRAMS[step](config, topology.devices)
    with kernels.compile_target("tpu"):
        lowered = lower(*args)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            text = " ".join(str(e).split())
            match = _OOM.search(text)
            if "RESOURCE_EXHAUSTED" not in text or not match:
                raise
            temps = float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")
            arguments = sharding.bytes_per_device(args)
            donated = sharding.bytes_per_device(args[0] if step == "train" else args[1])
            return Analysis(arguments=arguments, outputs=donated, aliased=donated, temporaries=int(temps), code=0,
                            flops=0.0, bytes_accessed=0.0, collectives={}, oom=text[text.find("RESOURCE_EXHAUSTED"):],
                            host_arguments=sharding.bytes_per_device(args, host=True))
    return analyse(compiled, len(topology.devices))


def per_layer_costs(step: str, config: ml_collections.ConfigDict, topology: Topology) -> Analysis:
    """FLOPs, HBM bytes and collectives of one whole step, extrapolated from 1- and 2-layer unrolled compiles
    (XLA's analyses count a scanned layer once; with a pipeline, 1 and 2 layers per stage and repeat, the
    pipeline's loop unrolled too), times the gradient-accumulation steps."""
    accum = config.optim.grad_accum_steps
    variant = lambda n: config_lib.override(config, **{
        "optim.grad_accum_steps": 1, "data.batch_size": config.data.batch_size // accum, "model.num_layers": n,
        "model.scan_layers": False})
    # A pipeline needs whole chunks of layers: one layer per stage (and repeat), then two.
    pipe = pipeline.from_config(config)
    unit = pipe.stages * pipe.repeats if pipe is not None else 1
    one, two = (compile_program(step, variant(n * unit), topology) for n in (1, 2))
    layers = config.model.num_layers // unit
    scale = lambda a, b: accum * (a + (layers - 1) * (b - a))
    ops = {}
    for op in set(one.collectives) | set(two.collectives):
        a, b = one.collectives.get(op, {}), two.collectives.get(op, {})
        ops[op] = {k: scale(a.get(k, 0.0), b.get(k, 0.0)) for k in ("count", "bytes", "ici_bytes")}
    return Analysis(0, 0, 0, 0, 0, flops=scale(one.flops, two.flops),
                    bytes_accessed=scale(one.bytes_accessed, two.bytes_accessed), collectives=ops)


# ----------------------------------------------------------------------------------------------------------
# The report


@dataclasses.dataclass
class Report:
    step: str
    topology: Topology
    config: ml_collections.ConfigDict
    memory: Analysis
    costs: Analysis
    compile_seconds: float

    @property
    def per_chip(self) -> float:
        return self.memory.total * self.topology.devices_per_chip

    @property
    def fits(self) -> bool:
        return self.per_chip <= self.topology.chip.hbm_bytes

    @property
    def estimate_16b(self) -> float:
        """`sharding.estimate_16b_per_param` per chip (for a decode step only a scale: it holds no optimizer)."""
        sizes = mesh_sizes(self.config, len(self.topology.devices))
        degree = sizes["fsdp"] * sizes["tensor"] * sizes["pipeline"] / self.topology.devices_per_chip
        return sharding.estimate_16b_per_param(self.config, degree)

    def analytic_flops(self) -> float:
        """Model FLOPs per step per chip: `config.flops_per_token` x tokens (train); 2 x matmul parameters +
        attention over the cache per sequence (decode)."""
        c = self.config
        if self.step == "train":
            total = config_lib.flops_per_token(c, c.data.seq_len) * c.data.batch_size * c.data.seq_len
        else:
            m = c.model
            per_token = config_lib.flops_per_token(c, 0) / 3 + 4 * m.num_layers * m.max_seq_len * m.num_heads * model.head_dim(m)
            total = per_token * c.data.batch_size
        return total / self.topology.chips

    def roofline(self) -> dict[str, float]:
        chip, per_chip = self.topology.chip, self.topology.devices_per_chip
        ici = sum(v["ici_bytes"] for v in self.costs.collectives.values()) * per_chip
        times = {"compute": self.costs.flops * per_chip / chip.peak_flops,
                 "hbm": self.costs.bytes_accessed * per_chip / chip.hbm_bandwidth,
                 "ici": ici / chip.ici_bandwidth}
        bound = max(times, key=times.get) if any(times.values()) else "none (not compiled: does not fit)"
        step_time = times.get(bound, 0.0)
        return {**{f"{k}_s": v for k, v in times.items()}, "bound": bound, "step_time_s": step_time,
                "ici_bytes": ici, "mfu": self.analytic_flops() / (step_time * chip.peak_flops) if step_time else 0.0}


def _gib(x: float) -> str:
    return f"{x / GiB:9.2f}"


def describe(report: Report) -> list[str]:
    """The human-readable table (the last line of `python -m maxlm.aot` is the JSON)."""
    t, c, m = report.topology, report.config, report.memory
    per, sizes = t.devices_per_chip, mesh_sizes(report.config, len(t.devices))
    mesh = " ".join(f"{k}={v}" for k, v in sizes.items())
    lines = [f"maxlm.aot: {report.step} step of {config_lib.num_params(c) / 1e9:.3g}B params on {t.name} = TPU "
             f"{t.chip.generation} {t.shape} ({t.chips} chips, {len(t.devices)} devices); mesh {mesh}, "
             f"ZeRO-{c.mesh.zero_stage}, remat {c.model.remat_policy}, attention {c.model.attention_impl}, "
             f"{c.model.compute_dtype} compute / {c.model.param_dtype} params",
             f"compiled by libtpu in {report.compile_seconds:.1f} s"]
    if report.step == "train":
        accum, degree = c.optim.grad_accum_steps, batch_degree(c, len(t.devices))
        lines.append(f"batch: {c.data.batch_size} x {c.data.seq_len} tokens per step = {accum} micro-batch(es) of "
                     f"{c.data.batch_size // accum // degree} sequence(s) per data-parallel rank ({degree} ranks)")
        pipe = pipeline.from_config(c)
        if pipe is not None:
            lines.append(pipe.for_batch(c.data.batch_size // accum).describe())
    else:
        lines.append(f"decode: {c.data.batch_size} sequences, one token each, against a {c.model.max_seq_len}-slot KV cache")
    rows = [("arguments (state, batch)", m.arguments), ("outputs", m.outputs), ("donated (aliased)", -m.aliased),
            ("temporaries (activations, grads, ...)", m.temporaries), ("generated code", m.code)]
    lines.append("memory per chip (XLA memory analysis)          GiB")
    lines += [f"  {name:<38}{_gib(v * per)}" for name, v in rows]
    if m.host_arguments:
        lines.append(f"  {'(in host memory: optim.offload)':<38}{_gib(m.host_arguments * per)}   not counted in HBM")
    hbm = t.chip.hbm_bytes
    lines.append(f"  {'total':<38}{_gib(report.per_chip)}   of {hbm / GiB:.2f} GiB HBM "
                 f"({100 * report.per_chip / hbm:.0f}%) -> {'fits' if report.fits else 'DOES NOT FIT'}")
    est = report.estimate_16b
    label = "16 B/param / (fsdp x tensor x pipeline)"
    label += "" if report.step == "train" else ", for scale"
    lines.append(f"  {label:<38}{_gib(est)}   (compiled total = {report.per_chip / est:.2f} x this)")
    if report.fits:
        roof = report.roofline()
        analytic = report.analytic_flops()
        lines.append(f"FLOPs per step per chip: XLA {report.costs.flops * per:.3e}, analytic {analytic:.3e} "
                     f"(ratio {report.costs.flops * per / analytic:.2f}); HBM bytes (XLA) {report.costs.bytes_accessed * per:.3e}")
        if report.costs.collectives:
            lines.append("collectives per step per chip   count      array GiB    ICI GiB")
            for op, v in sorted(report.costs.collectives.items()):
                lines.append(f"  {op:<28}{v['count'] * per:8.0f} {_gib(v['bytes'] * per)}      {_gib(v['ici_bytes'] * per)}")
        else:
            lines.append("collectives: none")
        lines.append(f"roofline per step: compute {roof['compute_s'] * 1e3:.2f} ms, HBM {roof['hbm_s'] * 1e3:.2f} ms, "
                     f"ICI {roof['ici_s'] * 1e3:.2f} ms -> at best {roof['step_time_s'] * 1e3:.2f} ms "
                     f"({roof['bound']}-bound), MFU <= {100 * roof['mfu']:.1f}%")
    else:
        lines.append("FLOPs, collectives, roofline: not computed (the program does not fit)")
    ch = t.chip
    lines.append(f"chip {ch.generation}: {ch.peak_flops / 1e12:.0f} TFLOP/s bf16, {ch.hbm_bytes / GiB:.0f} GiB HBM at "
                 f"{ch.hbm_bandwidth / 1e9:.0f} GB/s, ICI {ch.ici_bandwidth / 1e9:.0f} GB/s; source: {ch.source}")
    return lines


def summary(report: Report) -> dict[str, Any]:
    roof = report.roofline()
    c = report.config
    out = {"fits": report.fits, "compiled_bytes_per_chip": int(report.per_chip),
           "hbm_bytes_per_chip": int(report.topology.chip.hbm_bytes),
           "flops_per_step": report.costs.flops * report.topology.devices_per_chip,
           "analytic_flops_per_step": report.analytic_flops(), "estimated_mfu": roof["mfu"],
           "estimated_step_time_s": roof["step_time_s"], "bound": roof["bound"],
           "collective_ici_bytes_per_step": roof["ici_bytes"], "estimate_16B_per_param_bytes": report.estimate_16b,
           "arguments_bytes": report.memory.arguments * report.topology.devices_per_chip,
           "temporaries_bytes": report.memory.temporaries * report.topology.devices_per_chip,
           "host_arguments_bytes": report.memory.host_arguments * report.topology.devices_per_chip,
           "step": report.step, "topology": report.topology.name, "shape": report.topology.shape,
           "chips": report.topology.chips, "batch_size": c.data.batch_size, "seq_len": c.data.seq_len,
           "grad_accum_steps": c.optim.grad_accum_steps, "remat_policy": c.model.remat_policy,
           "zero_stage": c.mesh.zero_stage, "attention_impl": c.model.attention_impl,
           "compile_seconds": report.compile_seconds}
    if report.step == "decode":
        out["tokens_per_s"] = c.data.batch_size / roof["step_time_s"] if roof["step_time_s"] else 0.0
    return out


# ----------------------------------------------------------------------------------------------------------
# The command


def with_per_chip_batch(config: ml_collections.ConfigDict, step: str, per_chip: int, num_devices: int
                        ) -> ml_collections.ConfigDict:
    """The config with `per_chip` sequences per data-parallel rank in each compiled call. Training keeps the
    configured global batch (tokens per step) and makes up the rest with gradient accumulation, which gives
    the same gradient (`maxlm.trainer.train_step`); decoding runs `per_chip` x ranks sequences."""
    degree = batch_degree(config, num_devices)
    if step == "decode":
        return config_lib.override(config, **{"data.batch_size": per_chip * degree})
    micro = per_chip * degree
    if config.data.batch_size % micro:
        raise config_lib.ConfigError("data.batch_size", f"{config.data.batch_size} sequences per step are not a whole "
                                     f"number of micro-batches of {per_chip} x {degree} data-parallel ranks")
    return config_lib.override(config, **{"optim.grad_accum_steps": config.data.batch_size // micro})


def micro_batch(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Sequences per data-parallel rank in one compiled call (one micro-batch)."""
    return config.data.batch_size // config.optim.grad_accum_steps // batch_degree(config, num_devices)


def check(config: ml_collections.ConfigDict, step: str, num_devices: int) -> None:
    """Fail before compiling, naming the key, when the mesh or the batch cannot be laid on these devices."""
    config_lib.validate(config)
    sharding.mesh_shape(config, num_devices)
    degree = batch_degree(config, num_devices)
    if step == "train" and config.data.batch_size % (config.optim.grad_accum_steps * degree):
        raise config_lib.ConfigError("data.batch_size", f"{config.data.batch_size} sequences do not split into "
                                     f"{config.optim.grad_accum_steps} micro-batches over {degree} data-parallel ranks")
    if step == "decode" and config.data.batch_size % degree:
        raise config_lib.ConfigError("data.batch_size", f"{config.data.batch_size} decode sequences do not split "
                                     f"over {degree} data-parallel ranks")


def run(config: ml_collections.ConfigDict, topology: Topology, step: str = "train", per_chip_batch: int = 0,
        log: Callable[[str], None] = print) -> Report:
    """Compile `step` for the topology and report. With `per_chip_batch` the micro-batch is pinned; without it
    the configured one is tried first and, for training when it does not fit, the largest power-of-two
    micro-batch predicted to fit (memory is linear in it: one more compile at 1 sequence per rank gives the
    line) is compiled and reported, with the gradient accumulation that keeps the configured batch."""
    n = len(topology.devices)
    if per_chip_batch:
        config = with_per_chip_batch(config, step, per_chip_batch, n)
    check(config, step, n)
    start = time.perf_counter()
    memory = compile_program(step, config, topology)
    seconds = time.perf_counter() - start
    mb = micro_batch(config, n) if step == "train" else config.data.batch_size // batch_degree(config, n)
    hbm = topology.hbm_per_device
    if memory.total > hbm and not per_chip_batch and step == "train" and mb > 1:
        log(f"the configured micro-batch ({mb} per rank) needs {memory.total * topology.devices_per_chip / GiB:.1f} "
            f"GiB per chip; looking for the largest that fits")
        small = with_per_chip_batch(config, step, 1, n)
        base = compile_program(step, small, topology)
        if base.total > hbm:  # not even one sequence per rank: report that, the closest to fitting
            config, memory = small, base
        else:
            slope = (memory.total - base.total) / (mb - 1)
            best = 1
            while best * 2 <= mb and mb % (best * 2) == 0 and base.total + slope * (best * 2 - 1) <= hbm:
                best *= 2
            while True:
                candidate = with_per_chip_batch(config, step, best, n)
                start = time.perf_counter()
                trial = base if best == 1 else compile_program(step, candidate, topology)
                if trial.total <= hbm or best == 1:
                    config, memory, seconds = candidate, trial, time.perf_counter() - start
                    break
                best //= 2
    if memory.total > hbm:  # no roofline for a program that cannot run: its FLOPs would only mislead
        costs = Analysis(0, 0, 0, 0, 0, flops=0.0, bytes_accessed=0.0, collectives={})
    else:
        costs = per_layer_costs(step, config, topology)
    return Report(step, topology, config, memory, costs, seconds)


def advice(report: Report) -> tuple[str, str]:
    """(one-line reason, suggestion) for a program that does not fit."""
    t, c, m = report.topology, report.config, report.memory
    per = t.devices_per_chip
    hbm = t.chip.hbm_bytes
    state = (m.arguments) * per
    reason = (f"needs {report.per_chip / GiB:.1f} GiB per chip, {t.chip.generation} has {hbm / GiB:.0f} GiB "
              f"(arguments {state / GiB:.1f} GiB, temporaries {m.temporaries * per / GiB:.1f} GiB)")
    sizes = mesh_sizes(c, len(t.devices))
    tips = []
    if state > 0.8 * hbm:
        if sizes["fsdp"] * sizes["tensor"] < len(t.devices):
            tips.append("shard the state over every chip: --config.mesh.fsdp=-1 --config.mesh.data=1")
        if c.mesh.zero_stage < 3:
            tips.append("--config.mesh.zero_stage=3")
        tips.append(f"a slice with more chips (the state alone is {state / GiB:.1f} GiB per chip here)")
    else:
        if report.step == "train" and c.model.remat_policy != "full":
            tips.append("--config.model.remat_policy=full (recompute each layer in the backward pass)")
        mb = micro_batch(c, len(t.devices)) if report.step == "train" else c.data.batch_size
        if mb > 1:
            tips.append(f"a smaller per-chip batch: --per_chip_batch={max(1, mb // 2)}")
        if sizes["fsdp"] * sizes["tensor"] < len(t.devices):
            tips.append("more fsdp: --config.mesh.fsdp=-1 --config.mesh.data=1")
    return reason, "; or ".join(tips) or "a slice with more chips"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    topology = get_topology(f.topology)
    config = f.config
    report = run(config, topology, f.step, f.per_chip_batch, log=lambda s: print(s, flush=True))
    for line in describe(report):
        print(line, flush=True)
    out = summary(report)
    if not report.fits:
        reason, suggestion = advice(report)
        out.update(reason=reason, suggestion=suggestion)
        print(f"does not fit: {reason}", file=sys.stderr, flush=True)
        print(f"suggestion: {suggestion}", file=sys.stderr, flush=True)
    print(json.dumps(out), flush=True)
    if not report.fits:
        sys.exit(1)


if __name__ == "__main__":
    cli.define_config_flag()
    flags.declare_key_flag("config")
    flags.DEFINE_string("topology", None, "TPU slice to compile for: v5p-8, v5e-256, v6e-8, v4-8, or a shape "
                                          "such as v5p:2x2x1.", required=True)
    flags.DEFINE_enum("step", "train", list(PROGRAMS), "Compile the train step, or one KV-cached decode step.")
    flags.DEFINE_integer("per_chip_batch", 0, "Sequences per data-parallel rank in one compiled call (train: the "
                         "configured batch is kept, gradient accumulation makes up the rest). 0: as configured, "
                         "and for training the largest micro-batch that fits when that one does not.", lower_bound=0)
    cli.run(main, user_errors=(TopologyError,))
