"""Save a training state under one mesh of 8 forced CPU devices and restore it under others.

    python tests/reshard_check.py WORKDIR

Writes a checkpoint from an FSDP mesh (1,8,1,1), then restores it onto (1,1,1,1) on one device, (2,1,2,1)
(data x tensor) on four, and (1,4,2,1) with ZeRO-1 on eight, printing one `RESULT` line per target with
the largest difference to the saved values. Run as a subprocess by tests/test_fault_tolerance.py.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from maxlm.training import checkpoint  # noqa: E402
from maxlm import config as C  # noqa: E402
from maxlm.training.sharding import make_mesh  # noqa: E402
from maxlm.training.pretrain import Trainer  # noqa: E402

BASE = {"model.vocab_size": 128, "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4,
        "model.num_kv_heads": 2, "model.mlp_dim": 128, "model.max_seq_len": 64, "data.seq_len": 32,
        "data.batch_size": 8}


def _config(data, fsdp, tensor, zero=3):
    return C.validate(C.override(C.default_config(), **BASE, **{
        "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, "mesh.sequence": 1, "mesh.zero_stage": zero}))


def main(workdir: str) -> None:
    source = _config(1, 8, 1)
    trainer = Trainer(source, mesh=make_mesh(source, jax.devices()))
    state = trainer.init_state(jax.random.key(0))
    saved = jax.device_get({"params": state["params"], "opt_state": state["opt_state"]})
    ckpt = checkpoint.Checkpointer(workdir, source)
    ckpt.save(7, state["params"], state["opt_state"], {"note": "reshard"})
    ckpt.close()
    for name, (data, fsdp, tensor, zero), n in (("1dev", (1, 1, 1, 3), 1), ("data2xtensor2", (2, 1, 2, 3), 4),
                                                ("fsdp4xtensor2-zero1", (1, 4, 2, 1), 8)):
        cfg = _config(data, fsdp, tensor, zero)
        target = Trainer(cfg, mesh=make_mesh(cfg, jax.devices()[:n]))
        params, opt_state, meta = checkpoint.Checkpointer(workdir, cfg).restore_latest(
            target.abstract_state["params"], target.abstract_state["opt_state"])
        placed = all(x.sharding == s for x, s in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(target.state_shardings["params"])))
        got = jax.device_get({"params": params, "opt_state": opt_state})
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(got)))
        print(f"RESULT {name} step={meta['step']} diff={diff} placed={placed}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
