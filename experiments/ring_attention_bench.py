"""Ring attention against all-gathered K/V: memory per device at a long context, and the per-device causal
work with the zigzag token order against contiguous shards.

    python experiments/ring_attention_bench.py [--seq-len 8192] [--devices 4]

Memory: the training step (forward + backward + AdamW) of a small model (2 layers, d_model 128, 4 heads) on
one sequence of `--seq-len` tokens, `mesh.sequence` = all the forced CPU devices, compiled once per strategy;
XLA's memory analysis gives each device's temporaries (activations, the attention's scores and K/V). Both use
the plain-jnp attention (`model.attention_impl=xla`), whose all-gather variant materialises each device's
[T/P, T] scores.

Work: each device's causal attention, in c x c tiles (c = T / 2P) it must compute -- the ring computes a tile
only when the causal mask leaves something in it (`ring_attention.tile_needed`) -- with the FLOPs of those
tiles (4 c^2 H per head: QK^T and PV, forward). The ring steps in lockstep, so its time is the busiest
device's. Last line: one JSON object.
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--seq-len", type=int, default=8192)
parser.add_argument("--devices", type=int, default=4)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from maxlm import config as C  # noqa: E402
from maxlm.model import ring_attention  # noqa: E402
from maxlm.training.pretrain import Trainer  # noqa: E402
from maxlm.training.sharding import make_mesh  # noqa: E402

MODEL = {"model.vocab_size": 256, "model.num_layers": 2, "model.d_model": 128, "model.num_heads": 4,
         "model.num_kv_heads": 2, "model.mlp_dim": 256, "model.compute_dtype": "float32"}


def temporaries(strategy: str, order: str = "zigzag") -> int:
    t, p = args.seq_len, args.devices
    cfg = C.validate(C.override(C.default_config(), **{
        **MODEL, "model.max_seq_len": t, "data.seq_len": t, "data.batch_size": 1, "mesh.data": 1,
        "mesh.sequence": p, "mesh.sequence_strategy": strategy, "mesh.sequence_order": order}))
    trainer = Trainer(cfg, mesh=make_mesh(cfg, jax.devices()))
    batch = {k: jax.ShapeDtypeStruct((1, t), np.float32 if k == "loss_weights" else np.int32,
                                     sharding=trainer.batch_sharding)
             for k in ("inputs", "targets", "segment_ids", "positions", "loss_weights")}
    trainer.compile(trainer.abstract_state, batch)
    return int(trainer._compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    t, p = args.seq_len, args.devices
    c, h, n = t // (2 * p), MODEL["model.d_model"] // MODEL["model.num_heads"], MODEL["model.num_heads"]
    mib = 2 ** 20
    memory = {name: temporaries(*spec) for name, spec in
              (("allgather", ("allgather",)), ("ring", ("ring", "zigzag")))}
    print(f"T={t} on {p} devices (sequence axis), batch 1, 2 layers: temporaries per device")
    for name, value in memory.items():
        print(f"  {name:<10} {value / mib:9.1f} MiB")
    work = {}
    print(f"causal attention work per device, tiles of {c} x {c} (forward FLOPs per layer, {n} heads of {h})")
    for order in ("contiguous", "zigzag"):
        tiles = ring_attention.tiles_per_device(p, zigzag=order == "zigzag")
        flops = [4 * c * c * h * n * k for k in tiles]
        work[order] = {"tiles": tiles, "flops": flops, "max_over_mean": max(tiles) / (sum(tiles) / p)}
        print(f"  {order:<10} tiles {tiles}  GFLOP {[round(f / 1e9, 3) for f in flops]}  "
              f"busiest / mean {work[order]['max_over_mean']:.2f}")
    print(json.dumps({"seq_len": t, "devices": p, "temporaries_bytes": memory, "work": work}))


if __name__ == "__main__":
    main()
