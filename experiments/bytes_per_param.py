"""Bytes per parameter of every training and inference mode: the seed notes' arithmetic beside what maxlm holds.

    python experiments/bytes_per_param.py [--config configs/tiny.py] [--devices 8]

Training rows build the trainer of each mode on forced CPU devices (full fine-tuning with AdamW at ZeRO
stages 1 / 2 / 3 over `--devices` fsdp ranks, LoRA, QLoRA int8 / int4) and read its per-device memory
report, the same figures a run writes to memory.json: parameters, gradients, optimizer state and frozen
base from their shardings. Nothing is trained; the arrays are abstract. Inference rows quantise the weights
(`maxlm.model.quant`) and count their bytes. Every figure is divided by the model's parameter count; the
ZeRO rows are what one device holds, as the notes count them, so their 1/N shows.

The theory column is the notes' count for float32 weights (maxlm's default `param_dtype`): 4 bytes a weight,
4 a gradient, 8 for AdamW's two moments = 16; ZeRO-1 shards the moments (4 + 4 + 8/N), ZeRO-2 the gradients
too (4 + 12/N), ZeRO-3 everything (16/N); LoRA holds the base (4) and 16 bytes per adapter parameter; int8
weights 1 byte + a float32 scale per output channel (~4 / D: most matrices read D inputs), int4 half a byte +
a float32 scale per group of 32 (4 / 32). Last line: one JSON object {"num_params": N, "rows": [{mode, theory, measured}, ...]}.
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--config", default="configs/tiny.py")
parser.add_argument("--devices", type=int, default=8, help="forced CPU devices (fsdp ranks of the ZeRO rows)")
parser.add_argument("--lora_rank", type=int, default=8)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from maxlm import config as config_lib  # noqa: E402
from maxlm.model import decoder, lora, quant  # noqa: E402
from maxlm.training import pretrain, sharding  # noqa: E402

base = config_lib.load_config_file(args.config)
n = config_lib.num_params(base)
d_in = base.model.d_model
rows = []


def report(overrides: dict, objective=None, devices: int = 1) -> dict:
    config = config_lib.validate(config_lib.override(base, **overrides))
    mesh = sharding.make_mesh(config, jax.devices()[:devices])
    trainer = pretrain.Trainer(config, mesh=mesh) if objective is None else \
        pretrain.Trainer(config, mesh=mesh, objective=objective)
    return trainer.memory_report()


def add(mode: str, theory: float, measured_bytes: float) -> None:
    rows.append({"mode": mode, "theory": round(theory, 3), "measured": round(measured_bytes / n, 3)})


def training_bytes(r: dict) -> float:
    return r["params"] + r["grads"] + r["opt_state"] + r.get("frozen_base", 0)


N = args.devices
add("full fine-tuning, float32 + AdamW, 1 device", 16, training_bytes(report({"mesh.data": 1, "mesh.fsdp": 1})))
for stage, theory in ((1, 4 + 4 + 8 / N), (2, 4 + 12 / N), (3, 16 / N)):
    r = report({"mesh.data": 1, "mesh.fsdp": N, "mesh.zero_stage": stage}, devices=N)
    add(f"ZeRO-{stage}, {N} fsdp ranks (per device)", theory, training_bytes(r))
lora_cfg = config_lib.override(base, **{"lora.rank": args.lora_rank})
adapter_fraction = lora.num_params(lora_cfg) / n
for q, base_bytes in (("", 4), ("int8", 1 + 4 / d_in), ("int4", 0.5 + 4 / 32)):
    r = report({"mesh.data": 1, "mesh.fsdp": 1, "lora.rank": args.lora_rank, "lora.base_quant": q}, pretrain.LORA)
    add(f"{'QLoRA ' + q if q else 'LoRA'} rank {args.lora_rank} (adapters {100 * adapter_fraction:.1f}% of the model)",
        base_bytes + 16 * adapter_fraction, training_bytes(r))
params = jax.eval_shape(lambda: decoder.init(base, jax.random.key(0)))
add("inference float32", 4, quant.weight_bytes(params))
add("inference bfloat16", 2, quant.weight_bytes(jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, "bfloat16"),
                                                               params)))
for q, theory in (("int8", 1 + 4 / d_in), ("int4", 0.5 + 4 / 32)):
    shapes = jax.eval_shape(lambda p: quant.quantize(p, decoder.logical_axes(base), q), params)
    add(f"inference {q}", theory, quant.weight_bytes(shapes))

print(f"{n:,} parameters ({args.config}); bytes per parameter", file=sys.stderr)
print(f"{'mode':<58}{'theory':>8}{'measured':>10}", file=sys.stderr)
for row in rows:
    print(f"{row['mode']:<58}{row['theory']:>8.3f}{row['measured']:>10.3f}", file=sys.stderr)
print(json.dumps({"num_params": n, "rows": rows}))
