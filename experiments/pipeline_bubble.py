"""The pipeline's bubble measured in the compiled program, beside the theory (P-1)/(R M+P-1).

    python experiments/pipeline_bubble.py [--stages 4] [--micro 4,16] [--devices 4]

Compiles the training step (forward + backward + AdamW) of a small dense model on forced CPU devices, once
unpipelined on one device and once per micro-batch count on a `mesh.pipeline=P` mesh, with every loop
unrolled (`model.scan_layers=False`) so that XLA's cost analysis counts each iteration, and each at L and 2L
layers: the difference is the layers' own FLOPs, without the embedding, head and optimizer that every stage
holds alike. A device of a P-stage pipeline does 1/P of the layers' useful work; whatever it does beyond that
is the bubble (stages computing on nothing while the pipeline fills and drains):

    measured bubble = 1 - (layer FLOPs on one device / P) / (layer FLOPs per pipeline device)

Also prints XLA's temporaries per device (GPipe keeps every micro-batch's stage inputs for the backward
pass). Wall time is not the measure here: forced CPU devices share the host's cores. Last line: one JSON
object, {"rows": [{schedule, microbatches, theory, measured, temporaries_bytes}, ...]}.
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--stages", type=int, default=4)
parser.add_argument("--micro", default="4,16", help="comma-separated micro-batch counts")
parser.add_argument("--devices", type=int, default=4, help="forced CPU devices (the pipeline takes all)")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from maxlm import config as C  # noqa: E402
from maxlm.model import pipeline  # noqa: E402
from maxlm.training.pretrain import Trainer  # noqa: E402
from maxlm.training.sharding import make_mesh  # noqa: E402

BASE = {"model.vocab_size": 256, "model.d_model": 128, "model.num_heads": 4, "model.num_kv_heads": 2,
        "model.mlp_dim": 512, "model.max_seq_len": 128, "model.compute_dtype": "float32", "model.scan_layers": False,
        "data.seq_len": 64, "data.batch_size": 32}


def compiled_cost(overrides: dict, devices: list) -> tuple[float, int]:
    """(FLOPs per device, temporaries bytes per device) of the compiled train step."""
    cfg = C.validate(C.override(C.default_config(), **{**BASE, **overrides}))
    trainer = Trainer(cfg, mesh=make_mesh(cfg, devices))
    state = jax.eval_shape(lambda: trainer.abstract_state)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((b, t), np.float32 if k == "loss_weights" else np.int32,
                                     sharding=trainer.batch_sharding)
             for k in ("inputs", "targets", "segment_ids", "positions", "loss_weights")}
    trainer.compile(state, batch)
    cost = trainer._compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]), int(trainer._compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    p = args.stages
    layers = p * 2  # L and 2L both split into stages x 2 repeats
    one = jax.devices()[:1]
    single = {n: compiled_cost({"model.num_layers": n, "mesh.data": 1}, one)[0] for n in (layers, 2 * layers)}
    useful = (single[2 * layers] - single[layers]) / p
    rows = []
    print(f"{p} stages on {args.devices} forced CPU devices; layer FLOPs per device, L={layers} -> {2 * layers}")
    print("schedule   micro-batches  theory bubble  measured bubble  temporaries/device")
    for schedule in ("gpipe", "circular"):
        for m in map(int, args.micro.split(",")):
            if schedule == "circular" and m < p:
                continue
            over = {"mesh.pipeline": p, "mesh.data": args.devices // p, "train.microbatches": m,
                    "mesh.pipeline_schedule": schedule}
            cost = {n: compiled_cost({**over, "model.num_layers": n}, jax.devices()) for n in (layers, 2 * layers)}
            executed = cost[2 * layers][0] - cost[layers][0]
            spec = pipeline.from_config(C.override(C.default_config(), **{**BASE, **over,
                                                                           "model.num_layers": layers}))
            row = {"schedule": schedule, "microbatches": m, "repeats": spec.repeats, "theory": spec.bubble(),
                   "measured": 1 - useful / executed, "temporaries_bytes": cost[2 * layers][1]}
            rows.append(row)
            print(f"{schedule:<10} {m:>13}  {100 * row['theory']:>12.1f}%  {100 * row['measured']:>14.1f}%  "
                  f"{row['temporaries_bytes'] / 2 ** 20:>12.1f} MiB")
    print(json.dumps({"stages": p, "rows": rows}))


if __name__ == "__main__":
    main()
