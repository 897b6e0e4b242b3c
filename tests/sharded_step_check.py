"""One train step on meshes of 8 forced CPU devices against the same step on 1 device.

    python tests/sharded_step_check.py 2,2,2,1 1,1,1,8:pallas 1,8,1,1:xla:1 1,2,2,2:xla:3:lora ...

Each argument is a mesh `data,fsdp,tensor,sequence[,expert]`, optionally followed by `:impl` (attention on the
mesh; default xla), `:zero_stage` (default 3) and `:lora` (train rank-4 LoRA adapters on a frozen random
base, on both sides; the adapters are compared), `:yarn` (YaRN-scaled RoPE on both sides), or `:moe` /
`:moe_capacity` (4 experts, top-2, dropless / GShard capacity with room for every token, on both sides). The single-device step always uses XLA attention (the
oracle). Prints one `RESULT` line per mesh: both losses, the largest parameter difference, and the
per-device bytes of parameters and optimizer state (from the arrays' shards) and gradients. Run as a
subprocess by tests/test_sharding.py, because the device count must be fixed before jax starts.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from maxlm import config as C  # noqa: E402
from maxlm.model import decoder as model  # noqa: E402
from maxlm.training.sharding import make_mesh  # noqa: E402
from maxlm.training.pretrain import Trainer  # noqa: E402

BASE = {"model.vocab_size": 128, "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 128, "model.compute_dtype": "float32", "model.max_seq_len": 64,
        "data.seq_len": 32, "data.batch_size": 8, "optim.warmup_steps": 0, "optim.peak_lr": 1e-3}

MOE = {"model.num_experts": 4, "model.experts_per_token": 2, "model.expert_mlp_dim": 64, "model.router_z_coef": 1e-3}


def _batch() -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (8, 33)).astype(np.int32)
    segments = np.ones((8, 32), np.int32)
    segments[:, 20:] = 2  # two packed documents per row
    positions = np.concatenate([np.arange(20), np.arange(12)])[None].repeat(8, 0).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments, "positions": positions,
            "loss_weights": np.ones((8, 32), np.float32)}


def _device_bytes(tree) -> int:
    """Bytes on the first device, read from the arrays' own addressable shards."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def run(cfg, devices) -> tuple[float, dict, str]:
    trainer = Trainer(cfg, mesh=make_mesh(cfg, devices))
    base = jax.device_get(model.init(cfg, jax.random.key(1))) if trainer.lora else None
    state = trainer.init_state(jax.random.key(0), base=base)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state["params"]))
    memory = (f"params={_device_bytes(state['params'])} opt_state={_device_bytes(state['opt_state'])} "
              f"grads={trainer.memory_report()['grads']} total_params={total}")
    state, metrics = trainer.step(state, trainer.device_batch(_batch()))
    return float(metrics["loss"]), jax.device_get(state["params"]), memory


def main(specs: list[str]) -> None:
    singles = {}
    for spec in specs:
        shape, impl, zero, mode = (spec.split(":") + ["xla", "3", ""][spec.count(":"):])[:4]
        extra = {"lora": {"lora.rank": 4}, "": {},
                 # a long-context stage: YaRN x4 past an original length of 8 (configs/longctx_tiny.py's recipe)
                 "yarn": {"model.rope_scaling": "yarn", "model.rope_factor": 4.0, "model.rope_original_max_len": 8},
                 "moe": MOE, "moe_capacity": {**MOE, "model.moe_impl": "capacity", "model.capacity_factor": 2.0}}[mode]
        if mode not in singles:
            single = C.validate(C.override(C.default_config(), **BASE, **extra, **{"mesh.data": 1}))
            singles[mode] = run(single, jax.devices()[:1])[:2]
        loss1, p1 = singles[mode]
        sizes = dict(zip(("data", "fsdp", "tensor", "sequence", "expert"), map(int, shape.split(","))))
        cfg = C.validate(C.override(C.default_config(), **BASE, **extra, **{f"mesh.{k}": v for k, v in sizes.items()},
                                    **{"model.attention_impl": impl, "mesh.zero_stage": int(zero)}))
        loss8, p8, memory = run(cfg, jax.devices())
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
        print(f"RESULT {spec} loss1={loss1:.8f} loss8={loss8:.8f} param_diff={diff:.3e} {memory}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
