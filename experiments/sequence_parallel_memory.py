"""Per-device activation memory of the train step under sequence parallelism, from XLA's compiled analysis.

    python experiments/sequence_parallel_memory.py [--degrees=1,4] [--seq_len=8192] [--batch_size=1]
        [--attention_impl=xla|pallas] [--config=configs/tiny.py --config.model.remat_policy=full ...]

What is measured: for each sequence-parallel degree d in `--degrees`, the full train step (forward,
backward, AdamW update) of the `--config` model (default configs/tiny.py) at `--seq_len` tokens x
`--batch_size` rows is compiled ahead of time on a mesh of d devices (data = fsdp = tensor = 1, sequence = d),
and `Trainer.memory_report()` reads XLA's memory analysis of the compiled per-device program: temporaries
(activations kept for the backward pass and every other scratch buffer), arguments (state and batch) and
outputs. Nothing is executed and no state is materialised: the step is lowered from the trainer's
`abstract_state` and an abstract batch (ShapeDtypeStructs carrying their shardings), so sizes far beyond
the host's memory compile all the same. On a CPU host the script forces 8 host-platform devices (unless
XLA_FLAGS already sets a count) so that one process can build every mesh.

Why the temporaries should fall by about the degree: the batch's tokens are split over the `sequence`
axis, so every [B, T, ...] activation holds T / d tokens per device, and attention runs per device inside
`shard_map` with the local queries against keys/values all-gathered over the sequence axis (see
maxlm/model/attention.py). The attention logits and probabilities are then [B, N, T / d, S] instead of
[B, N, T, S] -- with XLA's reference attention these float32 arrays dominate at long sequences. Only the
gathered K/V themselves ([B, S, K, H] per layer, small under grouped-query attention) and the replicated
parameters, gradients and optimizer state do not shrink; the latter are arguments and outputs, not
temporaries.

The table's last column is each degree's temporaries over those of the first degree listed; the final
`RESULT` line (for tests/test_sequence_memory.py) gives every degree's temporaries in bytes and `ratio`,
the last degree's temporaries over the first's.
"""

from __future__ import annotations

import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from maxlm import cli
from maxlm import config as config_lib
from maxlm.training.metrics import format_bytes
from maxlm.training.sharding import make_mesh
from maxlm.training.pretrain import Trainer

flags.DEFINE_list("degrees", ["1", "4"], "Sequence-parallel degrees to compile, the first being the reference.")
flags.DEFINE_integer("seq_len", 8192, "Tokens per row (data.seq_len and model.max_seq_len).")
flags.DEFINE_integer("batch_size", 1, "Global batch in rows (data.batch_size).")
flags.DEFINE_enum("attention_impl", "xla", ["xla", "pallas"], "model.attention_impl.")
flags.register_validator("degrees", lambda ds: bool(ds) and all(d.isdigit() and int(d) >= 1 for d in ds),
                         "--degrees must be a list of positive integers")
FLAGS = flags.FLAGS


def degree_config(config: ml_collections.ConfigDict, degree: int) -> ml_collections.ConfigDict:
    return config_lib.validate(config_lib.override(
        config, **{"data.seq_len": FLAGS.seq_len, "model.max_seq_len": FLAGS.seq_len,
                   "data.batch_size": FLAGS.batch_size, "model.attention_impl": FLAGS.attention_impl,
                   "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.sequence": degree}))


def abstract_batch(trainer: Trainer) -> dict[str, jax.ShapeDtypeStruct]:
    """The [B, T] batch arrays as shapes with the trainer's batch sharding (rows x sequence)."""
    shape = (trainer.config.data.batch_size, trainer.config.data.seq_len)
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
              "loss_weights": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=trainer.batch_sharding) for k, dt in dtypes.items()}


def compiled_memory(config: ml_collections.ConfigDict, degree: int) -> dict[str, float]:
    """`Trainer.memory_report()` of the step compiled on the first `degree` devices, plus `compile_s`."""
    trainer = Trainer(config, mesh=make_mesh(config, jax.devices()[:degree]))
    start = time.perf_counter()
    trainer.compile(trainer.abstract_state, abstract_batch(trainer))
    report = trainer.memory_report()
    report["compile_s"] = time.perf_counter() - start
    if "temporaries" not in report:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no compiled memory analysis")
    return report


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise config_lib.ConfigError("argv", f"unexpected arguments {argv[1:]}")
    degrees = [int(d) for d in FLAGS.degrees]
    if max(degrees) > jax.device_count():
        raise config_lib.ConfigError("mesh.sequence", f"--degrees={max(degrees)} needs more than the "
                                                      f"{jax.device_count()} available devices")
    device = jax.devices()[0]
    configs = [degree_config(FLAGS.config, d) for d in degrees]
    print(f"model: {config_lib.describe(configs[0])}; attention {FLAGS.attention_impl}, "
          f"compute {configs[0].model.compute_dtype}, remat {configs[0].model.remat_policy}")
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}); jax {jax.__version__}")

    reports = {d: compiled_memory(c, d) for d, c in zip(degrees, configs)}
    reference = reports[degrees[0]]["temporaries"]
    print(f"\n{'degree':>6}{'temporaries':>14}{'arguments':>12}{'outputs':>12}{'temp ratio':>12}{'compile s':>11}")
    for d, r in reports.items():
        print(f"{d:>6}{format_bytes(r['temporaries']):>14}{format_bytes(r['arguments']):>12}"
              f"{format_bytes(r['outputs']):>12}{r['temporaries'] / reference:>12.3f}{r['compile_s']:>11.1f}")
    ratio = reports[degrees[-1]]["temporaries"] / reference
    print("RESULT " + " ".join(f"degree{d}_temp={int(r['temporaries'])}" for d, r in reports.items())
          + f" ratio={ratio:.4f}", flush=True)


if __name__ == "__main__":
    cli.define_config_flag()
    cli.run(main)
