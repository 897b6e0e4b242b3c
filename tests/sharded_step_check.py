"""Run one train step on a given mesh of 8 forced CPU devices and on 1 device; print the max differences.

The single-device run always uses the XLA attention (the oracle); the sharded run uses the attention
implementation named by the optional fifth argument (default xla), e.g. `pallas` inside shard_map.

Executed as a subprocess by tests/test_sharding.py, because the device count must be fixed before jax starts.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from maxlm import config as C  # noqa: E402
from maxlm.sharding import make_mesh  # noqa: E402
from maxlm.train import Trainer  # noqa: E402


def main(data: int, fsdp: int, tensor: int, sequence: int, impl: str = "xla") -> None:
    c = C.override(C.default_config(), **{
        "model.vocab_size": 128, "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 128, "model.compute_dtype": "float32", "model.max_seq_len": 64,
        "data.seq_len": 32, "data.batch_size": 8, "optim.warmup_steps": 0, "optim.peak_lr": 1e-3,
        "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, "mesh.sequence": sequence,
        "model.attention_impl": impl})
    C.validate(c)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (8, 33)).astype(np.int32)
    segments = np.ones((8, 32), np.int32)
    segments[:, 20:] = 2  # two packed documents per row
    positions = np.concatenate([np.arange(20), np.arange(12)])[None].repeat(8, 0).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments, "positions": positions,
             "loss_weights": np.ones((8, 32), np.float32)}
    results = []
    for devices, cfg in ((jax.devices()[:1], C.override(c, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
                                                               "mesh.sequence": 1, "model.attention_impl": "xla"})),
                         (jax.devices(), c)):
        trainer = Trainer(cfg, mesh=make_mesh(cfg, devices))
        state = trainer.init_state(jax.random.key(0))
        state, metrics = trainer.step(state, trainer.device_batch(batch))
        results.append((float(metrics["loss"]), jax.device_get(state["params"])))
    (loss1, p1), (loss8, p8) = results
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    print(f"RESULT loss1={loss1:.8f} loss8={loss8:.8f} param_diff={diff:.3e}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:5]), *sys.argv[5:6])
